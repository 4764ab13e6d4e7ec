"""A database made before the ledger counted reasoning tokens (revision 0002) upgrades:
its rows keep their counts with `reasoning_tokens` 0, and responses that end after the
upgrade add theirs, on SQLite and on PostgreSQL. `tether usage` can read such a
database before any server has upgraded it."""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic import command
from alembic.config import Config

import tether.store.sqlite as sqlite_store
from tether import wire
from tether.store import pg_sql
from tether.store.base import Record, Store
from tether.store.postgres import PostgresStore
from tether.store.sqlite import SQLiteStore
from tether.usage import read_ledger

from services import delete_prefix, postgres_url, prefix, redis_url, run

pytestmark = pytest.mark.anyio

# A row as a server before revision 0003 wrote it: (tenant, key_id, model, status,
# responses, input_tokens, output_tokens).
OLD_ROW = ("t", "", "m", "completed", 2, 10, 20)
OLD_INSERT = "INSERT INTO usage_ledger VALUES ('t', '', 'm', 'completed', 2, 10, 20)"


def old_row(reasoning: int) -> dict[str, Any]:
    """`OLD_ROW` as the ledger reads it, with `reasoning` tokens."""
    return {
        "tenant": "t",
        "key_id": None,
        "model": "m",
        "status": "completed",
        "responses": 2,
        "input_tokens": 10,
        "output_tokens": 20,
        "reasoning_tokens": reasoning,
    }


def sqlite_config(path: Path) -> Config:
    config = Config()
    versions = Path(sqlite_store.__file__).parent / "migrations"
    config.set_main_option("script_location", str(versions))
    config.set_main_option("sqlalchemy.url", f"sqlite:///{path}")
    return config


def pg_sql_up_to(revision: str) -> str:
    """The PostgreSQL schema as of `revision`, rendered as the store renders upgrades."""
    buffer = io.StringIO()
    config = Config(output_buffer=buffer)
    config.attributes["buffer"] = buffer
    versions = Path(pg_sql.__file__).parent / "pg_migrations"
    config.set_main_option("script_location", str(versions))
    command.upgrade(config, revision, sql=True)
    return buffer.getvalue()


async def end_a_thinking_response(store: Store) -> None:
    """A response of model `m` ends with 7 output tokens, 4 of them reasoning."""
    rec = Record(
        id="resp_new",
        tenant="t",
        status="queued",
        snapshot={"id": "resp_new"},
        run={},
        input_items=[],
        run_token=None,
        owner="me",
        lease_until=0.0,
        last_seq=-1,
        input_tokens=0,
        finished_at=None,
    )
    await store.create(rec, [{"type": "response.created"}])
    assert await store.claim("resp_new", "tok", "me", 0, {}, [{"type": "response.in_progress"}])
    final = {"id": "resp_new", "model": "m", "usage": wire.usage(1, 7, 4)}
    assert await store.finish("resp_new", "tok", "completed", final, [], tokens=7)


UPGRADED_AND_ADDED = old_row(4) | {
    "responses": 3,
    "input_tokens": 11,
    "output_tokens": 27,
}


async def test_a_sqlite_database_at_0002_upgrades(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    command.upgrade(sqlite_config(path), "0002")
    with sqlite3.connect(path) as db:
        db.execute(OLD_INSERT)
        columns = {c[1] for c in db.execute("PRAGMA table_info(usage_ledger)")}
    assert "reasoning_tokens" not in columns
    # `tether usage` reads it as it is: no reasoning counted then.
    assert await read_ledger(str(path), None) == [old_row(0)]

    store = SQLiteStore(str(path))
    await store.open()  # migrates to the newest revision
    try:
        assert await store.usage(None) == [old_row(0)]
        await end_a_thinking_response(store)
        assert await store.usage("t") == [UPGRADED_AND_ADDED]
    finally:
        await store.close()
    assert await read_ledger(str(path), "t") == [UPGRADED_AND_ADDED]

    # The revision goes back down too: the ledger as it was, reasoning dropped.
    command.downgrade(sqlite_config(path), "0002")
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT * FROM usage_ledger").fetchall()
    assert rows == [(*OLD_ROW[:4], 3, 11, 27)]


@pytest.fixture
def pg() -> Iterator[str]:
    with postgres_url() as url:
        yield url


async def test_a_postgres_database_at_0002_upgrades(pg: str) -> None:
    con = await asyncpg.connect(pg)
    try:
        await con.execute(pg_sql_up_to("0002"))
        assert await con.fetchval("SELECT version_num FROM alembic_version") == "0002"
        await con.execute(OLD_INSERT)
    finally:
        await con.close()
    assert await read_ledger(pg, None) == [old_row(0)]

    redis, keys = redis_url(), prefix()
    store = PostgresStore(pg, redis, keys)
    try:
        await store.open()  # migrates from 0002
        assert await store.usage(None) == [old_row(0)]
        await end_a_thinking_response(store)
        assert await store.usage("t") == [UPGRADED_AND_ADDED]
    finally:
        await store.close()
        run(delete_prefix(redis, keys))
    assert await read_ledger(pg, "t") == [UPGRADED_AND_ADDED]
