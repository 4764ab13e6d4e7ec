"""The runs of this process, each in its own cancel scope, all in one task group.

A *run* is one response being generated in this process: claimed in the store, driven
(`tether.run.drive`), ended. The `Runner` owns every task the process starts for runs and
for its daemons (taking work, keeping leases) in an AnyIO task group, so nothing it starts
outlives it and every failure is logged. It decides no state: `Lifecycle` gives it the body
of each run and decides how the run ends.

Cancellation (docs/cancellation.md), stated once:
    `Runner.stop(id, reason)` cancels the run's scope (`Run.scope`). Every await inside it
    (the engine reading an upstream, sleeping, waiting for its thread or a slot) raises the
    cancellation at once; the engine stops at that token boundary and may still report what
    it had produced (in its own shielded cleanup). The scope absorbs its own cancellation, so
    the run's body goes on to its ending, which runs in `Run.ending`, a shielded scope: a
    cancel never interrupts the commit of the terminal transition. Only `close()` cuts an
    ending short (after its grace period), so a shutdown is bounded even with a dead store.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup

log = logging.getLogger("tether.runner")
Reason = Literal["cancel", "shutdown", "fenced"]
CUT_WAIT = 5.0  # seconds `close()` waits for tasks it cancelled


def new_token() -> str:
    """A fresh run token (or owner id): who may write a response's log."""
    return uuid.uuid4().hex


@dataclass(slots=True, eq=False)
class Run:
    """A run in this process: the scope a cancel cancels, why, and when it is over."""

    id: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    #: the run's ending (its terminal transition): shielded from cancels, not from `close()`
    ending: anyio.CancelScope = field(default_factory=lambda: anyio.CancelScope(shield=True))
    done: anyio.Event = field(default_factory=anyio.Event)
    claimed: bool = False  # the run won the claim: it, not a canceller, ends the response
    reason: Reason | None = None  # why it was stopped; None: it was not

    def stop(self, reason: Reason) -> None:
        """Cancel the run's scope; the first reason given is the one that counts."""
        if self.reason is None:
            self.reason = reason
            self.scope.cancel()


class Runner:
    """Owns this process's runs and daemons in one task group.

    The group is hosted by a task of its own, so `open()` and `close()` may be called from
    different tasks (an ASGI lifespan, a test). `close()` cancels the daemons, stops every
    run (`shutdown`), gives them `grace` seconds to end their responses, then cancels what
    is left, ending scopes included, and returns once every task has ended."""

    def __init__(self) -> None:
        self.runs: dict[str, Run] = {}
        self._group: TaskGroup | None = None
        self._daemons: TaskGroup | None = None
        self._host: asyncio.Task[None] | None = None
        self._closing = anyio.Event()
        self._grace = 0.0
        self._busy = 0  # tasks of the group still going (runs and spawned tasks)
        self._idle = anyio.Event()
        self.cut = False  # `close()` had to cancel tasks that did not end in their grace

    @property
    def busy(self) -> int:
        """Run and spawned tasks still going (daemons not counted)."""
        return self._busy

    async def open(self) -> None:
        ready = anyio.Event()
        # The one task not in the group: its host, awaited by `close()`.
        self._host = asyncio.get_running_loop().create_task(self._hold(ready))
        await ready.wait()

    async def _hold(self, ready: anyio.Event) -> None:
        async with anyio.create_task_group() as group:
            self._group = group
            async with anyio.create_task_group() as daemons:
                self._daemons = daemons
                ready.set()
                await self._closing.wait()
                daemons.cancel_scope.cancel()
            for run in list(self.runs.values()):
                run.stop("shutdown")
            with anyio.move_on_after(self._grace):
                await self._quiet()
            if self._busy:
                self._cut()

    def _cut(self) -> None:
        """Cancel every task of the group, run endings included."""
        self.cut = True
        for run in list(self.runs.values()):
            run.ending.cancel()
        if self._group is not None:
            self._group.cancel_scope.cancel()

    async def _quiet(self) -> None:
        while self._busy:
            self._idle = anyio.Event()
            await self._idle.wait()

    async def close(self, grace: float) -> None:
        """Stop everything (see the class docstring). The wait is bounded: a task that
        does not end within `CUT_WAIT` s of its cancellation (an engine's shielded cleanup
        that hangs) is logged and left. If this call is cancelled, everything is cut at
        once and awaited (bounded), then the cancellation goes on up."""
        host = self._host
        if host is None:
            return
        self._grace = grace
        self._closing.set()
        try:
            await asyncio.wait({host}, timeout=grace + CUT_WAIT)
        finally:
            if not host.done():
                self._cut()
                await asyncio.wait({host}, timeout=CUT_WAIT)
                if not host.done():
                    log.error("runs that did not end when cancelled: %s", list(self.runs))
            self._host = None

    # --- tasks -----------------------------------------------------------------------------

    def daemon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` until `close()`: a process-long loop (taking work, keeping leases)."""
        assert self._daemons is not None, "Runner.open() first"
        self._daemons.start_soon(_logged, fn, ())

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `fn(*args)` in the group; an exception it ends with is logged (no one else
        would see it). `close()` waits for it like for a run."""
        assert self._group is not None, "Runner.open() first"
        self._busy += 1
        self._group.start_soon(self._counted, fn, args)

    def start(self, rid: str, body: Callable[[Run], Awaitable[None]]) -> Run | None:
        """Start the run of `rid` with `body(run)`, unless one is already going."""
        if rid in self.runs:
            return None
        run = self.runs[rid] = Run(rid)
        self.spawn(self._body, run, body)
        return run

    async def _body(self, run: Run, body: Callable[[Run], Awaitable[None]]) -> None:
        try:
            await body(run)
        finally:
            run.done.set()
            self.runs.pop(run.id, None)

    async def _counted(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await _logged(fn, args)
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    def stop(self, rid: str, reason: Reason) -> Run | None:
        """Cancel the run of `rid` in this process, if there is one (see the module
        docstring); returns it."""
        run = self.runs.get(rid)
        if run is not None:
            run.stop(reason)
        return run


async def _logged(fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
    """`fn(*args)`, its exception logged rather than cancelling the whole group (one
    failed run must not stop the others). Cancellation is not an `Exception`: it goes on."""
    try:
        await fn(*args)
    except Exception:
        log.exception("background task %s failed", getattr(fn, "__qualname__", fn))
