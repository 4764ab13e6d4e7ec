"""Dispatch: how a created response reaches a process that runs it, and how a cancel
reaches the process running it.

`LocalDispatch` is the default: one process holds both roles, so the queue is an
`schedule.RunQueue` and a cancel signal is a function call. `RedisDispatch` joins API replicas
and workers (`tether worker`) through Redis (one server or a cluster: `tether.redisconn`):
Redis Streams with one consumer group each are the run queue, and pub/sub channels carry
cancel signals and wake idle workers.

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
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from tether import redisconn
from tether.schedule import RunQueue
from tether.store.base import StoreUnavailable
from tether.store.rounds import Rounds

log = logging.getLogger("tether.dispatch")
# One take from one shard, in one step (a script runs atomically: two workers never take
# the same entry): the deferred entry with the earliest deadline at most ARGV[1], removed;
# else (if ARGV[4] is '1') the next stream entry for group ARGV[2], read without a pending
# entry (NOACK: from here the store's claim and the lease count). `id tenant`, or false.
_TAKE = """
local first = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)[1]
if first then
  redis.call('ZREM', KEYS[1], first)
  return first
end
if ARGV[4] ~= '1' then return false end
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', 1, 'NOACK',
  'STREAMS', KEYS[2], '>')
if not reply then return false end
local entry = reply[1][2][1]
if not entry then return false end
local fields, rid, tenant = entry[2], '', ''
for i = 1, #fields, 2 do
  if fields[i] == 'r' then rid = fields[i + 1] end
  if fields[i] == 't' then tenant = fields[i + 1] end
