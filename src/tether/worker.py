"""The worker: how this process takes responses and runs them.

One daemon per process that runs responses (`--workers` > 0) takes ids from the dispatch,
one per free slot, and starts each as a run in the `Runner`'s group: claim the response
with a new run token, drive the engine into its log (`tether.run`), then hand the run's
progress to `Lifecycle.conclude`, which decides the terminal transition. A run that fails
outside its engine (a store error) ends `failed` from its log (`Lifecycle.end`).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from tether import metrics, tool_loop, wire
from tether.engines.base import Pausing
from tether.run import Progress, drive
from tether.runner import Run, new_token
from tether.runspec import RunSpec
from tether.store.base import Record, StoreUnavailable, WriteLost

if TYPE_CHECKING:
    from tether.lifecycle import Lifecycle

log = logging.getLogger("tether.worker")


class Worker:
    def __init__(self, lc: Lifecycle) -> None:
        self.lc = lc
        self._slots = max(lc.workers, 1)
        # Deferred runs (`2h`/`8h`) hold at most this many slots, so that interactive
        # work finds one free (`tether.schedule`); one at least, or none would run.
        self._deferred_cap = lc.settings.deferred_slots or max(1, self._slots // 2)
        #: the runs going on, by response id: for a deferred run whose engine pauses it
        #: for interactive work, its start deadline (until then it lends its slot to an
        #: interactive run: preemption); None for any other
        self._runs: dict[str, float | None] = {}
        self._deferred: set[str] = set()
        self._freed = anyio.Event()  # a run ended: there may be room again
        lc.dispatch.may_defer = self._may_defer
        engine = lc.engine
        self._pausing = engine if isinstance(engine, Pausing) else None
        if self._pausing is not None:
            # An interactive response is announced to its engine as it is queued, so
            # deferred decoding stops before it reaches the engine (`Pausing.expect`).
            lc.queue.expect = self._pausing.expect

    def _lent(self) -> int:
        """Slots of deferred runs that interactive runs may take over now."""
        now = time.time()
        return sum(1 for until in self._runs.values() if until is not None and now < until)

    def _room(self) -> bool:
        """A response may be taken: a free slot, or one a deferred run lends (only an
        interactive response, or a deferred one due to start, takes that: `_may_defer`)."""
        return len(self._runs) < self._slots + self._lent()

    def _may_defer(self) -> bool:
        """A deferred response that is not due may start: a slot is free (not lent) and
        the deferred runs hold less than their share."""
        return len(self._runs) < self._slots and len(self._deferred) < self._deferred_cap

    async def work(self) -> None:
        """Take responses from the dispatch, one per free run slot, until cancelled.

        Preemption: a deferred run whose engine pauses it for interactive work
        (`Pausing`) lends its slot until its start deadline, so an interactive response
        that arrives while it holds the slot starts at once (beside it, paused) instead
        of waiting for it to end. (A deadline passing during a `take` may let one run
        more start than `slots`: the deferred run is then decoded beside it.)"""
        lc = self.lc
        while True:
            while not self._room():
                self._freed = anyio.Event()
                await self._freed.wait()
            try:
                rid, tenant = await lc.dispatch.take()
                # From here the run keeps the lease; if the run is not started below,
                # the lease runs out and `_recover` queues the response again.
                lc.queued.discard(rid)
                record = await lc.store.get(rid, tenant)
                if (
                    record is not None
                    and record.status in wire.LIVE_STATES
                    and rid not in lc.runner.runs
                ):
                    self._hold(record)
                    if lc.runner.start(rid, partial(self._run, record)) is None:
                        self._release(rid)
            except Exception:
                log.exception("taking a run failed; retrying")
                await anyio.sleep(0.5)

    def _hold(self, record: Record) -> None:
        """Count `record`'s run in its slot (before the next take counts them)."""
        rid, model = record.id, record.snapshot["model"]
        start_by = self.lc.queue.start_by(record.run, record.snapshot["created_at"])
        pausing = self._pausing
        if start_by is None:
            self._runs[rid] = None
            if pausing is not None and self.lc.dispatch.remote:  # see `Queueing.submit`
                pausing.expect(model)
            return
        self._deferred.add(rid)
        lends = pausing is not None and pausing.pauses_deferred(model)
        self._runs[rid] = start_by if lends else None

    def _release(self, rid: str) -> None:
        self._runs.pop(rid, None)
        self._deferred.discard(rid)
        self._freed.set()
        self.lc.dispatch.nudge()  # a deferred one may be taken again

    async def _run(self, record: Record, run: Run) -> None:
        """The body of one run, in the runner's group: claim, drive, end. The ending runs
        in `run.ending`, shielded: a cancel stops the engine, never the commit."""
        lc = self.lc
        try:
            if run.reason is not None:
                return  # cancelled before it started: the canceller ends it
            token = new_token()
            snap = {**record.snapshot, "status": "in_progress"}
            try:
                claimed = await lc.patiently(
                    lc.store.claim,
                    record.id,
                    token,
                    lc.owner,
                    time.time() + lc.settings.lease_timeout,
                    snap,
                    [wire.lifecycle_event("in_progress", snap)],
                )
            except Exception as exc:
                with run.ending:
                    await self._crashed(record, exc)
                return
            if claimed:
                run.claimed = True
                await self._drive(record, run, token, snap)
        finally:
            self._release(record.id)

    async def _drive(self, record: Record, run: Run, token: str, snap: dict[str, Any]) -> None:
        lc = self.lc
        spec = RunSpec.decode(record.run)
        start_by = lc.queue.start_by(record.run, snap["created_at"])
        if start_by is not None:
            metrics.deferred_started(time.time() <= start_by)
        request = spec.generation(record.id, snap["model"], bool(snap.get("background")), start_by)
        progress = Progress(lc.store, record.id, token, run, dict(spec.tool_names))
        progress.sealed = "reasoning.encrypted_content" in (spec.forward.get("include") or ())
        crash: Exception | None = None
        try:
            await drive(lc.engine, request, progress, tool_loop.steps(spec, lc.settings))
        except Exception as exc:
            crash = exc
        finally:
            with run.ending:
                if crash is not None:
                    await self._crashed(record, crash)
                elif not progress.fenced:  # fenced: someone else ended the response
                    await lc.conclude(record.id, token, snap, run, progress)

    async def _crashed(self, record: Record, exc: Exception) -> None:
        """A run that failed outside its engine ends `failed` from its log (its own
        account may not be the log's)."""
        lc = self.lc
        rid = record.id
        message = "The run crashed."
        if isinstance(exc, WriteLost):
            # Some of its output could not be saved (a full disk): it ends with what
            # was, once the store can write again (docs/contract.md §8.7).
            log.warning("run %s could not save its output: %s", rid, exc)
            message = "The server could not save this response's output."
        elif isinstance(exc, StoreUnavailable):
            # Part of its output may not have reached the database: it cannot go on
            # as if it had. It ends from what is in the log, once the store is back.
            log.warning("run %s lost the store: %s", rid, exc)
            message = "The database was unreachable while generating this response."
        else:
            log.error("run %s crashed", rid, exc_info=exc)
        try:
            await lc.patiently(lc.end, rid, record.tenant, "failed", message)
        except Exception:
            log.exception("ending the crashed run %s failed; its lease ends it", rid)
