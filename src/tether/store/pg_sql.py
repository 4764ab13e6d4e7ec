"""The PostgreSQL store's SQL: schema migration, the statements that decide races, and
the arrays a batch of appends is sent as (the row conversions both stores share are in
`common.py`)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from tether.store.base import LEDGER_UPSERT, LogEntry, Record
from tether.store.common import LIVE, Pending, pack
from tether.store.pg_hooks import OUTBOX

# One round trip for a whole flush. A response's row matches only if the batch's run
# token is current, the response live, and its `last_seq` the one the batch follows.
APPEND = f"""
WITH b AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[], $5::int[], $6::int[],
                         $7::text[], $8::bytea[])
        AS b(id, token, first_seq, last_seq, tokens, input_tokens, types, data)
), u AS (
    UPDATE responses r SET last_seq = b.last_seq, output_tokens = r.output_tokens + b.tokens,
                           input_tokens = COALESCE(b.input_tokens, r.input_tokens)
    FROM b
    WHERE r.id = b.id AND r.run_token = b.token AND r.{LIVE} AND r.last_seq = b.first_seq - 1
    RETURNING r.id, r.created_at
), i AS (
    INSERT INTO events (response_id, first_seq, last_seq, types, tokens, data, created_at)
    SELECT b.id, b.first_seq, b.last_seq, b.types, b.tokens, b.data, u.created_at
    FROM b JOIN u ON u.id = b.id
    WHERE b.last_seq >= b.first_seq
)
SELECT id FROM u
"""

# A state change with its events: $1 id, $2 last_seq it follows, $3 new last_seq,
# $4 tokens, $5 snapshot, $6 types, $7 data, then the assignment's own values.
TRANSITION = f"""
WITH u AS (
    UPDATE responses SET {{set}}, last_seq = $3, output_tokens = output_tokens + $4
    WHERE id = $1 AND last_seq = $2 AND {LIVE} AND {{guard}}
    RETURNING id, tenant, key_id, created_at
), s AS (
    UPDATE response_bodies SET snapshot = $5 FROM u WHERE response_bodies.id = u.id
), i AS (
    INSERT INTO events (response_id, first_seq, last_seq, types, tokens, data, created_at)
    SELECT u.id, $2 + 1, $3, $6, $4, $7, u.created_at FROM u WHERE $3 > $2
){{ledger}}
SELECT count(*) FROM u
"""
CLAIM = TRANSITION.format(
    set="status = 'in_progress', run_token = $8, owner = $9, lease_until = $10",
    guard="run_token IS NULL",
    ledger="",
)
# The terminal transition also counts the response in the usage ledger ($11 model,
# $12 input, $13 output and $14 reasoning tokens), in the same statement: exactly once;
# and puts its webhooks in the outbox ($15: a background response), in that statement too.
FINISH = TRANSITION.format(
    set="status = $8::text, finished_at = $9, lease_until = 0",
    guard="run_token IS NOT DISTINCT FROM $10",
    ledger=f""", l AS (
    INSERT INTO usage_ledger (tenant, key_id, model, status, responses, input_tokens,
                              output_tokens, reasoning_tokens)
    SELECT u.tenant, u.key_id, $11, $8::text, 1, $12, $13, $14 FROM u
    {LEDGER_UPSERT}
){OUTBOX}""",
)

CREATE = """
WITH r AS (
    INSERT INTO responses (id, tenant, status, owner, lease_until, last_seq, stored, created_at,
                           key_id)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $14)
), b AS (
    INSERT INTO response_bodies VALUES ($1, $9, $10, $11)
)
INSERT INTO events (response_id, first_seq, last_seq, types, tokens, data, created_at)
SELECT $1, 0, $6, $12, 0, $13, $8 WHERE $6 >= 0
"""

# Plain creates, many in one statement (`rounds.py`): the columns of `CREATE`, as
# arrays of one element per response (`create_columns`).
CREATE_MANY = """
WITH r AS (
    INSERT INTO responses (id, tenant, status, owner, lease_until, last_seq, stored, created_at,
                           key_id)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[],
                         $6::int[], $7::bool[], $8::float8[], $9::text[])
), b AS (
    INSERT INTO response_bodies (id, snapshot, run, input_items)
    SELECT * FROM unnest($1::text[], $10::bytea[], $11::bytea[], $12::bytea[])
)
INSERT INTO events (response_id, first_seq, last_seq, types, tokens, data, created_at)
SELECT e.id, 0, e.last_seq, e.types, 0, e.data, e.created_at
FROM unnest($1::text[], $6::int[], $13::text[], $14::bytea[], $8::float8[])
    AS e(id, last_seq, types, data, created_at)
