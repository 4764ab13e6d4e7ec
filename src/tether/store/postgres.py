"""The scaled-out store: PostgreSQL for durable records, Redis for the hot path.

Several processes (API replicas, workers) open the same database, so no answer may come
from process memory: every race is decided by one atomic Postgres statement
(docs/contract.md §1.1, §2.3):
- `append` is a compare-and-set on the run token, the live status and `last_seq`;
- `claim`, `fence` and `finish` are compare-and-sets on the response row, and add their
  events in the same statement.
A worker that was paused past its lease and then resumes is refused by the first of
these, because the lease reaper fenced it (gave the response a new run token).

Appends are group-committed: every append made during one turn of the event loop (and,
while a flush is in flight, until it returns) goes into ONE statement for all responses
(arrays `unnest`ed into a data-modifying CTE). The writer holds the run token, so the
store numbers events itself from the `last_seq` it last wrote (`_seqs`); the CAS on
`last_seq` proves the number right, and a miss makes it look again. Readers only ever
see committed events: the live log (`livelog.py`: Redis Streams plus a local cache) is
fed after each commit.

Postgres unreachable: every call that needs it raises `StoreUnavailable` within
`OP_TIMEOUT` seconds; the pool reconnects when it is back. Appends ride out an outage of
up to `RETRY_FOR` seconds: the round in flight is resolved against the log once the
database answers (written, or not: never twice) and written in order with what followed.
A run whose batch could not be resolved or written in time is stopped (its next `append`
or `finish` raises), so a log never has a hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Collection
from sys import intern
from typing import Any

import asyncpg
import orjson

from tether import metrics
from tether.store import pg_sql as sql
from tether.store.base import (
    IdempotencyConflict,
    LogEntry,
    Record,
    StoreUnavailable,
    ledger_row,
    ledger_values,
)
from tether.store.livelog import LiveLog
from tether.store.logcache import DEFAULT_BUDGET
from tether.store.owners import OwnerLocks
from tether.store.pg_pool import OP_TIMEOUT, Database
from tether.store.pg_sql import LIVE, Pending

log = logging.getLogger("tether.store")
# A statement PostgreSQL rolled back to break a lock cycle with another transaction (seen
# under load: an append round and a purge or delete); being one statement, it left nothing
# behind and is simply run again.
RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError,
             asyncpg.exceptions.SerializationError)

# How long a round of appends that failed for an outage is tried again before its runs
# are given up (their responses then end from the log). A database restart takes seconds.
RETRY_FOR = 30.0
MAX_PENDING = 4096  # appended events waiting for a flush before `append` waits too


class _Recent(OrderedDict[tuple[str, str], BaseException | None]):
    """(response, run token) pairs that can write no more; the oldest are forgotten."""

    def add(self, key: tuple[str, str], exc: BaseException | None = None) -> None:
        self[key] = exc
        while len(self) > 10_000:
            self.popitem(last=False)


class PostgresStore:
    def __init__(self, url: str, redis_url: str, prefix: str = "tether",
                 pool_size: int = 10, cache_bytes: int = DEFAULT_BUDGET) -> None:
        self.db = Database(url, pool_size)
        self.live = LiveLog(redis_url, prefix, cache_bytes)
        self._pending: dict[str, Pending] = {}
        self._pending_events = 0
        self._flusher: asyncio.Task[None] | None = None
        self._flushed = asyncio.Event()  # set (and replaced) at the end of each round
        self._rounds_begun = self._rounds_done = 0
        self._seqs: dict[str, tuple[str, int]] = {}  # response -> (run token, last seq)
        self._fenced = _Recent()
        self._failed = _Recent()  # runs whose batch could not be written, and why

    async def open(self) -> None:
        await self.db.open(sql.migrate)
        await self.live.open()

    async def close(self) -> None:
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            await asyncio.wait_for(self.flush(), OP_TIMEOUT)
        await self.live.close()
        await self.db.close()

    # --- writes ------------------------------------------------------------------------

    async def create(
        self,
        record: Record,
        events: list[dict[str, Any]],
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[Record, bool]:
        entries = sql.entries(0, events)
        last = len(events) - 1
        async with self.db.conn(transaction=True) as con:
            if idempotency is not None:
                key, body_hash = idempotency
                fresh = await con.fetchval(
                    "INSERT INTO idempotency_keys VALUES ($1, $2, $3, $4, $5) "
                    "ON CONFLICT DO NOTHING RETURNING 1",
                    record.tenant, key, body_hash, record.id, time.time())
                if fresh is None:  # used before (the insert waited for its transaction)
                    row = await con.fetchrow(
                        "SELECT body_hash, response_id FROM idempotency_keys "
                        "WHERE tenant = $1 AND key = $2", record.tenant, key)
                    assert row is not None
                    if row[0] != body_hash:
                        raise IdempotencyConflict(key)
                    existing = await self._get(con, row[1], record.tenant)
                    if existing is not None:
                        return existing, False
                    await con.execute(  # its response is gone: the key is free again
                        "UPDATE idempotency_keys SET body_hash = $3, response_id = $4, "
                        "created_at = $5 WHERE tenant = $1 AND key = $2",
                        record.tenant, key, body_hash, record.id, time.time())
            await con.execute(
                sql.CREATE, record.id, record.tenant, record.status, record.owner,
                record.lease_until, last, bool(record.snapshot.get("store", True)),
                time.time(), orjson.dumps(record.snapshot), orjson.dumps(record.run),
                orjson.dumps(record.input_items), *sql.columns(entries), record.key_id or "")
        record.last_seq = last
        self.live.committed(record.id, entries)
        return record, True

    async def claim(
        self,
        response_id: str,
        run_token: str,
        owner: str,
        lease_until: float,
        snapshot: dict[str, Any],
        events: list[dict[str, Any]],
    ) -> bool:
        done = await self._transition(
            sql.CLAIM, response_id, None, snapshot, events, 0, (run_token, owner, lease_until))
        if done is None:
            return False
        last, entries = done
        self._seqs[response_id] = (run_token, last)  # this process runs it: appends follow
        self.live.committed(response_id, entries)
        return True

    async def append(
        self,
        response_id: str,
        run_token: str,
        events: list[dict[str, Any]],
        tokens: int = 0,
        input_tokens: int | None = None,
    ) -> bool:
        key = (response_id, run_token)
        if key in self._fenced:
            return False
        if key in self._failed:
            raise _failure(self._failed[key])
        pending = self._pending.get(response_id)
        if pending is None or pending.run_token != run_token:
            if pending is not None:  # a new run of the same response: the old one first
                await self.flush()
            pending = self._pending[response_id] = Pending(run_token)
        pending.events.extend(events)
        pending.tokens += tokens
        if input_tokens is not None:
            pending.input_tokens = input_tokens
        self._pending_events += len(events)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        elif self._pending_events > MAX_PENDING:
            await self._flushed.wait()  # back-pressure: the database is slower than the engine
        return True

    async def fence(self, response_id: str, run_token: str) -> bool:
        await self.flush()  # this process's appends before the fence: usage stays exact
        async with self.db.conn() as con:
            last = await con.fetchval(
                f"UPDATE responses SET run_token = $2 WHERE id = $1 AND {LIVE} "
                "RETURNING last_seq", response_id, run_token)
        if last is None:
            return False
        self._seqs[response_id] = (run_token, last)
        return True

    async def finish(
        self,
        response_id: str,
        run_token: str | None,
        status: str,
        snapshot: dict[str, Any],
        events: list[dict[str, Any]],
        tokens: int = 0,
    ) -> bool:
        await self.flush()
        if run_token is not None and (response_id, run_token) in self._failed:
            # Some of this run's events never reached the log: it must not end as if
            # they had. Whoever ends it next (cancel, lease reaper) ends it from the log.
            raise _failure(self._failed[(response_id, run_token)])
        done = await self._transition(
            sql.FINISH, response_id, run_token, snapshot, events, tokens,
            (status, time.time(), run_token, *ledger_values(snapshot)))
        if done is None:
            return False
        _, entries = done
        self._seqs.pop(response_id, None)
        self.live.committed(response_id, entries, terminal=True)
        return True

    async def _transition(self, statement: str, response_id: str, run_token: str | None,
                          snapshot: dict[str, Any], events: list[dict[str, Any]],
                          tokens: int, values: tuple[Any, ...]
                          ) -> tuple[int, list[LogEntry]] | None:
        """Compare-and-set on a live response (`statement`'s guard), appending `events` in the
        same statement: the new `last_seq` and the entries, or None if the guard failed."""
        cached = self._seqs.get(response_id)
        last = cached[1] if cached is not None and cached[0] == run_token else None
        snap = orjson.dumps(snapshot)
        async with self.db.conn() as con:
            for _ in range(10):
                if last is None:
                    row = await con.fetchrow(
                        f"SELECT last_seq FROM responses WHERE id = $1 AND {LIVE}",
                        response_id)
                    if row is None:
                        return None
                    last = int(row[0])
                entries = sql.entries(last + 1, events)
                try:
                    won = await con.fetchval(statement, response_id, last,
                                             last + len(entries), tokens, snap,
                                             *sql.columns(entries), *values)
                except RETRYABLE:
                    continue  # rolled back whole (one statement): try it again
                if won:
                    return last + len(entries), entries
                # Lost the guard, or the log moved since `last` was read: look again.
                row = await con.fetchrow(
                    f"SELECT last_seq FROM responses WHERE id = $1 AND {LIVE}", response_id)
                if row is None or row[0] == last:
                    return None  # terminal now, or the guard itself failed
                last = int(row[0])
        raise RuntimeError(f"{response_id}: the log kept moving under a state change")

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

    async def _flush(self) -> None:
        """Commit pending appends, one statement per round, until none are left."""
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                self._pending_events = 0
                self._rounds_begun += 1
                todo = {rid: p for rid, p in batch.items()
                        if p.events or p.tokens or p.input_tokens is not None}
                try:
                    try:
                        await self._commit(todo)
                    except StoreUnavailable:
                        await self._retry(todo)
                except Exception as exc:
                    if not isinstance(exc, StoreUnavailable):
                        log.exception("append failed")
                    for response_id, pending in todo.items():
                        self._failed.add((response_id, pending.run_token), exc)
                self._rounds_done += 1
                self._flushed.set()
                self._flushed = asyncio.Event()
        finally:
            self._flusher = None

    async def _commit(self, todo: dict[str, Pending]) -> None:
        """Append `todo`'s batches; each one committed (or fenced out) leaves `todo`."""
        for _ in range(10):
            if not todo:
                return
            unknown = [rid for rid, p in todo.items()
                       if self._seqs.get(rid, ("", 0))[0] != p.run_token]
            if unknown:
                await self._learn_seqs(unknown, todo)
            rows = []
            for rid in sorted(todo):  # one lock order for every process's flushes
                p = todo[rid]
                first = self._seqs[rid][1] + 1
                rows.append((rid, p, first, sql.entries(first, p.events)))
            columns = sql.batch_columns(rows)
            try:
                async with metrics.append_timer(), self.db.conn() as con:
                    matched = {r[0] for r in await con.fetch(sql.APPEND, *columns)}
            except RETRYABLE:
                continue  # the statement was rolled back whole: the same round again
            for rid, p, _, entries in rows:
                if rid in matched:
                    if entries:
                        self._seqs[rid] = (p.run_token, entries[-1].seq)
                        self.live.committed(rid, entries)
                    del todo[rid]
                else:
                    self._seqs.pop(rid, None)  # fenced, ended, or a stale seq: look again
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
                    "fetch", f"SELECT id, run_token, last_seq FROM responses "
                    f"WHERE id = ANY($1) AND {LIVE}", list(todo))
                self._resolve(todo, {r[0]: (r[1], int(r[2])) for r in rows})
                await self._commit(todo)
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise

    def _resolve(self, todo: dict[str, Pending], found: dict[str, tuple[str, int]]) -> None:
        for rid, p in list(todo.items()):
            now = found.get(rid)
            cached = self._seqs.get(rid)
            if now is None or now[0] != p.run_token:
                self._fenced.add((rid, p.run_token))  # ended or fenced meanwhile
                del todo[rid]
            elif cached is None or cached[0] != p.run_token:
                continue  # not numbered yet, so not written: `_commit` appends it
            elif now[1] == cached[1] and (p.events or not p.tokens):
                continue  # not written: `_commit` appends it
            elif p.events and now[1] == cached[1] + len(p.events):
                entries = sql.entries(cached[1] + 1, p.events)  # written: as it was
                self._seqs[rid] = (p.run_token, now[1])
                self.live.committed(rid, entries)
                del todo[rid]
            else:
                # A count without events leaves no trace to tell if it was written: this
                # run stops, and its response ends from what the log holds.
                self._failed.add((rid, p.run_token),
                                 StoreUnavailable(f"{rid}: a lost write cannot be resolved"))
                del todo[rid]

    async def _learn_seqs(self, ids: list[str], todo: dict[str, Pending]) -> None:
        """Where each run's log stands; runs no longer current are fenced out."""
        rows = await self.db.query(
            "fetch", f"SELECT id, run_token, last_seq FROM responses WHERE id = ANY($1) AND {LIVE}",
            ids)
        current = {r[0]: (r[1], r[2]) for r in rows}
        for rid in ids:
            token = todo[rid].run_token
            found = current.get(rid)
            if found is not None and found[0] == token:
                self._seqs[rid] = (token, found[1])
            else:
                self._fenced.add((rid, token))
                del todo[rid]

    # --- reads -------------------------------------------------------------------------

    async def get(self, response_id: str, tenant: str) -> Record | None:
        row = await self.db.query("fetchrow", f"{sql.SELECT} WHERE r.id = $1 AND r.tenant = $2",
                                response_id, tenant)
        return None if row is None else sql.record(row)

    async def _get(self, con: asyncpg.Connection, response_id: str,
                   tenant: str) -> Record | None:
        row = await con.fetchrow(f"{sql.SELECT} WHERE r.id = $1 AND r.tenant = $2",
                                 response_id, tenant)
        return None if row is None else sql.record(row)

    async def read(self, response_id: str, after: int, upto: int | None = None) -> list[LogEntry]:
        return await self.live.read(response_id, after, upto, self._read_durable)

    async def _read_durable(self, response_id: str, after: int) -> list[LogEntry]:
        rows = await self.db.query(
            "fetch", "SELECT first_seq, types, data FROM events "
            "WHERE response_id = $1 AND last_seq > $2 ORDER BY first_seq", response_id, after)
        return [
            LogEntry(seq, intern(kind), data)  # interned: cached entries share it
            for first, types, blob in rows
            for seq, kind, data in zip(
                range(first, first + blob.count(b"\n") + 1), types.split("\n"),
                blob.split(b"\n"), strict=True)
            if seq > after
        ]

    async def wait(self, response_id: str, after: int, timeout: float) -> None:
        await self.live.wait(response_id, after, timeout)

    async def output_tokens(self, response_id: str) -> int:
        await self.flush()
        value = await self.db.query(
            "fetchval", "SELECT output_tokens FROM responses WHERE id = $1", response_id)
        return int(value or 0)

    # --- housekeeping ------------------------------------------------------------------

    async def delete(self, response_id: str, tenant: str) -> bool:
        async with self.db.conn(transaction=True) as con:
            deleted = await con.fetchval(
                "DELETE FROM responses WHERE id = $1 AND tenant = $2 RETURNING 1",
                response_id, tenant)
            if deleted:
                await con.execute("DELETE FROM response_bodies WHERE id = $1", response_id)
                await con.execute("DELETE FROM events WHERE response_id = $1", response_id)
                await con.execute("DELETE FROM idempotency_keys WHERE response_id = $1",
                                  response_id)
        if deleted:
            await self.live.forget(response_id)
        return bool(deleted)

    async def usage(self, tenant: str | None) -> list[dict[str, Any]]:
        where, args = ("", ()) if tenant is None else (" WHERE tenant = $1", (tenant,))
        async with self.db.conn() as con:
            rows = await con.fetch(
                "SELECT tenant, key_id, model, status, responses, input_tokens, output_tokens "
                f"FROM usage_ledger{where} ORDER BY tenant, key_id, model, status", *args)
        return [ledger_row(r) for r in rows]

    async def renew(self, owner: str, lease_until: float, held: Collection[str]) -> None:
        async with self.db.conn() as con:
            # Rows an append holds are skipped, never waited for: a renewal waiting on one
            # append while holding rows another append wants was a deadlock (soak, under
            # load). A skipped row is renewed on the next round, well within the lease.
            await con.execute(
                f"UPDATE responses SET lease_until = $2 WHERE id IN (SELECT id FROM responses "
                f"WHERE owner = $1 AND {LIVE} AND id = ANY($3::text[]) "
                "FOR UPDATE SKIP LOCKED)", owner, lease_until, list(held))

    async def expired(self, now: float, gone: Collection[str] = ()) -> list[Record]:
        rows = await self.db.query(
            "fetch", f"{sql.SELECT} WHERE r.{LIVE} AND (r.lease_until < $1 "
            "OR r.owner = ANY($2::text[]))", now, list(gone))
        return [sql.record(row) for row in rows]

    async def adopt(
        self, response_id: str, old_owner: str | None, owner: str | None, lease_until: float,
        old_owner_gone: bool = False,
    ) -> bool:
        async with self.db.conn() as con:
            done = await con.fetchval(
                "UPDATE responses SET owner = $3, lease_until = $4 "
                "WHERE id = $1 AND status = 'queued' AND run_token IS NULL "
                "AND owner IS NOT DISTINCT FROM $2 AND (lease_until < $5 OR $6::boolean) "
                "RETURNING 1",
                response_id, old_owner, owner, lease_until, time.time(), old_owner_gone)
        return bool(done)

    def owner_locks(self) -> OwnerLocks | None:
        return None  # processes on many machines: only the lease clock tells who is gone

    async def purge(self, before: float) -> int:
        async with self.db.conn(transaction=True) as con:
            deleted = await con.execute(
                "DELETE FROM events WHERE response_id IN "
                "(SELECT id FROM responses WHERE finished_at < $1)", before)
            gone = await con.fetch(
                "DELETE FROM responses WHERE NOT stored AND finished_at < $1 RETURNING id",
                before)
            ids = [r[0] for r in gone]
            if ids:
                await con.execute("DELETE FROM response_bodies WHERE id = ANY($1)", ids)
                await con.execute("DELETE FROM idempotency_keys WHERE response_id = ANY($1)",
                                  ids)
        if deleted != "DELETE 0":
            await self._reclaim()
        return len(ids)

    async def _reclaim(self) -> None:
        """Make the purged events' space reusable when nothing else will: the events
        table is the one that churns (every response's log, deleted after `retention`),
        and with the server's autovacuum off it would grow without bound (bench/soak.py
        --scaled measured +22 MB a minute). With autovacuum on, it is left to it."""
        try:
            async with self.db.conn() as con:
                if await con.fetchval("SHOW autovacuum") != "on":
                    # Not in a transaction (VACUUM refuses one); another process's
                    # vacuum of the table already does the work.
                    await con.execute("VACUUM (SKIP_LOCKED) events")
        except StoreUnavailable as exc:
            log.warning("vacuuming purged events failed (retried after the next purge): %s",
                        exc)


def _failure(exc: BaseException | None) -> Exception:
    if isinstance(exc, StoreUnavailable):
        return StoreUnavailable(f"an earlier append of this run was not written: {exc}")
    return RuntimeError(f"an earlier append of this run failed: {exc!r}")
