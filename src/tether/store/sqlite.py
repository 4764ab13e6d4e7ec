"""The default store: one SQLite file in WAL mode, owned by one server process.

Appends are group-committed: every append made during one turn of the event loop goes
into one transaction, scheduled right after that turn. Readers are woken only after the
commit, so nothing a client has seen can be lost by a crash. All SQLite calls run on the
event loop thread: with WAL and `synchronous=NORMAL` a commit takes microseconds, less
than a hop to a worker thread.

A batch that cannot be committed (a full disk) is not lost silently (docs/contract.md §8.7):
its runs are marked lost, their next `append` or `finish` raises `WriteLost`, and their
responses end `failed` from what the log holds. Every other write raises `StoreFull` or
`StoreUnavailable` to its caller (`sqlite_io`).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import orjson

from tether import metrics
from tether.store.base import (
    LEDGER_UPSERT,
    IdempotencyConflict,
    LogEntry,
    Record,
    WriteLost,
    ledger_row,
    ledger_values,
)
from tether.store.common import (
    LIVE,
    SELECT,
    USAGE,
    USAGE_ORDER,
    Pending,
    Recent,
    Waiters,
    packed,
    to_record,
    unpack,
)
from tether.store.hooks import SQLITE_OUTBOX, Webhooks
from tether.store.logcache import DEFAULT_BUDGET, LogCache, Tail
from tether.store.owners import OwnerLocks
from tether.store.sqlite_conversations import SQLiteConversations, begin_turn, end_turn
from tether.store.sqlite_hooks import SQLiteHooks
from tether.store.sqlite_io import Checkpointer, Trouble, store_error, write
from tether.store.sqlite_io import transaction as _transaction

log = logging.getLogger("tether.store")

INSERT_EVENTS = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)"
# A run's batch, numbered after what this store committed for it last: a compare-and-set
# on that `last_seq` (no RETURNING: SQLite runs that through a temporary table, which
# doubled the cost of this statement, run for each live response at every commit).
APPEND_AFTER = (
    "UPDATE responses SET last_seq = ?, input_tokens = COALESCE(?, input_tokens) "
    f"WHERE id = ? AND run_token = ? AND {LIVE} AND last_seq = ?"
)
# A run's batch when its `last_seq` is not known here (or was not as known).
APPEND = (
    "UPDATE responses SET last_seq = last_seq + ?, input_tokens = COALESCE(?, input_tokens) "
    f"WHERE id = ? AND run_token = ? AND {LIVE} RETURNING last_seq"
)

# The WAL is cut back to this size when it restarts: what it grew to in a burst (or while
# a full disk stopped checkpoints) goes back to the filesystem.
WAL_KEEP_BYTES = 16 << 20


def migrate(path: str) -> None:
    """Bring the database schema to the newest revision (Alembic)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    command.upgrade(config, "head")


