"""`Webhooks` on PostgreSQL (`store/hooks.py`): every process of a scaled-out deployment
sends, so a claim is one statement that skips rows another process is claiming
(`FOR UPDATE SKIP LOCKED`) and leases what it takes; no delivery is held by two processes
at once while its lease lasts, and a process that dies leaves its leases to expire."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection

from tether.store.hooks import (
    DELIVERY_COLUMNS,
    ENDPOINT_COLUMNS,
    Delivery,
    Endpoint,
    to_delivery,
    to_endpoint,
)
from tether.store.pg_pool import Database

DUE = "delivered_at IS NULL AND NOT gave_up"

# The outbox insert, a CTE of `pg_sql.FINISH` (u: the response made terminal; $8 status,
# $9 now, $15 background). The event id is the `webhook-id` of every attempt.
OUTBOX = """, w AS (
    INSERT INTO webhook_deliveries (id, endpoint_id, tenant, response_id, type, created_at,
                                    next_at)
    SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), e.id, e.tenant, u.id,
           'response.' || $8::text, $9, $9
    FROM webhook_endpoints e JOIN u ON e.tenant = u.tenant
    WHERE $15::boolean AND jsonb_exists(e.events::jsonb, 'response.' || $8::text)
)"""

# $1 owner, $2 lease until, $3 now, $4 busy endpoints, $5 per endpoint, $6 limit. A window
# function cannot sit beside FOR UPDATE: candidates are locked first, then ranked.
CLAIM = f"""
WITH c AS (
    SELECT id, endpoint_id, next_at FROM webhook_deliveries
    WHERE {DUE} AND next_at <= $3 AND lease_until < $3 AND NOT endpoint_id = ANY($4::text[])
    ORDER BY next_at LIMIT $6 * 8
    FOR UPDATE SKIP LOCKED
), r AS (
    SELECT id, next_at, row_number() OVER (PARTITION BY endpoint_id ORDER BY next_at) AS n
    FROM c
), t AS (
    UPDATE webhook_deliveries d SET lease_owner = $1, lease_until = $2
    FROM (SELECT id FROM r WHERE n <= $5 ORDER BY next_at LIMIT $6) s
    WHERE d.id = s.id
    RETURNING d.*
)
SELECT {", ".join(f"t.{c.strip()}" for c in DELIVERY_COLUMNS.split(","))}, e.url, e.secret,
       CASE WHEN e.old_secret_until > $3 THEN e.old_secret END
FROM t JOIN webhook_endpoints e ON e.id = t.endpoint_id ORDER BY t.next_at
"""


class PgHooks:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.wake: Callable[[], None] = _nothing  # the sender sets it (`hooks_sender`)

    async def add_endpoint(self, endpoint: Endpoint) -> None:
        async with self.db.conn() as con:
            await con.execute(
                f"INSERT INTO webhook_endpoints ({ENDPOINT_COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                endpoint.id,
                endpoint.tenant,
                endpoint.url,
                json.dumps(endpoint.events),
                endpoint.secret,
                endpoint.created_at,
            )

    async def endpoints(self, tenant: str | None = None) -> list[Endpoint]:
        where, args = ("", ()) if tenant is None else (" WHERE tenant = $1", (tenant,))
        rows = await self.db.query(
            "fetch",
            f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints{where} ORDER BY created_at",
            *args,
        )
        return [to_endpoint(r) for r in rows]

    async def remove_endpoint(self, endpoint_id: str) -> bool:
        async with self.db.conn(transaction=True) as con:
            gone = await con.fetchval(
                "DELETE FROM webhook_endpoints WHERE id = $1 RETURNING 1", endpoint_id
            )
            await con.execute("DELETE FROM webhook_deliveries WHERE endpoint_id = $1", endpoint_id)
        return bool(gone)

    async def rotate_secret(
        self, endpoint_id: str, secret: str, keep_old_until: float | None = None
    ) -> bool:
        async with self.db.conn() as con:
            done = await con.fetchval(
                "UPDATE webhook_endpoints SET old_secret = CASE WHEN $3::float8 IS NULL "
                "THEN NULL ELSE secret END, old_secret_until = $3, secret = $2 "
                "WHERE id = $1 RETURNING 1",
                endpoint_id,
                secret,
                keep_old_until,
            )
        return bool(done)

    async def claim(
        self,
        owner: str,
        now: float,
        lease_until: float,
        per_endpoint: int,
        limit: int,
        busy: Collection[str] = (),
    ) -> list[Delivery]:
        async with self.db.conn() as con:
            rows = await con.fetch(CLAIM, owner, lease_until, now, list(busy), per_endpoint, limit)
        return [to_delivery(r) for r in rows]

    async def record(
        self,
        delivery_id: str,
        owner: str,
        now: float,
        status: int | None,
        error: str | None,
        next_at: float | None,
    ) -> None:
        async with self.db.conn() as con:
            if status is not None and 200 <= status < 300:
                await con.execute(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, delivered_at = $2, "
                    "last_status = $3, last_error = NULL, lease_owner = NULL, lease_until = 0 "
                    "WHERE id = $1 AND delivered_at IS NULL",
                    delivery_id,
                    now,
                    status,
                )
                return
            await con.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = $3, "
                "last_error = $4, next_at = COALESCE($5, next_at), gave_up = $5 IS NULL, "
                "lease_owner = NULL, lease_until = 0 "
                f"WHERE id = $1 AND lease_owner = $2 AND {DUE}",
                delivery_id,
                owner,
                status,
                error,
                next_at,
            )

    async def deliveries(self, endpoint_id: str | None = None, limit: int = 100) -> list[Delivery]:
        where, args = "", list[object]([limit])
        if endpoint_id is not None:
            where, args = " WHERE endpoint_id = $2", [limit, endpoint_id]
        rows = await self.db.query(
            "fetch",
            f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries{where} "
            "ORDER BY created_at DESC, id LIMIT $1",
            *args,
        )
        return [to_delivery(r) for r in rows]

    async def pending(self) -> int:
        value = await self.db.query(
            "fetchval", f"SELECT count(*) FROM webhook_deliveries WHERE {DUE}"
        )
        return int(value)

    async def purge(self, before: float) -> int:
        async with self.db.conn() as con:
            done = await con.execute(
                "DELETE FROM webhook_deliveries "
                "WHERE created_at < $1 AND (delivered_at IS NOT NULL OR gave_up)",
                before,
            )
        return int(done.split()[-1])


def _nothing() -> None:
    pass
