"""Dispatch: how a created response reaches a process that runs it, and how a cancel
reaches the process running it.

`LocalDispatch` is the default: one process holds both roles, so the queue is an
`schedule.RunQueue` and a cancel signal is a function call. `RedisDispatch` joins API replicas
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
import time
from collections.abc import Callable
from typing import Any, Protocol

from tether.schedule import RunQueue
from tether.store.base import StoreUnavailable

log = logging.getLogger("tether.dispatch")
# The earliest deferred entry whose deadline is at most ARGV[1], removed in the same
# step (a script runs atomically: two workers never take the same entry).
_TAKE_LATER = """
local first = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)[1]
if first then redis.call('ZREM', KEYS[1], first) end
return first
"""
OnCancel = Callable[[str], None]


class Dispatch(Protocol):
    # True when other processes may run responses (a cancel must be signalled to them).
    remote: bool

    async def open(self, on_cancel: OnCancel) -> None:
        """Connect; `on_cancel(response_id)` is called in this process for every cancel
        signal (whether or not this process runs that response)."""
        ...

    async def close(self) -> None: ...

    async def submit(self, response_id: str, tenant: str, start_by: float | None = None) -> None:
        """Hand a response to some worker: `soonest` (`start_by` None) or deferred, to
        start by `start_by` at the latest (`tether.schedule`). Raises `StoreUnavailable`
        if it can't."""
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
        self.queue = RunQueue()
        self._on_cancel: OnCancel = lambda _: None

    async def open(self, on_cancel: OnCancel) -> None:
        self._on_cancel = on_cancel

    async def close(self) -> None:
        pass

    async def submit(self, response_id: str, tenant: str, start_by: float | None = None) -> None:
        self.queue.put(response_id, tenant, start_by)

    async def take(self) -> tuple[str, str]:
        return await self.queue.take()

    async def cancel(self, response_id: str) -> None:
        self._on_cancel(response_id)


class RedisDispatch:
    """API replicas and workers joined by Redis.

    Keys: `{prefix}:runs` (a stream; group `workers`; entries `r`=id, `t`=tenant), the
    deferred class `{prefix}:later` (a sorted set of `id tenant` by `start_by`: a
    member is taken once, by whoever removes it) and the channel `{prefix}:cancel`
    (message = response id). A worker takes one entry per free
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
        self._later = f"{prefix}:later"
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

    async def submit(self, response_id: str, tenant: str, start_by: float | None = None) -> None:
        from redis.exceptions import RedisError

        try:
            if start_by is not None:
                # A member once: queued again (lease recovery), it keeps one entry.
                await self._redis.zadd(self._later, {f"{response_id} {tenant}": start_by})
                return
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
                due = await self._take_later(time.time())
                if due is not None:
                    return due  # a deferred response at its deadline goes first
                reply: Any = await self._redis.xreadgroup(
                    self.GROUP, self._consumer, {self._runs: ">"}, count=1, block=1000
                )
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        await self._redis.xack(self._runs, self.GROUP, entry_id)
                        return fields[b"r"].decode(), fields[b"t"].decode()
                # No `soonest` work came for a second: a deferred response may run.
                spare = await self._take_later(None)
                if spare is not None:
                    return spare
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False  # Redis restarted empty: make the group again
            except (RedisError, OSError) as exc:
                log.warning("run queue unreachable (%s); retrying", exc)
                self._group_ready = False
                await asyncio.sleep(0.5)

    async def _take_later(self, due: float | None) -> tuple[str, str] | None:
        """Remove and return the deferred entry with the earliest deadline (only if that
        deadline is at or before `due`, when given); None if there is none."""
        popped: Any = await self._redis.eval(
            _TAKE_LATER, 1, self._later, "+inf" if due is None else repr(due)
        )
        if not popped:
            return None
        rid, tenant = popped.decode().split(" ", 1)
        return rid, tenant

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
