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

from tether import metrics, schedule, tool_loop, wire
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
        slots = max(lc.workers, 1)
        self._slots = anyio.Semaphore(slots)
        # Deferred runs (`2h`/`8h`) hold at most this many slots, so that interactive
        # work finds one free (`tether.schedule`); one at least, or none would run.
        self._deferred_cap = lc.settings.deferred_slots or max(1, slots // 2)
        self._deferred: set[str] = set()
        lc.dispatch.may_defer = lambda: len(self._deferred) < self._deferred_cap

    async def work(self) -> None:
        """Take responses from the dispatch, one per free run slot, until cancelled."""
        lc = self.lc
        while True:
            await self._slots.acquire()
            started = False
            try:
                rid, tenant = await lc.dispatch.take()
                # From here the run keeps the lease; if the run is not started below,
                # the lease runs out and `_recover` queues the response again.
                lc.queued.discard(rid)
                record = await lc.store.get(rid, tenant)
                if record is not None and record.status in wire.LIVE_STATES:
                    if schedule.window_of(record.run) != "soonest":
                        self._deferred.add(rid)  # before the next take counts them
                    started = lc.runner.start(rid, partial(self._run, record)) is not None
                if not started:
                    self._deferred.discard(rid)
            except Exception:
                log.exception("taking a run failed; retrying")
                await anyio.sleep(0.5)
            finally:
                if not started:
                    self._slots.release()

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
            self._slots.release()
            if record.id in self._deferred:
                self._deferred.discard(record.id)
                self.lc.dispatch.nudge()  # a deferred one may be taken again

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
