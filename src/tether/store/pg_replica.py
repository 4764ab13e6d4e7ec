"""Finished logs replayed from a PostgreSQL read replica (`--db-read`).

A streaming replica applies the primary's commits in order, late. A log it shows as
finished is whole there: the terminal event is committed by the same statement that makes
the response terminal, after every append before it (`pg_sql.FINISH`). So one statement
on the replica reads the response's status and its events from one snapshot
(`pg_sql.READ_FINISHED`): terminal, and the events are the log; live, missing (not replayed
yet, or deleted) or the replica unreachable, and the caller reads the primary. No lag is
assumed, and none can show.

A replica that cannot be reached is left alone for `BACKOFF` seconds, so replays do not
wait on it each time; a query it cancels (a conflict with its recovery, as when a dropped
partition's removal is replayed) is read again from the primary.
"""

from __future__ import annotations

import logging
import time

import asyncpg

from tether.store import pg_sql as sql
from tether.store.base import LogEntry, StoreUnavailable
from tether.store.common import unpack
from tether.store.pg_pool import Database

log = logging.getLogger("tether.store")
BACKOFF = 10.0  # seconds the replica is not asked after it could not be reached


class Replica:
    def __init__(self, url: str, size: int = 10) -> None:
        self.db = Database(url, size)
        self.reads = 0  # finished logs it served
        self._down_until = 0.0

    async def open(self) -> None:
        await self.db.open(None)  # the primary migrates; the replica follows

    async def close(self) -> None:
        await self.db.close()

    async def read_finished(self, response_id: str, after: int) -> list[LogEntry] | None:
        """The events after `after` of a log the replica has finished; None: ask the
        primary."""
        if time.monotonic() < self._down_until:
            return None
        try:
            rows = await self.db.query("fetch", sql.READ_FINISHED, response_id, after)
        except StoreUnavailable as exc:
            log.warning("read replica unreachable; the primary for %.0f s: %s", BACKOFF, exc)
            self._down_until = time.monotonic() + BACKOFF
            return None
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.info("read replica refused a replay (%s): reading the primary", exc)
            return None
        if not rows or rows[0][0] != -1:
            return None  # live there, or not there (yet)
        self.reads += 1
        return unpack(rows[1:], after)
