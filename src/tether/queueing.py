"""How a response that nobody runs yet waits for a run: in the dispatch's queue, in its
completion window's class (`tether.schedule`), under a lease that says who keeps it.

One process (`LocalDispatch`) keeps the leases of what it queued and renews them
(`tether.leases`); scaled out nobody does, so an unclaimed response's lease runs out and
any process queues it again (a queue entry lost with Redis comes back).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tether import schedule
from tether.config import Settings
from tether.dispatch import Dispatch
from tether.runspec import RunSpec
from tether.store.base import Record


class Queueing:
    def __init__(self, dispatch: Dispatch, settings: Settings, owner: str) -> None:
        self.dispatch = dispatch
        self.settings = settings
        self.owner = owner
        # Responses this process submitted to its local queue and no run took yet: it
        # keeps their leases (scaled out, nobody does: `owner_of_queued`).
        self.queued: set[str] = set()
        #: told the model of each interactive response queued (the worker sets it to its
        #: engine's `Pausing.expect`: deferred decoding pauses before the run arrives)
        self.expect: Callable[[str], None] = lambda model: None

    def owner_of_queued(self) -> str | None:
        """Who keeps the lease of a response nobody runs yet: this process when it is
        the only one; nobody when scaled out."""
        return None if self.dispatch.remote else self.owner

    def lease(self, spec: RunSpec, created_at: float) -> float:
        """The lease of a response nobody runs yet. Scaled out nobody renews it, and
        whoever finds it run out queues the response again: a deferred one waits in its
        queue until shortly before its deadline, not one lease at a time."""
        lease = time.time() + self.settings.lease_timeout
        start_by = schedule.start_by(created_at, spec.window, self.settings.window_reserve)
        if start_by is None or not self.dispatch.remote:
            return lease
        return max(lease, start_by - self.settings.lease_timeout)

    def start_by(self, run: dict[str, Any], created_at: float) -> float | None:
        """When a queued response must start at the latest (None: `soonest`)."""
        window = schedule.window_of(run)
        return schedule.start_by(created_at, window, self.settings.window_reserve)

    async def submit(self, record: Record) -> None:
        """Queue a response for a run, in its completion window's class; locally, this
        process keeps its lease meanwhile."""
        rid = record.id
        if not self.dispatch.remote:
            self.queued.add(rid)
        start_by = self.start_by(record.run, record.snapshot["created_at"])
        if start_by is None and not self.dispatch.remote:  # scaled out: at its take
            self.expect(record.snapshot["model"])
        try:
            await self.dispatch.submit(rid, record.tenant, start_by)
        except BaseException:
            self.queued.discard(rid)
            raise
