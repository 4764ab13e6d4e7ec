"""Live event logs of the scaled-out store: Redis Streams, pub/sub wake-ups, a local cache.

PostgreSQL holds every event durably; this module only makes them fast to follow from any
process. After each Postgres commit the writer calls `committed()`: the batch goes into
the process's cache at once (local readers wake without a round trip) and, in the
background, to Redis — one stream entry per batch at `Layout.log(id)` (`{prefix}:log:{id}`;
on a Redis Cluster the id is a hash tag, so a response's log lives on one master; entry id
`{last_seq}-1`, fields `f` first seq, `t` "\n"-joined types, `d` "\n"-joined JSON), then one
wake-up `{"id": last_seq, ...}` per flush and wake shard (`Layout.wake(k)`, the shard of each
id: one channel on one server, `PUBLISH`; `shards` channels on a cluster, `SPUBLISH`, so no
master carries every wake-up), all in one pipeline. Every process subscribes to every wake
channel (`redisconn.subscribe`: one connection per master).

Nothing here is needed for correctness, only for speed: a read that Redis cannot prove
complete (stream missing, a gap, shorter than `upto`) is served from Postgres, and while
Redis or the subscription is down, waits turn into polls. So a Redis restart, `FLUSHALL`
or the failover of a cluster master (whose replica may lack the last batches it
acknowledged: a gap, or a stream shorter than the record) costs latency, never an event.

The cache (`logcache.py`: per response, contiguous, bounded in bytes) lets N local
readers of one response cost one Redis call per batch. A caught-up reader is answered
"nothing new" without a call only while the cache is *trusted*: the subscription (to every
wake channel) has been up without a break since the tail was last fetched (same `_epoch`),
and no wake-up announced a later seq (`_known`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tether import redisconn
from tether.store.base import LogEntry
from tether.store.common import Waiters, start, stop
from tether.store.logcache import DEFAULT_BUDGET, LogCache, Tail
from tether.wire import TERMINAL_EVENTS

log = logging.getLogger("tether.store")

LIVE_TTL = 3600  # seconds a live response's stream outlives its last append
FINISHED_TTL = 300  # seconds a finished log stays in Redis (Postgres keeps it for retention)
POLL = 0.25  # seconds between polls while wake-ups cannot be trusted
DOWN_FOR = 1.0  # after a Redis error, seconds to go straight to Postgres
CLOSE_WITHIN = 5.0  # seconds `close` waits for its tasks (a round of theirs: see `close`)
# Reads from Redis in flight at once, per process. redis-py's pool holds 100 connections
# and refuses the 101st at once (`MaxConnectionsError`); a burst of readers (1,000 streams
# opened together) used to hit that, mark Redis down, and send every read to Postgres for
# `DOWN_FOR`. Past this many, a read waits for a turn: each holder finishes within the
# socket timeout, and a Redis that stops answering is marked down by the first of them.
READS = 48

Durable = Callable[[str, int], Awaitable[list[LogEntry]]]


class LiveLog:
    def __init__(self, url: str, prefix: str, cache_bytes: int = DEFAULT_BUDGET) -> None:
        self.url = url
        self.prefix = prefix
        self.target = redisconn.parse(url)
        self.layout = redisconn.Layout(prefix, self.target)
        self.channels = [self.layout.wake(k) for k in range(self.layout.shards)]
        # Short timeouts and no retries: a Redis problem must turn into a Postgres read
        # within a second or two, not into a stalled reader.
        self._timeouts: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0}
        self.redis = redisconn.connect(self.target, **self._timeouts, retry=Retry(NoBackoff(), 0))
        self.stats = {"redis_reads": 0, "durable_reads": 0, "cache_reads": 0, "published": 0}
        self._known: dict[str, int] = {}  # highest committed seq heard of, for cached ids
        self.cache = LogCache(cache_bytes, on_evict=self._unknown)
        self._fetching: dict[str, asyncio.Future[None]] = {}
        self._reads = asyncio.Semaphore(READS)
        self._waiters = Waiters()
        self._epoch = 0
        self._healthy = False  # subscribed, and heard from Redis recently
        self._ready = asyncio.Event()  # subscribed once
        self._down_until = 0.0
        self._queue: list[tuple[str, list[LogEntry], bool]] = []
        self._queued = asyncio.Event()
        self._drained = asyncio.Event()  # nothing queued, in flight or to resync
        self._drained.set()
        self._unsynced: dict[str, int] = {}  # ids whose stream missed a batch -> last seq
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    def key(self, response_id: str) -> str:
        return self.layout.log(response_id)

    @property
    def healthy(self) -> bool:
        """Subscribed to wake-ups and hearing from Redis: caught-up readers trust the cache."""
        return self._healthy

    async def drained(self, timeout: float = 5.0) -> None:
        """Wait until every committed batch is in Redis (TimeoutError if Redis is away)."""
        await asyncio.wait_for(self._drained.wait(), timeout)

    async def open(self) -> None:
        """Start the subscriber and the publisher (stopped by `close`). Redis may be
        down: the store then works from Postgres until it is back."""
        self._tasks = [
            start(self._listen(), "tether-livelog-listen"),
            start(self._publish(), "tether-livelog-publish"),
        ]
        # Start trusted if Redis answers at once; else start polling and catch up later.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), DOWN_FOR)

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):  # let queued batches reach Redis
            await self.drained(DOWN_FOR)
        # redis-py can swallow a cancellation (e.g. one landing in a connect attempt),
        # so the loops also stop on `_closing`: within one round of theirs, a few seconds
        # at most (Redis's socket timeouts).
        self._closing = True
        await stop(self._tasks, CLOSE_WITHIN)
        self._tasks = []
        self._waiters.wake_all()
        await self.redis.aclose()

    # --- writes ----------------------------------------------------------------------

    def committed(self, response_id: str, entries: list[LogEntry], terminal: bool = False) -> None:
        """`entries` (contiguous) were just committed to Postgres: cache them, wake local
        readers, and queue them for Redis."""
        if not entries:
            return
        last = entries[-1].seq
        cache = self.cache
        tail = cache.peek(response_id)
        if tail is not None:
            if entries[0].seq == tail.end + 1:
                cache.grow(tail, entries)
            self._known[response_id] = max(self._known.get(response_id, -1), last)
        elif entries[0].seq == 0:
            # A new response: no other process can have written to it before this commit,
            # so the tail is as trustworthy as the subscription is now.
            cache.put(response_id, Tail(0, list(entries), self._epoch if self._healthy else -1))
        if terminal:
            cache.finished(response_id)
        self._waiters.wake(response_id, last)
        self._queue.append((response_id, entries, terminal))
        self._queued.set()
        self._drained.clear()

    async def forget(self, response_id: str) -> None:
        """A deleted response: drop it here and in Redis (best effort)."""
        self.cache.pop(response_id)
        self._unknown(response_id)
        if not self._down():
            try:
                await self.redis.delete(self.key(response_id))
            except redisconn.ERRORS:
                self._mark_down()

    # --- reads -----------------------------------------------------------------------

    async def read(
        self, response_id: str, after: int, upto: int | None, durable: Durable
    ) -> list[LogEntry]:
        """Committed events with `seq > after`: from the cache, else Redis, else
        `durable` (Postgres). At least up to `upto` when given."""
        need = after if upto is None else max(after, upto)
        for _ in range(3):  # wait for at most a few other readers' fetches, then fetch
            tail = self.cache.get(response_id)
            if tail is not None and tail.first <= after + 1 <= tail.end + 1:
                if tail.end > after and tail.end >= need:
                    self.stats["cache_reads"] += 1
                    return tail.entries[after + 1 - tail.first :]
                if (
                    tail.end == after == need
                    and self._trusted(tail)
                    and self._known.get(response_id, -1) <= after
                ):
                    self.stats["cache_reads"] += 1
                    return []
            pending = self._fetching.get(response_id)
            if pending is None:
                break
            await asyncio.shield(pending)
        return await self._fetch(response_id, after, need, durable)

    async def _fetch(
        self, response_id: str, after: int, need: int, durable: Durable
    ) -> list[LogEntry]:
        tail = self.cache.peek(response_id)
        # A tail that starts at or before the cursor is extended from its end (even if it
        # ends before the cursor), so the cache catches up instead of being bypassed.
        extend = tail is not None and tail.first <= after + 1
        start = tail.end + 1 if extend and tail is not None else after + 1
        epoch = self._epoch
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        mine = response_id not in self._fetching
        if mine:  # wake-ups heard while this fetch runs must count (see `_heard`)
            self._fetching[response_id] = done
        try:
            entries: list[LogEntry] | None = None
            if not self._down():
                entries = await self._xrange(response_id, start - 1)
                if entries is not None and (entries[-1].seq if entries else start - 1) < need:
                    entries = None  # Redis lags behind the record: Postgres has it
            if entries is None:
                self.stats["durable_reads"] += 1
                entries = await durable(response_id, start - 1)
            else:
                self.stats["redis_reads"] += 1
            trusted = epoch == self._epoch and self._healthy
            self._merge(response_id, start, entries, epoch if trusted else -1)
        finally:
            if mine:
                del self._fetching[response_id]
                done.set_result(None)
        if start == after + 1:
            return entries
        tail = self.cache.peek(response_id)
        if tail is None or not tail.first <= after + 1 <= tail.end + 1:
            return [e for e in entries if e.seq > after]
        return tail.entries[after + 1 - tail.first :]  # (empty if the log ends before)

    async def _xrange(self, response_id: str, after: int) -> list[LogEntry] | None:
        """Events after `after` from the stream, or None if it cannot prove them
        complete: no stream (flushed, expired, never written) or a gap."""
        key = self.key(response_id)
        async with self._reads:
            if self._down():  # marked down while this read waited for its turn
                return None
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.xrange(key, min=f"{after + 1}-0")
                    pipe.exists(key)
                    items, exists = await pipe.execute()
            except redisconn.ERRORS:
                self._mark_down()
                return None
        if not exists:
            return None
        entries: list[LogEntry] = []
        expect = after + 1
        for _, fields in items:
            first = int(fields[b"f"])
            if first > expect:
                return None  # a batch never reached Redis (outage, or a race of writers)
            # Interned: a cached entry then shares its type's one string.
            kinds = [sys.intern(k) for k in fields[b"t"].decode().split("\n")]
            for seq, kind, data in zip(
                range(first, first + len(kinds)), kinds, fields[b"d"].split(b"\n"), strict=True
            ):
                if seq >= expect:
                    entries.append(LogEntry(seq, kind, data))
            expect = max(expect, first + len(kinds))
        return entries

    def _merge(self, response_id: str, start: int, entries: list[LogEntry], epoch: int) -> None:
        """Put fetched events `start..` (complete as of the fetch) into the cache."""
        cache = self.cache
        tail = cache.peek(response_id)
        if tail is not None and tail.first <= start <= tail.end + 1:
            cache.grow(tail, entries[tail.end + 1 - start :])
            tail.epoch = epoch
        elif tail is None or (start < tail.first and start + len(entries) >= tail.first):
            rest = [] if tail is None else tail.entries[start + len(entries) - tail.first :]
            cache.put(response_id, Tail(start, entries + rest, epoch))
        if entries and entries[-1].type in TERMINAL_EVENTS:
            cache.finished(response_id)

    async def wait(self, response_id: str, after: int, timeout: float) -> None:
        """Return when events past `after` are committed (as heard from this process's
        writes or a wake-up), or after `timeout`. Polls every `POLL` s while wake-ups
        cannot be trusted."""
        tail = self.cache.peek(response_id)
        if tail is None or not self._trusted(tail):
            timeout = min(timeout, POLL)
        elif max(tail.end, self._known.get(response_id, -1)) > after:
            return
        await self._waiters.wait(response_id, after, timeout)

    def waiting(self, response_id: str) -> int:
        """How many readers of this process wait on `response_id` now (`wait`)."""
        return self._waiters.waiting(response_id)

    # --- cache -----------------------------------------------------------------------

    def _trusted(self, tail: Tail) -> bool:
        return self._healthy and tail.epoch == self._epoch

    def _unknown(self, response_id: str) -> None:
        """`response_id` left the cache: wake-ups about it need not be remembered."""
        self._known.pop(response_id, None)

    def _heard(self, payload: bytes) -> None:
        """A wake-up from some process's flush: `{response id: last seq}`."""
        try:
            batch: dict[str, int] = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        for response_id, last in batch.items():
            if response_id in self.cache or response_id in self._fetching:
                self._known[response_id] = max(self._known.get(response_id, -1), last)
            self._waiters.wake(response_id, last)

    # --- Redis health ----------------------------------------------------------------

    def _down(self) -> bool:
        return time.monotonic() < self._down_until

    def _mark_down(self) -> None:
        self._down_until = time.monotonic() + DOWN_FOR

    def _set_healthy(self, healthy: bool) -> None:
        """Every change ends the trust in cached tails (wake-ups may have been missed),
        and wakes every waiter, so readers look again now rather than at their timeout."""
        if healthy != self._healthy:
            self._healthy = healthy
            self._epoch += 1
            self._waiters.wake_all()

    async def _listen(self) -> None:
        """One subscription per process, to every wake channel (one connection per
        master on a cluster)."""

        lost_at: float | None = None

        def ready() -> None:
            self._set_healthy(True)
            self._ready.set()
            if lost_at is not None:
                log.info("Redis subscription back after %.1f s", time.monotonic() - lost_at)

        while not self._closing:
            try:
                await redisconn.subscribe(
                    self.redis,
                    self.target,
                    self.channels,
                    lambda _, data: self._heard(data),
                    ready,
                    lambda: self._closing,
                    self._timeouts,
                )
            except* (*redisconn.ERRORS, TimeoutError) as lost:
                if self._healthy:
                    log.warning("Redis subscription lost (%s); polling", lost.exceptions[0])
            if self._healthy:
                lost_at = time.monotonic()
            self._set_healthy(False)
            if not self._closing:
                await redisconn.refresh(self.redis)
                await asyncio.sleep(POLL)  # reconnect interval

    async def _publish(self) -> None:
        """Move committed batches to Redis in order, one pipeline per round."""
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queued.wait(), DOWN_FOR)
            self._queued.clear()
            batch, self._queue = self._queue, []
            try:
                await self._send(batch)
            finally:
                if not self._queue and not self._unsynced:
                    self._drained.set()

    async def _send(self, batch: list[tuple[str, list[LogEntry], bool]]) -> None:
        """One round: resync streams that missed batches, add `batch`, publish wake-ups."""
        if not batch and not self._unsynced:
            return
        if self._down():
            self._skip(batch)
            return
        resync = dict(self._unsynced)
        layout = self.layout
        wakes: dict[int, dict[str, int]] = {}
        for response_id, last in resync.items():
            wakes.setdefault(layout.shard(response_id), {})[response_id] = last
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                # A stream that missed a batch goes: readers then take the log from
                # Postgres (a stream must never end before the log does).
                for response_id in resync:
                    pipe.delete(self.key(response_id))
                for response_id, entries, terminal in batch:
                    key = self.key(response_id)
                    pipe.xadd(
                        key,
                        {
                            "f": entries[0].seq,
                            "t": "\n".join(e.type for e in entries),
                            "d": b"\n".join(e.data for e in entries),
                        },
                        id=f"{entries[-1].seq}-1",
                    )
                    pipe.expire(key, FINISHED_TTL if terminal else LIVE_TTL)
                    wakes.setdefault(layout.shard(response_id), {})[response_id] = entries[-1].seq
                for k, wake in wakes.items():
                    pipe.execute_command(layout.publish, layout.wake(k), orjson.dumps(wake))
                # A refused XADD (an older id: another process's later batch got
                # there first) leaves a gap, which readers detect.
                await pipe.execute(raise_on_error=False)
        except redisconn.ERRORS as exc:
            log.warning("Redis publish failed (%s); readers use Postgres", exc)
            self._mark_down()
            self._skip(batch)
            return
        for response_id in resync:
            if self._unsynced.get(response_id) == resync[response_id]:
                del self._unsynced[response_id]
        self.stats["published"] += len(batch)

    def _skip(self, batch: list[tuple[str, list[LogEntry], bool]]) -> None:
        for response_id, entries, _ in batch:
            self._unsynced[response_id] = entries[-1].seq
