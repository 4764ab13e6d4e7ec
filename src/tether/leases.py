"""Leases (docs/contract.md §6.2): how a response whose process died still ends.

Every live response has an owner and a lease. The `LeaseKeeper`, a daemon of each
process, renews the leases of the responses this process runs or keeps queued — only
those: a response whose run ended without its terminal transition (a store failure at the
wrong moment) is not renewed, so it expires and is ended like any lost run —, hands the
responses of owners that stopped renewing to `recover` (which `Lifecycle` decides), and
purges old logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import anyio

from tether.config import Settings
from tether.store.base import Record, Store
from tether.store.owners import OwnerLocks

log = logging.getLogger("tether.leases")
PURGE_EVERY = 60.0  # seconds between purges of logs older than the retention


class LeaseKeeper:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        owner: str,
        held: Callable[[], Iterable[str]],
        recover: Callable[[Record, bool], Awaitable[None]],
        locks: OwnerLocks | None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.owner = owner
        self.held = held  # the responses whose leases this process keeps
        self.recover = recover  # (record, its owner is proven gone)
        self.locks = locks  # the embedded store's owner locks

    async def keep(self) -> None:
        """Renew, recover and purge, every third of a lease, until cancelled."""
        lease = self.settings.lease_timeout
        last_purge = 0.0
        while True:
            try:
                now = time.time()
                await self.store.renew(self.owner, now + lease, list(self.held()))
                await self.recover_all(now)
                if now - last_purge > PURGE_EVERY:
                    await self.store.purge(now - self.settings.retention)
                    last_purge = now
            except Exception:
                log.exception("lease keeper failed; retrying")
            await anyio.sleep(lease / 3)

    async def recover_all(self, now: float) -> None:
        """Recover responses whose lease ran out, and at once those of owners proven gone
        by their lock (the embedded store, docs/contract.md §8.7: in the first round after
        a start, so a restart does not wait for the leases of the process it replaces)."""
        locks = self.locks
        gone = locks.gone() if locks is not None else []
        for rec in await self.store.expired(now, gone):
            await self.recover(rec, rec.owner in gone)
        for owner in gone:
            assert locks is not None
            locks.forget(owner)  # all it held is recovered; an error above retries
