"""`Webhooks` on the embedded store's SQLite connection (`store/hooks.py`).

Like the rest of the embedded store, every call runs on the event loop thread, without
an await between its statements: a claim is one transaction, so two senders (a server and
a `tether webhooks` command never both send, but two servers could share a file by
mistake) never lease one delivery at once.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection

from tether.store.hooks import (
    DELIVERY_COLUMNS,
    ENDPOINT_COLUMNS,
    Delivery,
    Endpoint,
    to_delivery,
    to_endpoint,
)
from tether.store.sqlite_io import transaction, write

DUE = "delivered_at IS NULL AND gave_up = 0"

CLAIM = f"""
UPDATE webhook_deliveries SET lease_owner = ?1, lease_until = ?2
WHERE id IN (
    SELECT id FROM (
        SELECT id, next_at,
               row_number() OVER (PARTITION BY endpoint_id ORDER BY next_at) AS n
        FROM webhook_deliveries
        WHERE {DUE} AND next_at <= ?3 AND lease_until < ?3
          AND endpoint_id NOT IN (SELECT value FROM json_each(?4))
    ) WHERE n <= ?5 ORDER BY next_at LIMIT ?6
)
RETURNING id
"""


class SQLiteHooks:
    """`Webhooks` on the connection `db()` returns (the store's, or a CLI's own)."""

    def __init__(self, db: Callable[[], sqlite3.Connection]) -> None:
        self._db = db
        self.wake: Callable[[], None] = _nothing  # the sender sets it (`hooks_sender`)

    async def add_endpoint(self, endpoint: Endpoint) -> None:
        write(
            self._db(),
            f"INSERT INTO webhook_endpoints ({ENDPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (
                endpoint.id,
                endpoint.tenant,
                endpoint.url,
                json.dumps(endpoint.events),
                endpoint.secret,
                endpoint.created_at,
            ),
        )

    async def endpoints(self, tenant: str | None = None) -> list[Endpoint]:
        where, args = ("", ()) if tenant is None else (" WHERE tenant = ?", (tenant,))
        rows = (
            self._db()
            .execute(
                f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints{where} ORDER BY created_at",
                args,
            )
            .fetchall()
        )
        return [to_endpoint(r) for r in rows]

    async def remove_endpoint(self, endpoint_id: str) -> bool:
        db = self._db()
        with transaction(db):
            cur = db.execute("DELETE FROM webhook_endpoints WHERE id = ?", (endpoint_id,))
            db.execute("DELETE FROM webhook_deliveries WHERE endpoint_id = ?", (endpoint_id,))
        return cur.rowcount == 1

    async def rotate_secret(
        self, endpoint_id: str, secret: str, keep_old_until: float | None = None
    ) -> bool:
        cur = write(
            self._db(),
            "UPDATE webhook_endpoints SET old_secret = CASE WHEN ?1 IS NULL THEN NULL "
            "ELSE secret END, old_secret_until = ?1, secret = ?2 WHERE id = ?3",
            (keep_old_until, secret, endpoint_id),
        )
        return cur.rowcount == 1

    async def claim(
        self,
        owner: str,
        now: float,
        lease_until: float,
        per_endpoint: int,
        limit: int,
        busy: Collection[str] = (),
    ) -> list[Delivery]:
        db = self._db()
        with transaction(db):
            ids = [
                r[0]
                for r in db.execute(
                    CLAIM, (owner, lease_until, now, json.dumps(list(busy)), per_endpoint, limit)
                ).fetchall()
            ]
            if not ids:
                return []
            rows = db.execute(
                f"SELECT {_prefixed('d')}, e.url, e.secret, "
                "CASE WHEN e.old_secret_until > ? THEN e.old_secret END "
                "FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id "
                "WHERE d.id IN (SELECT value FROM json_each(?)) ORDER BY d.next_at",
                (now, json.dumps(ids)),
            ).fetchall()
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
        if status is not None and 200 <= status < 300:
            write(
                self._db(),
                "UPDATE webhook_deliveries SET attempts = attempts + 1, delivered_at = ?, "
                "last_status = ?, last_error = NULL, lease_owner = NULL, lease_until = 0 "
                "WHERE id = ? AND delivered_at IS NULL",
                (now, status, delivery_id),
            )
            return
        write(
            self._db(),
            "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = ?, "
            "last_error = ?, next_at = COALESCE(?, next_at), gave_up = ?, "
            "lease_owner = NULL, lease_until = 0 "
            f"WHERE id = ? AND lease_owner = ? AND {DUE}",
            (status, error, next_at, next_at is None, delivery_id, owner),
        )

    async def deliveries(self, endpoint_id: str | None = None, limit: int = 100) -> list[Delivery]:
        where, args = (
            ("", ()) if endpoint_id is None else (" WHERE endpoint_id = ?", (endpoint_id,))
        )
        rows = (
            self._db()
            .execute(
                f"SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries{where} "
                "ORDER BY created_at DESC, id LIMIT ?",
                (*args, limit),
            )
            .fetchall()
        )
        return [to_delivery(r) for r in rows]

    async def pending(self) -> int:
        row = self._db().execute(f"SELECT count(*) FROM webhook_deliveries WHERE {DUE}").fetchone()
        return int(row[0])

    async def purge(self, before: float) -> int:
        cur = write(
            self._db(),
            "DELETE FROM webhook_deliveries "
            "WHERE created_at < ? AND (delivered_at IS NOT NULL OR gave_up = 1)",
            (before,),
        )
        return cur.rowcount


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in DELIVERY_COLUMNS.split(","))


def _nothing() -> None:
    pass
