"""The scaled-out store: PostgreSQL for durable records, Redis for the hot path.

Several processes (API replicas, workers) open the same database, so no answer may come
from process memory: every race is decided by one atomic Postgres statement
(docs/contract.md §1.1, §2.3):
- `append` is a compare-and-set on the run token, the live status and `last_seq`;
- `claim`, `fence` and `finish` are compare-and-sets on the response row, and add their
  events in the same statement.
A worker that was paused past its lease and then resumes is refused by the first of
these, because the lease reaper fenced it (gave the response a new run token).

Appends are group-committed, numbered by the writer, and ride out short outages
(`pg_append.py`). Readers only ever see committed events: the live log (`livelog.py`:
Redis Streams plus a local cache) is fed after each commit.

Postgres unreachable: every call that needs it raises `StoreUnavailable` within
`OP_TIMEOUT` seconds; the pool reconnects when it is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from functools import partial
from typing import Any

import asyncpg
import orjson

from tether.store import pg_create, pg_partitions
from tether.store import pg_sql as sql
from tether.store.base import (
    IdempotencyConflict,
    LogEntry,
    Record,
    ledger_row,
    ledger_values,
)
from tether.store.common import LIVE, SELECT, USAGE, USAGE_ORDER, numbered, pack, to_record, unpack
from tether.store.conversations import turn_of
from tether.store.hooks import Webhooks
from tether.store.livelog import LiveLog
from tether.store.logcache import DEFAULT_BUDGET
from tether.store.owners import OwnerLocks
from tether.store.pg_append import RETRYABLE, Appends
from tether.store.pg_conversations import PostgresConversations, finish_turn
from tether.store.pg_hooks import PgHooks
from tether.store.pg_pool import Database
from tether.store.pg_replica import Replica
from tether.store.rounds import Rounds

log = logging.getLogger("tether.store")


class PostgresStore(PostgresConversations):
    def __init__(
        self,
        url: str,
        redis_url: str,
        prefix: str = "tether",
        pool_size: int = 10,
        cache_bytes: int = DEFAULT_BUDGET,
        read_url: str | None = None,
    ) -> None:
        self.db = Database(url, pool_size)
        # `--db-read`: a streaming replica that replays finished logs (`pg_replica.py`).
        self.replica = Replica(read_url, pool_size) if read_url else None
        self.live = LiveLog(redis_url, prefix, cache_bytes)
        self.appends = Appends(self.db, self.live)
        self._seqs = self.appends.seqs  # response -> (run token, last seq it wrote)
        self.webhooks: Webhooks = PgHooks(self.db)  # endpoints and the outbox
        # Plain creates and reads of a record, many callers to a statement (`rounds.py`).
        self._creates: Rounds[pg_create.Plain, Exception | None] = Rounds(
            partial(pg_create.create_round, self.db), "tether-postgres-creates"
        )
        self._gets: Rounds[tuple[str, str], Record | None] = Rounds(
            self._get_round, "tether-postgres-gets"
        )

    async def open(self) -> None:
        await self.db.open(sql.migrate)
        async with self.db.conn() as con:  # before any create: its events need one
            await pg_partitions.ahead(con, time.time())
        if self.replica is not None:
            await self.replica.open()
        await self.live.open()
        self.appends.start()

    async def close(self) -> None:
        await self._creates.close()
        await self._gets.close()
        await self.appends.stop()
        await self.live.close()
        await self.db.close()
        if self.replica is not None:
            await self.replica.close()

    # --- writes ------------------------------------------------------------------------

    async def create(
        self,
        record: Record,
        events: list[dict[str, Any]],
        idempotency: tuple[str, str] | None = None,
        turn: tuple[str, int] | None = None,
    ) -> tuple[Record, bool]:
        entries = numbered(0, events)
        created = time.time()
        if idempotency is None and turn is None:  # one statement for many (`pg_create.py`)
            error = await self._creates.call((record, entries, created))
            if error is not None:
                raise error
            record.last_seq = len(entries) - 1
            self.live.committed(record.id, entries)
            return record, True
        try:
            return await self._create(record, entries, idempotency, created, turn)
        except asyncpg.CheckViolationError as exc:
            # No partition for this creation time (a clock far ahead of the partitions
            # made ahead; `pg_partitions.py`): make it, and create once more.
            if "no partition" not in str(exc):
                raise
            async with self.db.conn() as con:
                await pg_partitions.cover(con, created, created + 1)
            return await self._create(record, entries, idempotency, created, turn)

    async def _create(
        self,
        record: Record,
        entries: list[LogEntry],
        idempotency: tuple[str, str] | None,
        created: float,
        turn: tuple[str, int] | None,
    ) -> tuple[Record, bool]:
        last = len(entries) - 1
        async with self.db.conn(transaction=True) as con:
            if idempotency is not None:
                key, body_hash = idempotency
                fresh = await con.fetchval(
                    "INSERT INTO idempotency_keys VALUES ($1, $2, $3, $4, $5) "
                    "ON CONFLICT DO NOTHING RETURNING 1",
                    record.tenant,
                    key,
                    body_hash,
                    record.id,
                    time.time(),
                )
                if fresh is None:  # used before (the insert waited for its transaction)
                    row = await con.fetchrow(
                        "SELECT body_hash, response_id FROM idempotency_keys "
                        "WHERE tenant = $1 AND key = $2",
                        record.tenant,
                        key,
                    )
                    assert row is not None
                    if row[0] != body_hash:
                        raise IdempotencyConflict(key)
                    existing = await self._get(con, row[1], record.tenant)
                    if existing is not None:
                        return existing, False
                    await con.execute(  # its response is gone: the key is free again
                        "UPDATE idempotency_keys SET body_hash = $3, response_id = $4, "
                        "created_at = $5 WHERE tenant = $1 AND key = $2",
                        record.tenant,
                        key,
                        body_hash,
                        record.id,
                        time.time(),
                    )
            if turn is not None:
                await self.begin_turn(con, record.id, record.tenant, turn)
            await con.execute(
                sql.CREATE,
                record.id,
                record.tenant,
                record.status,
                record.owner,
                record.lease_until,
                last,
                bool(record.snapshot.get("store", True)),
                created,
                orjson.dumps(record.snapshot),
                orjson.dumps(record.run),
                orjson.dumps(record.input_items),
                *pack(entries),
                record.key_id or "",
            )
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
            sql.CLAIM, response_id, None, snapshot, events, 0, (run_token, owner, lease_until)
        )
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
        return await self.appends.append(response_id, run_token, events, tokens, input_tokens)

    async def fence(self, response_id: str, run_token: str) -> bool:
        await self.flush()  # this process's appends before the fence: usage stays exact
        async with self.db.conn() as con:
            last = await con.fetchval(
                f"UPDATE responses SET run_token = $2 WHERE id = $1 AND {LIVE} RETURNING last_seq",
                response_id,
                run_token,
            )
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
        if run_token is not None:
            # Some of this run's events never reached the log? It must not end as if they
            # had. Whoever ends it next (cancel, lease reaper) ends it from the log.
            self.appends.check(response_id, run_token)
        statement = sql.FINISH
        values: tuple[Any, ...] = (
            status,
            time.time(),
            run_token,
            *ledger_values(snapshot),
            bool(snapshot.get("background")),  # webhooks: background responses only
        )
        cid = turn_of(snapshot)
        if cid is not None:  # a conversation's turn: its items, in the same statement
            statement = finish_turn(8 + len(values))
            values += await self.turn_values(response_id, cid, snapshot, status)
        done = await self._transition(
            statement, response_id, run_token, snapshot, events, tokens, values
        )
        if done is None:
            return False
        _, entries = done
        self._seqs.pop(response_id, None)
        self.live.committed(response_id, entries, terminal=True)
        if snapshot.get("background"):  # maybe with deliveries: no need to wait for a poll
            self.webhooks.wake()
        return True

    async def _transition(
        self,
        statement: str,
        response_id: str,
        run_token: str | None,
        snapshot: dict[str, Any],
        events: list[dict[str, Any]],
        tokens: int,
        values: tuple[Any, ...],
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
                        f"SELECT last_seq FROM responses WHERE id = $1 AND {LIVE}", response_id
                    )
                    if row is None:
                        return None
                    last = int(row[0])
                entries = numbered(last + 1, events)
                try:
                    won = await con.fetchval(
                        statement,
                        response_id,
                        last,
                        last + len(entries),
                        tokens,
                        snap,
                        *pack(entries),
                        *values,
                    )
                except RETRYABLE:
                    continue  # rolled back whole (one statement): try it again
                if won:
                    return last + len(entries), entries
                # Lost the guard, or the log moved since `last` was read: look again.
                row = await con.fetchrow(
                    f"SELECT last_seq FROM responses WHERE id = $1 AND {LIVE}", response_id
                )
                if row is None or row[0] == last:
                    return None  # terminal now, or the guard itself failed
                last = int(row[0])
        raise RuntimeError(f"{response_id}: the log kept moving under a state change")

    async def flush(self) -> None:
        """Wait until every append made so far is committed (or has failed).

        :raises StoreUnavailable: they are not, within `OP_TIMEOUT`."""
        await self.appends.flush()

    # --- reads -------------------------------------------------------------------------

    async def get(self, response_id: str, tenant: str) -> Record | None:
        return await self._gets.call((response_id, tenant))

    async def _get_round(self, keys: list[tuple[str, str]]) -> list[Record | None]:
        """Records for many `get`s, one statement (`rounds.py`)."""
        ids = list({rid for rid, _ in keys})
        rows = await self.db.query("fetch", f"{SELECT} WHERE r.id = ANY($1::text[])", ids)
        found = {row[0]: row for row in rows}
        out: list[Record | None] = []
        for rid, tenant in keys:
            row = found.get(rid)
            out.append(to_record(row) if row is not None and row[1] == tenant else None)
        return out

    async def _get(self, con: asyncpg.Connection, response_id: str, tenant: str) -> Record | None:
        row = await con.fetchrow(f"{SELECT} WHERE r.id = $1 AND r.tenant = $2", response_id, tenant)
        return None if row is None else to_record(row)

    async def read(self, response_id: str, after: int, upto: int | None = None) -> list[LogEntry]:
        return await self.live.read(response_id, after, upto, self._read_durable)

    async def _read_durable(self, response_id: str, after: int) -> list[LogEntry]:
        if self.replica is not None:
            entries = await self.replica.read_finished(response_id, after)
            if entries is not None:
                return entries
        return unpack(await self.db.query("fetch", sql.READ, response_id, after), after)

    async def wait(self, response_id: str, after: int, timeout: float) -> None:
        await self.live.wait(response_id, after, timeout)

    async def output_tokens(self, response_id: str) -> int:
        await self.flush()
        value = await self.db.query(
            "fetchval", "SELECT output_tokens FROM responses WHERE id = $1", response_id
        )
        return int(value or 0)

    # --- housekeeping ------------------------------------------------------------------

    async def delete(self, response_id: str, tenant: str) -> bool:
        async with self.db.conn(transaction=True) as con:
            created = await con.fetchval(
                "DELETE FROM responses WHERE id = $1 AND tenant = $2 RETURNING created_at",
                response_id,
                tenant,
            )
            deleted = created is not None
            if deleted:
                await con.execute("DELETE FROM response_bodies WHERE id = $1", response_id)
                await con.execute(  # in its partition only (`pg_sql.READ`)
                    "DELETE FROM events WHERE response_id = $1 "
                    "AND created_at = ANY(ARRAY[0, $2::double precision])",
                    response_id,
                    created,
                )
                await con.execute(
                    "DELETE FROM idempotency_keys WHERE response_id = $1", response_id
                )
        if deleted:
            await self.live.forget(response_id)
        return bool(deleted)

    async def usage(self, tenant: str | None) -> list[dict[str, Any]]:
        where, args = ("", ()) if tenant is None else (" WHERE tenant = $1", (tenant,))
        async with self.db.conn() as con:
            rows = await con.fetch(f"{USAGE}{where}{USAGE_ORDER}", *args)
        return [ledger_row(r) for r in rows]

    async def renew(self, owner: str, lease_until: float, held: Collection[str]) -> None:
        async with self.db.conn() as con:
            # Rows an append holds are skipped, never waited for: a renewal waiting on one
            # append while holding rows another append wants was a deadlock (soak, under
            # load). A skipped row is renewed on the next round, well within the lease.
            await con.execute(
                f"UPDATE responses SET lease_until = $2 WHERE id IN (SELECT id FROM responses "
                f"WHERE owner = $1 AND {LIVE} AND id = ANY($3::text[]) "
                "FOR UPDATE SKIP LOCKED)",
                owner,
                lease_until,
                list(held),
            )

    async def expired(self, now: float, gone: Collection[str] = ()) -> list[Record]:
        rows = await self.db.query(
            "fetch",
            f"{SELECT} WHERE r.{LIVE} AND (r.lease_until < $1 OR r.owner = ANY($2::text[]))",
            now,
            list(gone),
        )
        return [to_record(row) for row in rows]

    async def adopt(
        self,
        response_id: str,
        old_owner: str | None,
        owner: str | None,
        lease_until: float,
        old_owner_gone: bool = False,
    ) -> bool:
        async with self.db.conn() as con:
            done = await con.fetchval(
                "UPDATE responses SET owner = $3, lease_until = $4 "
                "WHERE id = $1 AND status = 'queued' AND run_token IS NULL "
                "AND owner IS NOT DISTINCT FROM $2 AND (lease_until < $5 OR $6::boolean) "
                "RETURNING 1",
                response_id,
                old_owner,
                owner,
                lease_until,
                time.time(),
                old_owner_gone,
            )
        return bool(done)

    def owner_locks(self) -> OwnerLocks | None:
        return None  # processes on many machines: only the lease clock tells who is gone

    async def purge(self, before: float) -> int:
        """Logs go with their partition, dropped whole once every response created in its
        range is past the retention (`pg_partitions.py`): no DELETE of events. The rows of
        responses that were not stored go as they did."""
        now = time.time()
        await self.maintain_partitions(now, before, pg_partitions.width_for(now - before))
        async with self.db.conn(transaction=True) as con:
            gone = await con.fetch(
                "DELETE FROM responses WHERE NOT stored AND finished_at < $1 RETURNING id", before
            )
            ids = [r[0] for r in gone]
            if ids:
                await con.execute("DELETE FROM response_bodies WHERE id = ANY($1)", ids)
                await con.execute("DELETE FROM idempotency_keys WHERE response_id = ANY($1)", ids)
        return len(ids)

    async def maintain_partitions(
        self, now: float, before: float, width: float = pg_partitions.WIDTH
    ) -> list[str]:
        """The event partitions' maintenance: those `AHEAD` of `now` made (`width` wide:
        `purge` makes them wider for a long retention), those past the retention
        (`before`) dropped (their names). A drop that does not finish in time (a long
        query still sees the partition) is finished by the next one."""
        async with self.db.conn() as con:
            await pg_partitions.ahead(con, now, width)
            dropped = await pg_partitions.drop(con, now, before)
        if dropped:
            log.info("dropped event partitions past the retention: %s", ", ".join(dropped))
        return dropped
