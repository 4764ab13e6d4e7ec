"""The in-memory cache of event logs: bounded in bytes, live logs kept before finished ones.

Both stores keep the logs their readers follow in memory, so that a reader of a live
response costs no query per batch: SQLite every log this process writes, PostgreSQL +
Redis (`livelog.py`) the logs this process writes or reads. The cache is only for speed:
a log that is not in it is read from the database (or Redis).

It is bounded by `--log-cache-bytes` (`budget`): when the cached logs exceed it, finished
logs go first, least recently read first; then, if live logs alone exceed it, live ones,
least recently read first (a response nobody follows; its readers then read the
database). A finished log also goes `LINGER` seconds after it ended: late readers of a
response that just ended are served from memory, and an idle server holds nothing.

The size of a log is counted as its SSE frames' lengths plus `ENTRY_BYTES` per event,
what Python spends on each cached event beside the frame's bytes (measured with
tracemalloc: the `LogEntry` object, its `seq` int, the bytes object's header, the list
slot), so the budget is close to the memory the cache really holds.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from tether import metrics
from tether.store.base import LogEntry

LINGER = 30.0  # seconds a finished log stays cached for late readers
ENTRY_BYTES = 136  # per cached event beside its frame: object 56, int 32, bytes 37, slot 8+
TAIL_BYTES = 400  # per cached log: its Tail, list and dict slots
DEFAULT_BUDGET = 64 * 1024 * 1024


def size_of(entries: list[LogEntry]) -> int:
    """What `entries` cost in the cache, in bytes."""
    return sum([len(e.frame) for e in entries]) + ENTRY_BYTES * len(entries)


@dataclass(slots=True, eq=False)
class Tail:
    """Events `first..end` of one response, contiguous."""

    first: int
    entries: list[LogEntry] = field(default_factory=list)
    epoch: int = -1  # livelog: the subscription epoch it was synced in; -1: never trusted
    size: int = 0  # bytes counted against the budget
    finished: bool = False  # ends with the terminal event
    cached: bool = False  # in the cache (False once evicted: growing it then is a no-op)

    @property
    def end(self) -> int:
        return self.first + len(self.entries) - 1


class LogCache:
    """Cached logs by response id, in two LRU orders: live and finished."""

    def __init__(
        self, budget: int = DEFAULT_BUDGET, on_evict: Callable[[str], None] | None = None
    ) -> None:
        self.budget = budget
        self.size = 0  # bytes held, as counted
        self.evicted = 0  # logs dropped to stay within the budget (for tests and metrics)
        self._live: OrderedDict[str, Tail] = OrderedDict()
        self._done: OrderedDict[str, Tail] = OrderedDict()
        self._on_evict = on_evict
        metrics.watch_log_cache(self)

    def __len__(self) -> int:
        return len(self._live) + len(self._done)

    def __contains__(self, response_id: str) -> bool:
        return response_id in self._live or response_id in self._done

    def peek(self, response_id: str) -> Tail | None:
        """The cached log of `response_id`, or None (not marked as read)."""
        tail = self._live.get(response_id)
        return self._done.get(response_id) if tail is None else tail

    def get(self, response_id: str) -> Tail | None:
        """The cached log of `response_id` (marked as just read), or None."""
        tail = self._live.get(response_id)
        if tail is not None:
            self._live.move_to_end(response_id)
            return tail
        tail = self._done.get(response_id)
        if tail is not None:
            self._done.move_to_end(response_id)
        return tail

    def put(self, response_id: str, tail: Tail) -> None:
        """Cache `tail` (replacing what was cached for `response_id`)."""
        self.pop(response_id)
        tail.size = TAIL_BYTES + size_of(tail.entries)
        tail.cached = True
        self.size += tail.size
        if tail.finished:
            self._retire(response_id, tail)
        else:
            self._live[response_id] = tail
        if self.size > self.budget:
            self._shrink()

    def grow(self, tail: Tail, entries: list[LogEntry]) -> None:
        """Append `entries` to a cached `tail` (nothing if it was evicted meanwhile)."""
        if not tail.cached:
            return
        tail.entries.extend(entries)
        added = size_of(entries)
        tail.size += added
        self.size += added
        if self.size > self.budget:
            self._shrink()

    def finished(self, response_id: str) -> None:
        """`response_id`'s log is complete: it may go first, and goes after `LINGER` s."""
        tail = self._live.pop(response_id, None)
        if tail is None:
            return
        tail.finished = True
        self._retire(response_id, tail)

    def _retire(self, response_id: str, tail: Tail) -> None:
        self._done[response_id] = tail
        asyncio.get_running_loop().call_later(LINGER, self._expire, response_id, tail)

    def pop(self, response_id: str) -> Tail | None:
        tail = self._live.pop(response_id, None) or self._done.pop(response_id, None)
        if tail is not None:
            self._forget(tail)
        return tail

    def _expire(self, response_id: str, tail: Tail) -> None:
        if self._done.get(response_id) is tail:
            del self._done[response_id]
            self._dropped(response_id, tail)

    def _shrink(self) -> None:
        while self.size > self.budget:
            lru = self._done or self._live
            if not lru:
                return
            response_id, tail = lru.popitem(last=False)
            self.evicted += 1
            self._dropped(response_id, tail)

    def _dropped(self, response_id: str, tail: Tail) -> None:
        self._forget(tail)
        if self._on_evict is not None:
            self._on_evict(response_id)

    def _forget(self, tail: Tail) -> None:
        self.size -= tail.size
        tail.size = 0
        tail.cached = False
        # Emptied: its `_expire` timer still holds it (until LINGER), and must not hold
        # its events. (Readers hold slices of `entries`, never the list itself.)
        tail.entries = []