end
return rid .. ' ' .. tenant
"""
OnCancel = Callable[[str], None]


class Dispatch(Protocol):
    # True when other processes may run responses (a cancel must be signalled to them).
    remote: bool
    # Whether `take` may now return a deferred response that is not yet due (the
    # worker's cap on deferred runs; `tether.schedule`). Set by the worker.
    may_defer: Callable[[], bool]

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

    def nudge(self) -> None:
        """`may_defer` may say otherwise now: a waiting `take` looks again."""
        ...


class LocalDispatch:
    """One process: a queue in memory."""

    remote = False

    def __init__(self) -> None:
        self.queue = RunQueue()
        self._on_cancel: OnCancel = lambda _: None

    @property
    def may_defer(self) -> Callable[[], bool]:
        return self.queue.may_defer

    @may_defer.setter
    def may_defer(self, rule: Callable[[], bool]) -> None:
        self.queue.may_defer = rule

    async def open(self, on_cancel: OnCancel) -> None:
        self._on_cancel = on_cancel

    async def close(self) -> None:
        pass

    async def submit(self, response_id: str, tenant: str, start_by: float | None = None) -> None:
        self.queue.put(response_id, tenant, start_by)

    async def take(self) -> tuple[str, str]:
        return await self.queue.take()

    def nudge(self) -> None:
        self.queue.nudge()

    async def cancel(self, response_id: str) -> None:
        self._on_cancel(response_id)


class RedisDispatch:
    """API replicas and workers joined by Redis, in `shards` (`redisconn.Layout`: 1 on one
    server, 8 by default on a cluster, each on a hash slot of its own so no master carries
    all of the queue).

    Shard k has a stream `runs(k)` (group `workers`; entries `r`=id, `t`=tenant), the
    deferred class `later(k)` (a sorted set of `id tenant` by `start_by`: a member is taken
    once, by whoever removes it), and the channels `cancel(k)` (message = response id) and
    `ring(k)` (a `soonest` entry was just added). A response goes to the shard of its id.
    A worker takes one entry per free run slot: it sweeps the shards (from a rotating
    start, so none starves), and when all are empty waits for a ring, at most a second,
    before sweeping again (a ring lost in an outage costs that second). Any process hears
    every cancel and ring (one connection per master).
    """

    remote = True
    GROUP = "workers"
    WAIT = 1.0  # seconds an idle worker waits for a ring before sweeping every shard

    def __init__(self, url: str, prefix: str, consumer: str) -> None:
        self._target = redisconn.parse(url)
        self._layout = layout = redisconn.Layout(prefix, self._target)
        # Short timeouts: a request during a Redis outage gets a 503, never a hang.
        self._timeouts: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
        self._redis = redisconn.connect(self._target, **self._timeouts)
        self._consumer = consumer
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self._ready: set[int] = set()  # shards whose group this process has made
        self._next = 0  # the shard a sweep starts from
        self._rung: set[int] = set()
        self._ring = asyncio.Event()
        self._channels: dict[str, tuple[str, int]] = {}
        self.may_defer: Callable[[], bool] = lambda: True
        self._submits: Rounds[tuple[str, str, float | None], None] = Rounds(
            self._submit_round, "tether-dispatch-submits"
        )
        for k in range(layout.shards):
            self._channels[layout.cancel(k)] = ("cancel", k)
            self._channels[layout.ring(k)] = ("ring", k)

    async def open(self, on_cancel: OnCancel) -> None:
        # A task owned by this object, not a task group: open() and close() may run in
        # different tasks, and a task group must be left by the task that entered it.
        # close() cancels it and awaits it.
        self._listener = asyncio.create_task(
            self._listen(on_cancel), name="tether-dispatch-cancels"
        )

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        # redis-py can swallow a cancellation (one landing in a connect attempt): the
        # listener's loops also stop on `_closing`.
        self._closing = True
        await self._submits.close()
        if listener is not None:
            listener.cancel()
            # asyncio.wait raises nothing of the listener's own: the only cancellation
            # caught is the one just caused. A cancel of close()'s caller propagates.
            await asyncio.wait([listener])
        await self._redis.aclose()

    async def submit(self, response_id: str, tenant: str, start_by: float | None = None) -> None:
        await self._submits.call((response_id, tenant, start_by))

    async def _submit_round(self, batch: list[tuple[str, str, float | None]]) -> list[None]:
        """Submits in one pipeline (`Rounds`): a burst of creates used to open one
        connection each, until redis-py's pool refused them (`MaxConnectionsError`:
        503s, and responses ended as not queued). One ring per shard that got work."""
        layout = self._layout
        rung: set[int] = set()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for response_id, tenant, start_by in batch:
                    k = layout.shard(response_id)
                    if start_by is not None:
                        # A member once: queued again (lease recovery), it keeps one entry.
                        pipe.zadd(layout.later(k), {f"{response_id} {tenant}": start_by})
                        continue
                    pipe.xadd(
                        layout.runs(k),
                        {"r": response_id, "t": tenant},
                        maxlen=100_000,
                        approximate=True,
                    )
                    rung.add(k)
                for k in sorted(rung):
                    pipe.execute_command(layout.publish, layout.ring(k), str(k))
                await pipe.execute()
        except redisconn.ERRORS as exc:
            raise StoreUnavailable(f"run queue unreachable: {exc}") from exc
        return [None] * len(batch)

    async def take(self) -> tuple[str, str]:
        every = range(self._layout.shards)
        shards: Iterable[int] = every
        while True:
            try:
                self._rung.clear()  # rings heard from here on count
                self._ring.clear()
                got = await self._sweep(shards, time.time(), soonest=True)
                if got is not None:
                    return got
                shards = await self._rang(self.WAIT)
                if not shards:
                    # No `soonest` work came for a second: a deferred response may run
                    # (unless this process's deferred runs hold their share of slots).
                    if self.may_defer():
                        got = await self._sweep(every, None, soonest=False)
                        if got is not None:
                            return got
                    shards = every
            except redisconn.ERRORS as exc:
                log.warning("run queue unreachable (%s); retrying", exc)
                self._ready.clear()
                shards = every
                await asyncio.sleep(0.5)

    async def _sweep(
        self, shards: Iterable[int], due: float | None, soonest: bool
    ) -> tuple[str, str] | None:
        """One take from the first of `shards` (from the rotating start) that has work:
        a deferred entry due by `due` (any, if None), else (if `soonest`) a stream entry."""
        from redis.exceptions import ResponseError

        order = sorted(shards, key=lambda k: (k - self._next) % self._layout.shards)
        self._next = (self._next + 1) % self._layout.shards
        layout = self._layout
        for k in order:
            if soonest and k not in self._ready:
                await self._create_group(k)
            args = ("+inf" if due is None else repr(due), self.GROUP, self._consumer)
            try:
                popped: Any = await self._redis.eval(
                    _TAKE, 2, layout.later(k), layout.runs(k), *args, "1" if soonest else "0"
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._ready.discard(k)  # Redis restarted empty: make the group again
                continue
            if popped:
                rid, tenant = popped.decode().split(" ", 1)
                return rid, tenant
        return None

    async def _rang(self, timeout: float) -> set[int]:
        """The shards rung since the last sweep began, waiting up to `timeout` for one."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ring.wait(), timeout)
        rung, self._rung = self._rung, set()
        self._ring.clear()
        return rung

    async def _create_group(self, k: int) -> None:
        from redis.exceptions import ResponseError

        try:
            # From id 0: entries submitted before the group existed are runs too.
            await self._redis.xgroup_create(self._layout.runs(k), self.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready.add(k)

    def nudge(self) -> None:
        pass  # an idle take sweeps every shard each `WAIT` anyway

    async def cancel(self, response_id: str) -> None:
        layout = self._layout
        channel = layout.cancel(layout.shard(response_id))
        try:
            await self._redis.execute_command(layout.publish, channel, response_id)
        except redisconn.ERRORS as exc:
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
        def heard(channel: str, data: bytes) -> None:
            kind, k = self._channels.get(channel, ("", 0))
            if kind == "cancel":
                on_cancel(data.decode())
            elif kind == "ring":
                self._rung.add(k)
                self._ring.set()

        lost_at: float | None = None

        def ready() -> None:
            nonlocal lost_at
            if lost_at is not None:
                log.info("cancel channel back after %.1f s", time.monotonic() - lost_at)
                lost_at = None

        while not self._closing:
            try:
                await redisconn.subscribe(
                    self._redis,
                    self._target,
                    list(self._channels),
                    heard,
                    ready,
                    lambda: self._closing,
                    self._timeouts,
                )
            except* (*redisconn.ERRORS, TimeoutError) as lost:
                if lost_at is None:
                    log.warning("cancel channel lost (%s); resubscribing", lost.exceptions[0])
                    lost_at = time.monotonic()
            await redisconn.refresh(self._redis)
            await asyncio.sleep(0.5)
