"""Dispatch: how a created response reaches a process that runs it, and how a cancel
reaches the process running it.

`LocalDispatch` is the default: one process holds both roles, so the queue is an
`asyncio.Queue` and a cancel signal is a function call. `RedisDispatch` joins API replicas
and workers (`tether worker`) through Redis: a Redis Stream with one consumer group is the
run queue, and a pub/sub channel carries cancel signals.

Neither is a source of truth. The store decides who runs a response (`Store.claim` is a
compare-and-set) and leases bring back what a queue loses (docs/contract.md §6.2): a response that
no worker claimed before its lease ran out is submitted again by whichever process sees it.
So a lost or duplicated queue entry, or a lost cancel signal, costs time, never
correctness: a cancel that gets no answer fences the run out after `cancel_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from tether.store.base import StoreUnavailable

log = logging.getLogger("tether.dispatch")
OnCancel = Callable[[str], None]


class Dispatch(Protocol):
    # True when other processes may run responses (a cancel must be signalled to them).
    remote: bool

    async def open(self, on_cancel: OnCancel) -> None:
        """Connect; `on_cancel(response_id)` is called in this process for every cancel
        signal (whether or not this process runs that response)."""
        ...

    async def close(self) -> None: ...

    async def submit(self, response_id: str, tenant: str) -> None:
        """Hand a response to some worker. Raises `StoreUnavailable` if it can't."""
        ...

    async def take(self) -> tuple[str, str]:
        """The next `(response_id, tenant)` for this process to run; waits for one."""
        ...

    async def cancel(self, response_id: str) -> None:
        """Ask whichever process runs `response_id` to stop it (best effort)."""
        ...


class LocalDispatch:
    """One process: a queue in memory."""

    remote = False

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._on_cancel: OnCancel = lambda _: None

    async def open(self, on_cancel: OnCancel) -> None:
        self._on_cancel = on_cancel

    async def close(self) -> None:
        pass

    async def submit(self, response_id: str, tenant: str) -> None:
        self._queue.put_nowait((response_id, tenant))

    async def take(self) -> tuple[str, str]:
        return await self._queue.get()

    async def cancel(self, response_id: str) -> None:
        self._on_cancel(response_id)


class RedisDispatch:
    """API replicas and workers joined by Redis.

    Keys: `{prefix}:runs` (a stream; group `workers`; entries `r`=id, `t`=tenant) and the
    channel `{prefix}:cancel` (message = response id). A worker takes one entry per free
    run slot and acknowledges it at once: from then on the store's claim and the lease
    are what count, so nothing waits in a pending list for a worker that died.
    """

    remote = True
    GROUP = "workers"

    def __init__(self, url: str, prefix: str, consumer: str) -> None:
        import redis.asyncio as aioredis

        # Short timeouts: a request during a Redis outage gets a 503, never a hang.
        self._redis = aioredis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self._runs = f"{prefix}:runs"
        self._channel = f"{prefix}:cancel"
        self._consumer = consumer
        self._listener: asyncio.Task[None] | None = None
        self._group_ready = False

    async def open(self, on_cancel: OnCancel) -> None:
        # A task owned by this object, not a task group: open() and close() may run in
        # different tasks, and a task group must be left by the task that entered it.
        # close() cancels it and awaits it.
        self._listener = asyncio.create_task(
            self._listen(on_cancel), name="tether-dispatch-cancels"
        )

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            # asyncio.wait raises nothing of the listener's own: the only cancellation
            # caught is the one just caused. A cancel of close()'s caller propagates.
            await asyncio.wait([listener])
        await self._redis.aclose()

    async def submit(self, response_id: str, tenant: str) -> None:
        from redis.exceptions import RedisError

        try:
            await self._redis.xadd(
                self._runs, {"r": response_id, "t": tenant}, maxlen=100_000, approximate=True
            )
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"run queue unreachable: {exc}") from exc

    async def take(self) -> tuple[str, str]:
        from redis.exceptions import RedisError, ResponseError

        while True:
            try:
                if not self._group_ready:
                    await self._create_group()
                reply: Any = await self._redis.xreadgroup(
                    self.GROUP, self._consumer, {self._runs: ">"}, count=1, block=1000
                )
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        await self._redis.xack(self._runs, self.GROUP, entry_id)
                        return fields[b"r"].decode(), fields[b"t"].decode()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False  # Redis restarted empty: make the group again
            except (RedisError, OSError) as exc:
                log.warning("run queue unreachable (%s); retrying", exc)
                self._group_ready = False
                await asyncio.sleep(0.5)

    async def _create_group(self) -> None:
        from redis.exceptions import ResponseError

        try:
            # From id 0: entries submitted before the group existed are runs too.
            await self._redis.xgroup_create(self._runs, self.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def cancel(self, response_id: str) -> None:
        from redis.exceptions import RedisError

        try:
            await self._redis.publish(self._channel, response_id)
        except (RedisError, OSError) as exc:
            # The canceller fences the run out after its bound instead.
            log.warning("cancel signal for %s not sent: %s", response_id, exc)

    async def _listen(self, on_cancel: OnCancel) -> None:
        """Deliver cancel signals until close(). A failure ends the task and is logged
        here, when it happens: the task is awaited only at close, which raises nothing of
        it. A cancellation (close's) is not caught."""
        try:
            await self._subscribed(on_cancel)
        except Exception:
            log.exception(
                "the cancel channel listener failed: cancel signals from other "
                "processes are lost (a cancel fences its run out after "
                "cancel_timeout instead)"
            )

    async def _subscribed(self, on_cancel: OnCancel) -> None:
        from redis.exceptions import RedisError

        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                while True:
                    # A bounded wait: a read with no timeout would hit the socket timeout.
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        on_cancel(message["data"].decode())
            except (RedisError, OSError) as exc:
                log.warning("cancel channel lost (%s); resubscribing", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
