"""PostgreSQL events partitioned by their response's creation time (`pg_partitions.py`):
partitions made ahead, retention by dropping whole partitions, a log that keeps appending
across a partition boundary, and a database of revision 0003 (one `events` table) that
upgrades with every event still readable."""

from __future__ import annotations

import importlib
import io
import itertools
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import orjson
import pytest
from alembic import command
from alembic.config import Config

import test_store_postgres
from test_store_postgres import Make, ev, record
from test_usage_migration import pg_sql_up_to
from tether.store import pg_sql, postgres
from tether.store.common import numbered, pack, unpack
from tether.store.pg_partitions import AHEAD, LEGACY, WIDTH, name_of, partitions, width_for
from tether.store.pg_sql import upgrade_sql
from tether.store.postgres import PostgresStore

pytestmark = pytest.mark.anyio
# (A module whose name starts with a digit: imported by name.)
MIGRATION = "tether.store.pg_migrations.versions.0006_event_partitions"
PREPARE = importlib.import_module(MIGRATION).PREPARE
make, pg, redis = test_store_postgres.make, test_store_postgres.pg, test_store_postgres.redis
DAY = 86400.0


def at(monkeypatch: pytest.MonkeyPatch, when: float) -> None:
    """The store's clock (creation and finish times) reads `when`."""
    monkeypatch.setattr(postgres, "time", SimpleNamespace(time=lambda: when))


async def write_log(store: PostgresStore, rid: str, deltas: int, finish: bool = True) -> None:
    """A response with a log of `deltas` deltas appended in batches (and its end)."""
    await store.create(record(rid), [ev("response.created")])
    assert await store.claim(rid, "tok", "me", 0, {}, [ev("response.in_progress")])
    for i in range(deltas):
        assert await store.append(rid, "tok", [ev(delta=f"{rid}-{i}")], tokens=1)
        if i % 3 == 2:
            await store.flush()  # several rows (batches) per log
    await store.flush()
    if finish:
        assert await store.finish(rid, "tok", "completed", {}, [ev("response.completed")])


async def durable(store: PostgresStore, rid: str) -> list[dict[str, Any]]:
    """The log as PostgreSQL has it (not the live log's cache of it)."""
    return [orjson.loads(e.data) for e in await store._read_durable(rid, -1)]


def check_log(log: list[dict[str, Any]], rid: str, deltas: int, finished: bool = True) -> None:
    assert [e["sequence_number"] for e in log] == list(range(len(log)))
    assert [e["delta"] for e in log if "delta" in e] == [f"{rid}-{i}" for i in range(deltas)]
    assert len(log) == deltas + 2 + finished


async def where(store: PostgresStore, rid: str) -> set[str]:
    """The partitions holding `rid`'s events."""
    async with store.db.conn() as con:
        rows = await con.fetch(
            "SELECT DISTINCT tableoid::regclass::text FROM events WHERE response_id = $1", rid
        )
    return {r[0] for r in rows}


async def test_partitions_ahead_exist_after_open_and_after_maintenance(make: Make) -> None:
    store = await make()
    now = time.time()

    async def covered(upto: float, legacy: bool = True) -> None:
        async with store.db.conn() as con:
            parts = await partitions(con)
            keys = await con.fetch(
                "SELECT c.relname, pg_get_indexdef(x.indexrelid) FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_index x ON x.indrelid = c.oid "
                "WHERE i.inhparent = 'events'::regclass AND x.indisprimary"
            )
        # Contiguous, and from the past to `upto`.
        if legacy:  # a new database's: empty, covering every time before it
            assert parts[0].lo == -math.inf and parts[0].name == LEGACY
        assert all(a.hi == b.lo for a, b in itertools.pairwise(parts))
        assert parts[-1].hi >= upto
        # Each partition's own primary key is the replay's index.
        assert {name for name, _ in keys} == {p.name for p in parts}
        assert all(d.endswith("(response_id, first_seq)") for _, d in keys)

    await covered(now + AHEAD * WIDTH)
    # Later, the maintenance loop keeps them ahead (made once, whoever runs it).
    other = await make()
    later = now + 5 * WIDTH
    # (The empty legacy partition goes after a grace for a rolling upgrade's writes.)
    assert await other.maintain_partitions(later, 0) == [LEGACY]
    await covered(later + AHEAD * WIDTH, legacy=False)
    async with store.db.conn() as con:
        count = len(await partitions(con))
    assert await store.maintain_partitions(later, 0) == []
    async with store.db.conn() as con:
        assert len(await partitions(con)) == count


