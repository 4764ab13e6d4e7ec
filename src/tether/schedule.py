"""Completion windows: which queued response runs next.

`background_options.completion_window` (OpenAI) puts a background response in a class:
`soonest` (the default) runs as soon as a run slot is free; `2h` and `8h` are *deferred*:
they run only when no `soonest` work waits, and each has a start deadline, `start_by`,
before which it must start so that it can still end inside its window. A deferred
response whose `start_by` has passed goes ahead of `soonest` work: a deadline scheduler
(earliest deadline first among the deferred).

`start_by` is the response's creation time plus its window, less a reserve for the run
itself (`Settings.window_reserve`). It is computed from the stored record (`start_by`),
so any process that queues the response again (lease recovery, a restart) gives it the
same deadline.

A process also caps the run slots deferred responses hold at once (`Settings.deferred_slots`,
by default half of them), so that interactive work always finds a free slot; the
embedded engine pauses a deferred response's decoding while an interactive one decodes
(`Generation.defer_until`), so a deferred run that holds a slot does not slow it, and
with such an engine a deferred run lends its slot to interactive work until its deadline
(preemption, `worker.Worker`: with one slot, an interactive response does not wait for it).

`RunQueue` is the in-memory queue of one process (`dispatch.LocalDispatch`); scaled out,
`dispatch.RedisDispatch` keeps the deferred class in a sorted set by the same rule.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Any

#: the deferred windows, in seconds (`soonest` has none)
WINDOWS = {"2h": 7_200.0, "8h": 28_800.0}


def window_of(run: dict[str, Any]) -> str:
    """The completion window of a stored run spec (`RunSpec.encode`)."""
    return str(run.get("window") or "soonest")


def start_by(created_at: float, window: str, reserve: float) -> float | None:
    """When a response created at `created_at` in `window` must start at the latest
    (None: `soonest`, it never waits on purpose). At least half the window is left to
    wait, whatever the reserve: a reserve larger than the window would make every
    deferred response urgent at once."""
    seconds = WINDOWS.get(window)
    if seconds is None:
        return None
    return created_at + max(seconds - reserve, seconds / 2)


class RunQueue:
    """The queue of one process: `soonest` entries first in, first out; deferred ones by
    deadline, taken when no `soonest` entry waits or once their deadline has come."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._soonest: deque[tuple[str, str]] = deque()
        self._deferred: list[tuple[float, int, str, str]] = []  # a heap by deadline
        self._order = 0  # ties keep submission order
        self._ready = asyncio.Event()
        #: whether a deferred entry that is not due may be taken now (the worker's cap
        #: on the run slots deferred responses hold: `worker.Worker`)
        self.may_defer: Callable[[], bool] = lambda: True

    def put(self, response_id: str, tenant: str, start_by: float | None = None) -> None:
        if start_by is None:
            self._soonest.append((response_id, tenant))
        else:
            self._order += 1
            heapq.heappush(self._deferred, (start_by, self._order, response_id, tenant))
        self._ready.set()

    def take_nowait(self) -> tuple[str, str] | None:
        """The next entry, or None when there is none to take now."""
        deferred = self._deferred
        if deferred and (
            deferred[0][0] <= self._clock() or (not self._soonest and self.may_defer())
        ):
            _, _, rid, tenant = heapq.heappop(deferred)
            return rid, tenant
        if self._soonest:
            return self._soonest.popleft()
        return None

    def nudge(self) -> None:
        """Look again: what `may_defer` says may have changed."""
        self._ready.set()

    async def take(self) -> tuple[str, str]:
        while True:
            entry = self.take_nowait()
            if entry is not None:
                return entry
            self._ready.clear()
            await self._ready.wait()

    def waiting(self) -> dict[str, int]:
        """How many entries wait, by class (`soonest`, `deferred`)."""
        return {"soonest": len(self._soonest), "deferred": len(self._deferred)}