WHERE e.last_seq >= 0
"""

# A log's events after $2, from the partition of its response's creation time (`events` is
# partitioned by it: `pg_partitions.py`), or of 0 (`events_legacy`, rows from before
# migration 0006): the others are pruned when the statement runs, so a replay is one range
# scan of a partition's primary key (two while `events_legacy` exists).
READ = """
SELECT first_seq, types, data FROM events
WHERE response_id = $1 AND last_seq > $2
  AND created_at = ANY(ARRAY[0, (SELECT created_at FROM responses WHERE id = $1)])
ORDER BY first_seq
"""
# The same from a read replica, after a row (-1) only if the response is terminal there
# (`pg_replica.py`): one statement, so status and events come from one snapshot.
READ_FINISHED = f"""
SELECT -1 AS first_seq, NULL AS types, NULL AS data FROM responses
WHERE id = $1 AND NOT {LIVE}
UNION ALL
SELECT first_seq, types, data FROM events
WHERE response_id = $1 AND last_seq > $2
  AND created_at = ANY(ARRAY[0, (SELECT created_at FROM responses WHERE id = $1)])
ORDER BY first_seq
"""


MIGRATION_LOCK = 0x7E7E_0001  # advisory lock key: only tether's migrations take it


async def migrate(con: asyncpg.Connection) -> None:
    """Bring the database schema to the newest revision. Alembic renders the upgrade
    from the current revision as SQL; it runs in one transaction under an advisory lock,
    so processes opening the same database at once migrate it once."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        current = None
        if await con.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL"):
            current = await con.fetchval("SELECT version_num FROM alembic_version")
        script = await asyncio.to_thread(upgrade_sql, current)
        if script.strip():
            await con.execute(script)


def upgrade_sql(current: str | None) -> str:
    from alembic import command
    from alembic.config import Config

    buffer = io.StringIO()
    config = Config(output_buffer=buffer)
    config.attributes["buffer"] = buffer
    config.set_main_option("script_location", str(Path(__file__).parent / "pg_migrations"))
    command.upgrade(config, f"{current}:head" if current else "head", sql=True)
    return buffer.getvalue()


def batch_columns(rows: Iterable[tuple[str, Pending, int, list[LogEntry]]]) -> list[list[Any]]:
    """The arrays `APPEND` unnests: one element per response."""
    ids, tokens, firsts, lasts, counts, inputs, types, datas = ([] for _ in range(8))
    for rid, p, first, entries in rows:
        ids.append(rid)
        tokens.append(p.run_token)
        firsts.append(first)
        lasts.append(first + len(entries) - 1)
        counts.append(p.tokens)
        inputs.append(p.input_tokens)
        kinds, data = pack(entries)
        types.append(kinds)
        datas.append(data)
    return [ids, tokens, firsts, lasts, counts, inputs, types, datas]


def create_columns(batch: Iterable[tuple[Record, list[LogEntry], float]]) -> list[list[Any]]:
    """The arrays `CREATE_MANY` unnests: (record, its first events, creation time) each."""
    cols: list[list[Any]] = [[] for _ in range(14)]
    for record, entries, created in batch:
        kinds, data = pack(entries)
        row = (
            record.id,
            record.tenant,
            record.status,
            record.owner,
            record.lease_until,
            len(entries) - 1,
            bool(record.snapshot.get("store", True)),
            created,
            record.key_id or "",
            orjson.dumps(record.snapshot),
            orjson.dumps(record.run),
            orjson.dumps(record.input_items),
            kinds,
            data,
        )
        for col, value in zip(cols, row, strict=True):
            col.append(value)
    return cols