async def test_retention_drops_whole_partitions_and_newer_logs_replay_intact(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await make()
    now = time.time()
    # A new database: its (empty) `events_legacy` covers every time before it; gone once
    # the rolling upgrade's grace is over, the past has no partition.
    assert await store.maintain_partitions(now + 3 * WIDTH, 0) == [LEGACY]
    old = math.floor(now / WIDTH) * WIDTH - 2 * DAY + 60  # two days ago, in an hour's start
    at(monkeypatch, old)  # no partition there: the create makes it
    await write_log(store, "resp_old", 5)
    await write_log(store, "resp_old_2", 2)  # the same partition
    at(monkeypatch, old + 2 * WIDTH)
    await write_log(store, "resp_running", 4, finish=False)  # still live: keeps its partition
    at(monkeypatch, old + 4 * WIDTH)
    await write_log(store, "resp_slow", 3, finish=False)
    at(monkeypatch, now - 3600)  # ...finished within the retention: keeps its partition
    assert await store.finish("resp_slow", "tok", "completed", {}, [ev("response.completed")])
    monkeypatch.undo()
    await write_log(store, "resp_new", 6)
    gone = record("resp_gone")  # not stored, finished long ago: its row goes as before
    gone.snapshot["store"] = False
    at(monkeypatch, old + 60)
    await store.create(gone, [ev("response.created")])
    assert await store.finish("resp_gone", None, "cancelled", {}, [ev("response.failed")])
    monkeypatch.undo()
    assert await where(store, "resp_old") == {name_of(old - 60)}

    assert await store.purge(time.time() - DAY) == 1
    async with store.db.conn() as con:
        names = {p.name for p in await partitions(con)}
        left = await con.fetchval(
            "SELECT count(*) FROM events WHERE response_id = ANY($1)",
            ["resp_old", "resp_old_2", "resp_gone"],
        )
    assert name_of(old - 60) not in names
    assert left == 0  # gone with their partition
    assert await store.get("resp_old", "t") is not None  # a stored response stays
    assert await store.get("resp_gone", "t") is None
    for rid, deltas, finished in [
        ("resp_running", 4, False),
        ("resp_slow", 3, True),
        ("resp_new", 6, True),
    ]:
        check_log(await durable(store, rid), rid, deltas, finished)
    # The live one still appends into its (kept) partition, and ends.
    assert await store.append("resp_running", "tok", [ev(delta="resp_running-4")], tokens=1)
    assert await store.finish("resp_running", "tok", "completed", {}, [ev("response.completed")])
    check_log(await durable(store, "resp_running"), "resp_running", 5)
    assert await where(store, "resp_running") == {name_of(old - 60 + 2 * WIDTH)}

    # Once they are past the retention too, their partitions go; nothing else does.
    later = time.time() + DAY + 1
    dropped = await store.maintain_partitions(later, later - DAY)
    assert name_of(old - 60 + 2 * WIDTH) in dropped
    assert name_of(old - 60 + 4 * WIDTH) in dropped
    check_log(await durable(store, "resp_new"), "resp_new", 6)


async def test_a_log_appended_across_a_partition_boundary_stays_in_one(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await make()
    # Between two partitions made ahead.
    boundary = math.ceil(time.time() / WIDTH) * WIDTH + WIDTH
    at(monkeypatch, boundary - 1)
    await write_log(store, "resp_before", 2, finish=False)
    at(monkeypatch, boundary + 1)  # the hour turns while it runs
    await write_log(store, "resp_after", 3)
    for i in range(2, 7):
        assert await store.append("resp_before", "tok", [ev(delta=f"resp_before-{i}")])
    await store.flush()
    assert await store.finish("resp_before", "tok", "completed", {}, [ev("response.completed")])
    monkeypatch.undo()

    assert await where(store, "resp_before") == {name_of(boundary - WIDTH)}
    assert await where(store, "resp_after") == {name_of(boundary)}
    check_log(await durable(store, "resp_before"), "resp_before", 7)
    check_log(await durable(store, "resp_after"), "resp_after", 3)
    # And from any point, through the store's own read.
    tail = await store.read("resp_before", 4)
    assert [e.seq for e in tail] == list(range(5, 10))


@pytest.mark.parametrize("prepared", [False, True], ids=["as-is", "prepared-online"])
async def test_a_database_at_0003_upgrades_with_every_event_readable(
    make: Make, pg: str, prepared: bool
) -> None:
    """As it is (the migration reads the table once), or with the column and its check
    added online beforehand (`PREPARE`, for a very large table: the attach reads nothing)."""
    now = time.time()
    logs = {"resp_done": 7, "resp_running": 4}
    con = await asyncpg.connect(pg)
    try:
        await con.execute(pg_sql_up_to("0003"))
        for rid, count in logs.items():
            done = rid == "resp_done"
            await con.execute(
                "INSERT INTO responses (id, tenant, status, run_token, owner, lease_until, "
                "last_seq, stored, created_at, finished_at) "
                "VALUES ($1, 't', $2, $3, 'me', $4, $5, true, $6, $7)",
                rid,
                "completed" if done else "in_progress",
                None if done else "tok",
                0 if done else now + 3600,
                count - 1,
                now - 100,
                now - 50 if done else None,
            )
            await con.execute(
                "INSERT INTO response_bodies VALUES ($1, $2, '{}', '[]')",
                rid,
                orjson.dumps({"id": rid}),
            )
            entries = numbered(0, [ev(delta=f"{rid}-{i}") for i in range(count)])
            for first in range(0, count, 3):  # as 0003's store wrote them: a row a batch
                batch = entries[first : first + 3]
                await con.execute(
                    "INSERT INTO events (response_id, first_seq, last_seq, types, tokens, data) "
                    "VALUES ($1, $2, $3, $4, 0, $5)",
                    rid,
                    first,
                    first + len(batch) - 1,
                    *pack(batch),
                )
        table = await con.fetchval("SELECT 'events'::regclass::oid")
        if prepared:
            for statement in filter(None, map(str.strip, PREPARE.split(";"))):
                await con.execute(statement)
    finally:
        await con.close()

    store = await make()  # migrates to the newest revision
    async with store.db.conn() as con:
        assert await con.fetchval("SELECT version_num FROM alembic_version") == "0006"
        # Attached as it was, not copied.
        assert await con.fetchval("SELECT $1::oid::regclass::text", table) == LEGACY
    for rid, count in logs.items():
        log = [orjson.loads(e.data) for e in await store.read(rid, -1)]
        assert [e["delta"] for e in log] == [f"{rid}-{i}" for i in range(count)]
        assert [e["sequence_number"] for e in log] == list(range(count))
    # The run that was live goes on appending, into the same partition, and ends.
    assert await store.append("resp_running", "tok", [ev(delta="resp_running-4")])
    assert await store.finish("resp_running", "tok", "completed", {}, [ev("response.completed")])
    log = await durable(store, "resp_running")
    assert [e["sequence_number"] for e in log] == list(range(6))
    assert await where(store, "resp_running") == {LEGACY}
    # A new response goes to a time partition; the legacy one stays while it matters.
    await write_log(store, "resp_new", 2)
    assert await where(store, "resp_new") not in ({LEGACY}, set())
    await store.purge(time.time() - DAY)
    async with store.db.conn() as con:
        assert LEGACY in {p.name for p in await partitions(con)}
        # A process of the previous version (no `created_at`) still appends meanwhile.
        await con.execute(
            "INSERT INTO events (response_id, first_seq, last_seq, types, tokens, data) "
            "VALUES ('resp_done', 7, 7, 'x', 0, '\\x7b7d')"
        )
    assert await where(store, "resp_done") == {LEGACY}
    # Once none of its responses is live (after the rolling upgrade's grace), the time is
    # noted; past the retention from then, it goes like any partition.
    later = time.time() + 2 * DAY
    assert LEGACY not in await store.maintain_partitions(later, later - DAY)
    assert LEGACY not in await store.maintain_partitions(later + DAY - 1, later - 1)
    assert LEGACY in await store.maintain_partitions(later + DAY, later)
    assert await where(store, "resp_done") == set()


async def test_a_new_database_drops_its_empty_legacy_partition_after_the_grace(
    make: Make,
) -> None:
    store = await make()
    now = time.time()
    assert await store.maintain_partitions(now, now - DAY) == []  # a rolling upgrade may write
    await write_log(store, "resp_new", 1)
    later = now + 3 * WIDTH
    assert await store.maintain_partitions(later, later - DAY) == [LEGACY]
    check_log(await durable(store, "resp_new"), "resp_new", 1)
    assert upgrade_sql("0006").strip() == ""  # the newest revision


async def test_a_drop_cut_short_is_finished_by_the_next_round(
    make: Make, pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await make()
    now = time.time()
    assert await store.maintain_partitions(now + 3 * WIDTH, 0) == [LEGACY]
    old = math.floor(now / WIDTH) * WIDTH - 2 * DAY
    at(monkeypatch, old + 60)
    await write_log(store, "resp_old", 2)
    monkeypatch.undo()
    # A long transaction still sees `events`: a concurrent detach waits for it, and is
    # cut short there (a timeout, a killed process) with the partition "detach pending".
    holder = await asyncpg.connect(pg)
    detacher = await asyncpg.connect(pg)
    try:
        await holder.execute("BEGIN")
        await holder.fetchval("SELECT count(*) FROM events")
        await detacher.execute("SET statement_timeout = '300ms'")
        with pytest.raises(asyncpg.QueryCanceledError):
            await detacher.execute(
                f"ALTER TABLE events DETACH PARTITION {name_of(old)} CONCURRENTLY"
            )
        await holder.execute("ROLLBACK")
    finally:
        await holder.close()
        await detacher.close()
    async with store.db.conn() as con:
        assert [p.name for p in await partitions(con) if p.detaching] == [name_of(old)]
    later = time.time()
    assert await store.maintain_partitions(later, later - DAY) == [name_of(old)]
    assert await where(store, "resp_old") == set()
    # Detached, and the process stopped before its drop: the next round drops it.
    at(monkeypatch, old + 60 + WIDTH)
    await write_log(store, "resp_older", 1)
    monkeypatch.undo()
    async with store.db.conn() as con:
        await con.execute(f"ALTER TABLE events DETACH PARTITION {name_of(old + WIDTH)}")
    assert await store.maintain_partitions(later, later - DAY) == [name_of(old + WIDTH)]
    async with store.db.conn() as con:
        assert await con.fetchval("SELECT to_regclass($1)", name_of(old)) is None


async def test_0006_goes_back_down_to_one_table_with_every_event(make: Make, pg: str) -> None:
    store = await make()
    await write_log(store, "resp_a", 4)
    await store.close()
    buffer = io.StringIO()
    config = Config(output_buffer=buffer)
    config.attributes["buffer"] = buffer
    config.set_main_option("script_location", str(Path(pg_sql.__file__).parent / "pg_migrations"))
    command.downgrade(config, "0006:0003", sql=True)
    con = await asyncpg.connect(pg)
    try:
        async with con.transaction():
            await con.execute(buffer.getvalue())
        assert await con.fetchval("SELECT relkind FROM pg_class WHERE relname = 'events'") == b"r"
        rows = await con.fetch(
            "SELECT first_seq, types, data FROM events WHERE response_id = 'resp_a' "
            "ORDER BY first_seq"
        )
    finally:
        await con.close()
    log = [orjson.loads(e.data) for e in unpack(rows, -1)]
    check_log(log, "resp_a", 4)


async def test_a_long_retention_gets_wider_partitions(make: Make) -> None:
    """Every replay opens each partition (pruning happens as it runs): about 24 of them
    per retention, not one an hour for a month."""
    assert width_for(3600) == width_for(DAY) == WIDTH
    assert width_for(7 * DAY) == 6 * WIDTH
    assert width_for(30 * DAY) == 24 * WIDTH
    store = await make()
    now = time.time()
    await store.purge(now - 30 * DAY)
    async with store.db.conn() as con:
        parts = [p for p in await partitions(con) if p.name != LEGACY]
    assert all(a.hi == b.lo for a, b in itertools.pairwise(parts))
    assert parts[-1].hi >= now + AHEAD * DAY
    assert parts[-1].hi - parts[-1].lo == DAY  # after the hourly ones made at open
    assert len(parts) < 2 * (AHEAD + 2)
