"""The PostgreSQL store's appends: group-committed, numbered by the writer, outage-proof.

Every append made during one turn of the event loop (and, while a round is in flight,
until it returns) goes into ONE statement for all responses (`pg_sql.APPEND`: arrays
`unnest`ed into a data-modifying CTE). The writer holds the run token, so the store
numbers events itself from the `last_seq` it last wrote (`seqs`); the CAS on `last_seq`
proves the number right, and a miss makes it look again. Readers only ever see committed
events: the live log (`livelog.py`) is fed after each commit.

Appends ride out an outage of up to `RETRY_FOR` seconds: the round in flight is resolved
against the log once the database answers (written, or not: never twice) and written in
order with what followed. A run whose batch could not be resolved or written in time is
stopped (its next `append` or `finish` raises), so a log never has a hole.

One flusher task commits the rounds, from `start` (the store's `open`) to `stop` (its
`close`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg

from tether import metrics
from tether.store import pg_sql as sql
from tether.store.base import StoreUnavailable
from tether.store.common import LIVE, Pending, Recent, numbered, start, stop
from tether.store.livelog import LiveLog
from tether.store.pg_pool import OP_TIMEOUT, Database

log = logging.getLogger("tether.store")

# A statement PostgreSQL rolled back to break a lock cycle with another transaction (seen
# under load: an append round and a purge or delete); being one statement, it left nothing
# behind and is simply run again.
RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)

# How long a round of appends that failed for an outage is tried again before its runs
# are given up (their responses then end from the log). A database restart takes seconds.
RETRY_FOR = 30.0
MAX_PENDING = 4096  # appended events waiting for a flush before `append` waits too


class Appends:
    """The pending appends of one store, and the task that commits them."""

    def __init__(self, db: Database, live: LiveLog) -> None:
        self.db = db
        self.live = live
        self.seqs: dict[str, tuple[str, int]] = {}  # response -> (run token, last seq)
        self.fenced = Recent()
        self.failed = Recent()  # runs whose batch could not be written, and why
        self._pending: dict[str, Pending] = {}
        self._pending_events = 0
        self._flusher: asyncio.Task[None] | None = None
        self._queued = asyncio.Event()  # set by `append`: the flusher has work
        self._flushed = asyncio.Event()  # set (and replaced) at the end of each round
        self._rounds_begun = self._rounds_done = 0

    def start(self) -> None:
        self._flusher = start(self._flush_rounds(), "tether-postgres-flusher")

    async def stop(self) -> None:
        """Commit what is pending (for at most `OP_TIMEOUT`), then stop the flusher."""
        if self._flusher is None:
            return
        try:
            await self.flush()
        except StoreUnavailable as exc:  # the round in flight is given up
            log.warning("closing with appends not written: %s", exc)
        await stop([self._flusher], OP_TIMEOUT)
        self._flusher = None
        self._flushed.set()  # appends waiting for a round wait no more

    def check(self, response_id: str, run_token: str) -> None:
        """Raise if some of this run's appends could not be written."""
        key = (response_id, run_token)
        if key in self.failed:
            raise _failure(self.failed[key])

    async def append(
        self,
        response_id: str,
        run_token: str,
        events: list[dict[str, Any]],
        tokens: int,
        input_tokens: int | None,
    ) -> bool:
        """`Store.append`."""
        key = (response_id, run_token)
        # Cancel-atomic: every wait comes first, and the enqueue after it does not yield,
        # so a cancel at a wait leaves nothing enqueued (and the run counts no tokens).
        while True:
            if key in self.fenced:
                return False
            self.check(response_id, run_token)
            if self._flusher is None:  # closed (or never opened): nothing would write it
                raise StoreUnavailable("the store is closed")
            pending = self._pending.get(response_id)
            if pending is not None and pending.run_token != run_token:
                await self.flush()  # a new run of the same response: the old one's first
            elif self._pending_events and self._pending_events + len(events) > MAX_PENDING:
                await self._flushed.wait()  # back-pressure: the database is slower
            else:
                break
        if pending is None:
            pending = self._pending[response_id] = Pending(run_token)
        pending.add(events, tokens, input_tokens)
        self._pending_events += len(events)
        self._queued.set()
        return True

    async def flush(self) -> None:
        """Wait until every append made so far is committed (or has failed). Only the
        rounds holding them: under steady load the flusher is never idle. A round that
        rides out an outage keeps this waiting: `StoreUnavailable` after `OP_TIMEOUT`."""
        target = self._rounds_begun + (1 if self._pending else 0)
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                while self._rounds_done < target:
                    await self._flushed.wait()
        except TimeoutError as exc:
            raise StoreUnavailable("appends are waiting for PostgreSQL") from exc

    async def _flush_rounds(self) -> None:
        """The flusher: while appends are pending, commit them, one statement per round."""
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._pending:
                await self._round()

    async def _round(self) -> None:
        """Commit the pending appends; a failure goes to the runs they belong to."""
        batch, self._pending = self._pending, {}
        self._pending_events = 0
        self._rounds_begun += 1
        todo = {
            rid: p for rid, p in batch.items() if p.events or p.tokens or p.input_tokens is not None
        }
        try:
            try:
                await self._commit(todo)
            except StoreUnavailable:
                await self._retry(todo)
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable):
                log.exception("append failed")
            for response_id, pending in todo.items():
                self.failed.add((response_id, pending.run_token), exc)
        self._rounds_done += 1
        self._flushed.set()
        self._flushed = asyncio.Event()

    async def _commit(self, todo: dict[str, Pending]) -> None:
        """Append `todo`'s batches; each one committed (or fenced out) leaves `todo`."""
        for _ in range(10):
            if not todo:
                return
            unknown = [
                rid for rid, p in todo.items() if self.seqs.get(rid, ("", 0))[0] != p.run_token
            ]
            if unknown:
                await self._learn_seqs(unknown, todo)
            rows = []
            for rid in sorted(todo):  # one lock order for every process's flushes
                p = todo[rid]
                first = self.seqs[rid][1] + 1
                rows.append((rid, p, first, numbered(first, p.events)))
            arrays = sql.batch_columns(rows)
            try:
                async with metrics.append_timer(), self.db.conn() as con:
                    matched = {r[0] for r in await con.fetch(sql.APPEND, *arrays)}
            except RETRYABLE:
                continue  # the statement was rolled back whole: the same round again
            for rid, p, _, entries in rows:
                if rid in matched:
                    if entries:
                        self.seqs[rid] = (p.run_token, entries[-1].seq)
                        self.live.committed(rid, entries)
                    del todo[rid]
                else:
                    self.seqs.pop(rid, None)  # fenced, ended, or a stale seq: look again
        raise RuntimeError(f"appends kept missing: {sorted(todo)}")

    async def _retry(self, todo: dict[str, Pending]) -> None:
        """Ride out an outage for a round whose statement failed: find out which batches
        it wrote after all (the run holds the token, so the log grew by exactly its events
        or not at all), and append the rest when the database is back. Until then new
        appends wait in the next round, in order."""
        deadline = time.monotonic() + RETRY_FOR
        while todo:
            await asyncio.sleep(0.25)
            try:
                rows = await self.db.query(
                    "fetch",
                    f"SELECT id, run_token, last_seq FROM responses WHERE id = ANY($1) AND {LIVE}",
                    list(todo),
                )
                self._resolve(todo, {r[0]: (r[1], int(r[2])) for r in rows})
                await self._commit(todo)
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise

    def _resolve(self, todo: dict[str, Pending], found: dict[str, tuple[str, int]]) -> None:
        for rid, p in list(todo.items()):
            now = found.get(rid)
            cached = self.seqs.get(rid)
            if now is None or now[0] != p.run_token:
                self.fenced.add((rid, p.run_token))  # ended or fenced meanwhile
                del todo[rid]
            elif cached is None or cached[0] != p.run_token:
                continue  # not numbered yet, so not written: `_commit` appends it
            elif now[1] == cached[1] and (p.events or not p.tokens):
                continue  # not written: `_commit` appends it
            elif p.events and now[1] == cached[1] + len(p.events):
                entries = numbered(cached[1] + 1, p.events)  # written: as it was
                self.seqs[rid] = (p.run_token, now[1])
                self.live.committed(rid, entries)
                del todo[rid]
            else:
                # A count without events leaves no trace to tell if it was written: this
                # run stops, and its response ends from what the log holds.
                self.failed.add(
                    (rid, p.run_token), StoreUnavailable(f"{rid}: a lost write cannot be resolved")
                )
                del todo[rid]

    async def _learn_seqs(self, ids: list[str], todo: dict[str, Pending]) -> None:
        """Where each run's log stands; runs no longer current are fenced out."""
        rows = await self.db.query(
            "fetch",
            f"SELECT id, run_token, last_seq FROM responses WHERE id = ANY($1) AND {LIVE}",
            ids,
        )
        current = {r[0]: (r[1], r[2]) for r in rows}
        for rid in ids:
            token = todo[rid].run_token
            found = current.get(rid)
            if found is not None and found[0] == token:
                self.seqs[rid] = (token, found[1])
            else:
                self.fenced.add((rid, token))
                del todo[rid]


def _failure(exc: BaseException | None) -> Exception:
    if isinstance(exc, StoreUnavailable):
        return StoreUnavailable(f"an earlier append of this run was not written: {exc}")
    return RuntimeError(f"an earlier append of this run failed: {exc!r}")