class SQLiteStore(SQLiteConversations):
    def __init__(self, path: str, cache_bytes: int = DEFAULT_BUDGET) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._pending: dict[str, Pending] = {}
        # response -> (run token, last_seq) as this store's last commit for it left them
        self._seqs: dict[str, tuple[str, int]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._fenced = Recent()  # runs a commit found fenced out
        self.cache = LogCache(cache_bytes)  # logs for readers (logcache.py)
        self._waiters = Waiters()
        # Runs (response -> run token) an append of which could not be written, and why.
        self._lost: dict[str, tuple[str, BaseException]] = {}
        self._appends = Trouble("appending to the event log")
        self.webhooks: Webhooks = SQLiteHooks(lambda: self.db)  # endpoints and the outbox

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store is not open"
        return self._db

    async def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate, self.path)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        # Checkpoints copy the WAL into the database file and fsync: seconds of work per GB
        # that must not run on the event loop, so a thread does them.
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        self._db = db
        self._checkpointer = Checkpointer(self.path)
        self._checkpointer.start()

    async def close(self) -> None:
        if self._db is not None:
            self._flush()
            self._checkpointer.stop()
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # a full disk: the WAL is replayed at next open
                log.warning("final checkpoint failed: %s", exc)
            self._db.close()
            self._db = None

    # --- writes ------------------------------------------------------------------------

    async def create(
        self,
        record: Record,
        events: list[dict[str, Any]],
        idempotency: tuple[str, str] | None = None,
        turn: tuple[str, int] | None = None,
    ) -> tuple[Record, bool]:
        db = self.db
        with _transaction(db):
            if idempotency is not None:
                key, body_hash = idempotency
                row = db.execute(
                    "SELECT body_hash, response_id FROM idempotency_keys "
                    "WHERE tenant = ? AND key = ?",
                    (record.tenant, key),
                ).fetchone()
                if row is not None:
                    if row[0] != body_hash:
                        raise IdempotencyConflict(key)
                    existing = self._get(row[1], record.tenant)
                    if existing is not None:
                        return existing, False
                    db.execute(
                        "DELETE FROM idempotency_keys WHERE tenant = ? AND key = ?",
                        (record.tenant, key),
                    )
                db.execute(
                    "INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?)",
                    (record.tenant, key, body_hash, record.id, time.time()),
                )
            if turn is not None:
                begin_turn(db, record.id, record.tenant, turn)
            db.execute(
                "INSERT INTO responses (id, tenant, status, owner, lease_until, last_seq, "
                "stored, created_at, key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.tenant,
                    record.status,
                    record.owner,
                    record.lease_until,
                    len(events) - 1,
                    bool(record.snapshot.get("store", True)),
                    time.time(),
                    record.key_id or "",
                ),
            )
            db.execute(
                "INSERT INTO response_bodies VALUES (?, ?, ?, ?)",
                (
                    record.id,
                    orjson.dumps(record.snapshot),
                    orjson.dumps(record.run),
                    orjson.dumps(record.input_items),
                ),
            )
            entries = self._insert(record.id, 0, events, 0)
        record.last_seq = len(events) - 1
        self.cache.put(record.id, Tail(0))
        self._publish(record.id, entries)
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
        return self._transition(
            response_id,
            "status = 'in_progress', run_token = ?, owner = ?, lease_until = ?",
            (run_token, owner, lease_until),
            snapshot,
            "run_token IS NULL",
            (),
            events,
        )

    async def append(
        self,
        response_id: str,
        run_token: str,
        events: list[dict[str, Any]],
        tokens: int = 0,
        input_tokens: int | None = None,
    ) -> bool:
        # Never suspends (no await): cancel-atomic trivially.
        if (response_id, run_token) in self._fenced:
            return False
        if self._lost:
            self._check_lost(response_id, run_token)
        pending = self._pending.get(response_id)
        if pending is None or pending.run_token != run_token:
            if pending is not None:
                self._flush()
            pending = self._pending[response_id] = Pending(run_token)
        # `Pending.add`, inlined: this runs for every token
        pending.events += events
        pending.tokens += tokens
        if input_tokens is not None:
            pending.input_tokens = input_tokens
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        return True

    async def fence(self, response_id: str, run_token: str) -> bool:
        self._flush()
        cur = write(
            self.db,
            f"UPDATE responses SET run_token = ? WHERE id = ? AND {LIVE}",
            (run_token, response_id),
        )
        return cur.rowcount == 1

    async def finish(
        self,
        response_id: str,
        run_token: str | None,
        status: str,
        snapshot: dict[str, Any],
        events: list[dict[str, Any]],
        tokens: int = 0,
    ) -> bool:
        self._flush()
        self._seqs.pop(response_id, None)
        if run_token is not None and self._lost:
            self._check_lost(response_id, run_token)
        won = self._transition(
            response_id,
            "status = ?, finished_at = ?, lease_until = 0",
            (status, time.time()),
            snapshot,
            "run_token IS NULL" if run_token is None else "run_token = ?",
            () if run_token is None else (run_token,),
            events,
            tokens,
            ledger=(status, *ledger_values(snapshot)),
            webhooks=bool(snapshot.get("background")),  # OpenAI's: background responses
        )
        if won:
            self._lost.pop(response_id, None)
            self.cache.finished(response_id)
        return won

    def _check_lost(self, response_id: str, run_token: str) -> None:
        lost = self._lost.get(response_id)
        if lost is not None and lost[0] == run_token:
            raise WriteLost(
                f"{response_id}: an append of this run was not written: {lost[1]}"
            ) from lost[1]

    def _transition(
        self,
        response_id: str,
        assignments: str,
        values: tuple[Any, ...],
        snapshot: dict[str, Any],
        guard: str,
        guard_values: tuple[Any, ...],
        events: list[dict[str, Any]],
        tokens: int = 0,
        ledger: tuple[str, str, int, int, int] | None = None,
        webhooks: bool = False,
    ) -> bool:
        """Compare-and-set on a live response, appending `events` in the same commit;
        a terminal one (`ledger`: status, model, input, output and reasoning tokens) also
        counts in the usage ledger in that commit, adds a conversation turn's items, and
        (`webhooks`) puts a delivery for each subscribed endpoint in the outbox, in that
        commit too (`store/hooks.py`)."""
        db = self.db
        outboxed = 0  # deliveries put in the outbox
        with _transaction(db):
            row = db.execute(
                f"UPDATE responses SET {assignments}, last_seq = last_seq + ? "
                f"WHERE id = ? AND {LIVE} AND {guard} RETURNING last_seq",
                (*values, len(events), response_id, *guard_values),
            ).fetchone()
            if row is None:
                return False
            db.execute(
                "UPDATE response_bodies SET snapshot = ? WHERE id = ?",
                (orjson.dumps(snapshot), response_id),
            )
            if ledger is not None:
                status, model, inp, out, reasoning = ledger
                db.execute(
                    "INSERT INTO usage_ledger (tenant, key_id, model, status, responses, "
                    "input_tokens, output_tokens, reasoning_tokens) "
                    "SELECT tenant, key_id, ?, ?, 1, ?, ?, ? "
                    f"FROM responses WHERE id = ? {LEDGER_UPSERT}",
                    (model, status, inp, out, reasoning, response_id),
                )
                end_turn(db, response_id, status, snapshot)  # a conversation's turn
                if webhooks:
                    cur = db.execute(SQLITE_OUTBOX, (status, time.time(), response_id))
                    outboxed = cur.rowcount
            first = row[0] - len(events) + 1
            entries = self._insert(response_id, first, events, tokens)
        self._publish(response_id, entries)
        if outboxed:
            self.webhooks.wake()  # committed: the sender need not wait for its poll
        return True

    def _flush(self) -> None:
        """Commit every pending append in one transaction, then wake readers. Never
        raises (it runs as a loop callback): a batch that cannot be committed marks its
        runs lost, and they learn it at their next `append` or `finish`."""
        self._flush_handle = None
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            with metrics.append_timer():
                published = self._commit(pending)
        except Exception as exc:  # every failure goes to the runs it hit
            self._appends.failed(exc)
            for response_id, p in pending.items():
                self._lost[response_id] = (p.run_token, store_error(exc) or exc)
            return
        self._appends.worked()
        for response_id, entries in published:
            self._publish(response_id, entries)
        if self._checkpointer.catch_up_wanted:
            self._checkpointer.catch_up(self.db)

    def _commit(self, pending: dict[str, Pending]) -> list[tuple[str, list[LogEntry]]]:
        db, seqs = self.db, self._seqs
        published = []
        rows = []  # the batch's `events` rows, inserted together
        with _transaction(db):
            for response_id, p in pending.items():
                n, last = len(p.events), None
                known = seqs.get(response_id)
                if known is not None and known[0] == p.run_token:
                    values = (known[1] + n, p.input_tokens, response_id, p.run_token, known[1])
                    if db.execute(APPEND_AFTER, values).rowcount == 1:
                        last = known[1] + n
                if last is None:
                    row = db.execute(
                        APPEND, (n, p.input_tokens, response_id, p.run_token)
                    ).fetchone()
                    if row is None:
                        seqs.pop(response_id, None)
                        self._fenced.add((response_id, p.run_token))
                        continue
                    last = row[0]
                # Kept even if this transaction fails: the compare-and-set then misses
                # and the next commit asks the database again.
                seqs[response_id] = (p.run_token, last)
                entries: list[LogEntry] = []
                if p.events:
                    first = last - n + 1
                    entries, types, data = packed(first, p.events)
                    rows.append((response_id, first, entries[-1].seq, types, p.tokens, data))
                published.append((response_id, entries))  # every change wakes its readers
            if rows:
                db.executemany(INSERT_EVENTS, rows)
        return published

    def _insert(
        self, response_id: str, first: int, events: list[dict[str, Any]], tokens: int
    ) -> list[LogEntry]:
        if not events:
            return []
        entries, types, data = packed(first, events)
        self.db.execute(INSERT_EVENTS, (response_id, first, entries[-1].seq, types, tokens, data))
        return entries

    def _publish(self, response_id: str, entries: list[LogEntry]) -> None:
        tail = self.cache.peek(response_id)
        if tail is not None:
            self.cache.grow(tail, entries)
        self._waiters.wake(response_id)  # every change: a waiter re-reads the record too

    # --- reads -------------------------------------------------------------------------

    async def get(self, response_id: str, tenant: str) -> Record | None:
        return self._get(response_id, tenant)

    def _get(self, response_id: str, tenant: str) -> Record | None:
        row = self.db.execute(
            f"{SELECT} WHERE r.id = ? AND r.tenant = ?", (response_id, tenant)
        ).fetchone()
        return None if row is None else to_record(row)

    async def read(self, response_id: str, after: int, upto: int | None = None) -> list[LogEntry]:
        tail = self.cache.get(response_id)
        if tail is not None and after + 1 >= tail.first:
            return tail.entries[after + 1 - tail.first :]
        return unpack(
            self.db.execute(
                "SELECT first_seq, types, data FROM events "
                "WHERE response_id = ? AND last_seq > ? ORDER BY first_seq",
                (response_id, after),
            ).fetchall(),
            after,
        )

    async def wait(self, response_id: str, after: int, timeout: float) -> None:
        tail = self.cache.peek(response_id)
        if tail is not None and tail.end > after:
            return
        await self._waiters.wait(response_id, after, timeout)

    async def output_tokens(self, response_id: str) -> int:
        self._flush()
        row = self.db.execute(
            "SELECT COALESCE(SUM(tokens), 0) FROM events WHERE response_id = ?", (response_id,)
        ).fetchone()
        return int(row[0])

    # --- housekeeping ------------------------------------------------------------------

    async def delete(self, response_id: str, tenant: str) -> bool:
        db = self.db
        with _transaction(db):
            cur = db.execute(
                "DELETE FROM responses WHERE id = ? AND tenant = ?", (response_id, tenant)
            )
            if cur.rowcount:
                db.execute("DELETE FROM response_bodies WHERE id = ?", (response_id,))
                db.execute("DELETE FROM events WHERE response_id = ?", (response_id,))
                db.execute("DELETE FROM idempotency_keys WHERE response_id = ?", (response_id,))
        self.cache.pop(response_id)
        self._lost.pop(response_id, None)
        self._seqs.pop(response_id, None)
        return cur.rowcount == 1

    async def usage(self, tenant: str | None) -> list[dict[str, Any]]:
        where, args = ("", ()) if tenant is None else (" WHERE tenant = ?", (tenant,))
        rows = self.db.execute(f"{USAGE}{where}{USAGE_ORDER}", args).fetchall()
        return [ledger_row(r) for r in rows]

    async def renew(self, owner: str, lease_until: float, held: Collection[str]) -> None:
        write(
            self.db,
            f"UPDATE responses SET lease_until = ? WHERE owner = ? AND {LIVE} "
            "AND id IN (SELECT value FROM json_each(?))",
            (lease_until, owner, orjson.dumps(list(held))),
        )

    async def expired(self, now: float, gone: Collection[str] = ()) -> list[Record]:
        rows = self.db.execute(
            f"{SELECT} WHERE r.{LIVE} AND (r.lease_until < ? "
            "OR r.owner IN (SELECT value FROM json_each(?)))",
            (now, orjson.dumps(list(gone))),
        ).fetchall()
        return [to_record(row) for row in rows]

    async def adopt(
        self,
        response_id: str,
        old_owner: str | None,
        owner: str | None,
        lease_until: float,
        old_owner_gone: bool = False,
    ) -> bool:
        cur = write(
            self.db,
            "UPDATE responses SET owner = ?, lease_until = ?, run_token = NULL "
            "WHERE id = ? AND status = 'queued' AND owner IS ? AND (lease_until < ? OR ?)",
            (owner, lease_until, response_id, old_owner, time.time(), old_owner_gone),
        )
        return cur.rowcount == 1

    def owner_locks(self) -> OwnerLocks | None:
        if self.path == ":memory:" or self.path.startswith("file:"):
            return None
        return OwnerLocks(Path(f"{self.path}.owners"))

    async def purge(self, before: float) -> int:
        db = self.db
        with _transaction(db):
            db.execute(
                "DELETE FROM events WHERE response_id IN "
                "(SELECT id FROM responses WHERE finished_at < ?)",
                (before,),
            )
            db.execute(
                "DELETE FROM response_bodies WHERE id IN "
                "(SELECT id FROM responses WHERE stored = 0 AND finished_at < ?)",
                (before,),
            )
            cur = db.execute(
                "DELETE FROM responses WHERE stored = 0 AND finished_at < ?", (before,)
            )
        return cur.rowcount
