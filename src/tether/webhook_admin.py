"""What `tether webhooks` does to a server's database (the CLI only prints).

The command migrates the database and then uses the store's own `Webhooks`
implementation on a connection of its own, rather than writing SQL of its own: one
implementation of the tables, and `tether webhooks add` works before the server's first
start (the tables are there) as well as while it runs (SQLite in WAL mode lets the
server go on; on PostgreSQL the migration takes the same advisory lock as a server's).
It does not open a whole store: that would need Redis, and start nothing of use here.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tether.store.hooks import Endpoint, Webhooks
from tether.webhooks import check_target, new_endpoint_id, new_secret, parse_events


@contextlib.asynccontextmanager
async def hooks_for(db: str) -> AsyncIterator[Webhooks]:
    """The webhook part of the store at `db` (a SQLite file or a PostgreSQL URL)."""
    if db.startswith(("postgresql://", "postgres://")):
        from tether.store import pg_sql
        from tether.store.pg_hooks import PgHooks
        from tether.store.pg_pool import Database

        database = Database(db, size=1)
        await database.open(pg_sql.migrate)
        try:
            yield PgHooks(database)
        finally:
            await database.close()
        return
    from tether.store.sqlite import migrate
    from tether.store.sqlite_hooks import SQLiteHooks

    path = db.removeprefix("sqlite:///")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    migrate(path)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA busy_timeout=5000")  # the server may be writing
    try:
        yield SQLiteHooks(lambda: con)
    finally:
        con.close()


async def add(db: str, url: str, events: str, tenant: str, allowed: list[str]) -> Endpoint:
    """Add an endpoint (ValueError: a bad URL or event list). Its secret is in the
    returned endpoint: the only time it is shown."""
    check_target(url, allowed)
    endpoint = Endpoint(
        new_endpoint_id(), tenant, url, parse_events(events), new_secret(), time.time()
    )
    async with hooks_for(db) as hooks:
        await hooks.add_endpoint(endpoint)
    return endpoint


async def listing(db: str, tenant: str | None) -> list[dict[str, Any]]:
    async with hooks_for(db) as hooks:
        endpoints = await hooks.endpoints(tenant)
    return [
        {
            "id": e.id,
            "tenant": e.tenant,
            "url": e.url,
            "events": ",".join(e.events),
            "secret": e.secret[:10] + "…",  # a hint, as OpenAI shows it
            "created_at": int(e.created_at),
        }
        for e in endpoints
    ]


async def remove(db: str, endpoint_id: str) -> bool:
    async with hooks_for(db) as hooks:
        return await hooks.remove_endpoint(endpoint_id)


KEEP_OLD = 24 * 3600.0  # OpenAI's `keep_old_secret_active_for_24_hours`


async def rotate(db: str, endpoint_id: str, keep_old: bool = False) -> str | None:
    """A new secret for the endpoint (None: no such endpoint); `keep_old`: the old one
    signs too, for 24 hours."""
    secret = new_secret()
    until = time.time() + KEEP_OLD if keep_old else None
    async with hooks_for(db) as hooks:
        return secret if await hooks.rotate_secret(endpoint_id, secret, until) else None


async def deliveries(db: str, endpoint_id: str | None, limit: int) -> list[dict[str, Any]]:
    async with hooks_for(db) as hooks:
        return [d.row() for d in await hooks.deliveries(endpoint_id, limit)]
