"""The usage ledger as clients and operators read it: `GET /v1/usage` (a tether
extension) and `tether usage`.

The store writes the ledger in the transaction that makes a response terminal, so each
row is exact: the tokens of every terminal response, by tenant, API key, model and
terminal status, kept after the responses themselves are deleted or expire.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from tether.store.base import ledger_row

COLUMNS = "tenant, key_id, model, status, responses, input_tokens, output_tokens"


def report(
    tenant: str,
    rows: list[dict[str, Any]],
    key_id: str | None = None,
    model: str | None = None,
    status: str | None = None,
) -> dict[str, Any]:
    """`GET /v1/usage`'s body: the tenant's rows, filtered, plus their totals."""
    data = [
        {
            "object": "tether.usage",
            "key_id": r["key_id"],
            "model": r["model"],
            "status": r["status"],
            "responses": r["responses"],
            "input_tokens": r["input_tokens"],
            "output_tokens": r["output_tokens"],
            "total_tokens": r["input_tokens"] + r["output_tokens"],
        }
        for r in rows
        if (key_id is None or r["key_id"] == key_id)
        and (model is None or r["model"] == model)
        and (status is None or r["status"] == status)
    ]
    totals = {
        f: sum(d[f] for d in data)
        for f in ("responses", "input_tokens", "output_tokens", "total_tokens")
    }
    return {"object": "list", "tenant": tenant, "data": data, "totals": totals}


async def read_ledger(db: str, tenant: str | None) -> list[dict[str, Any]]:
    """Read the ledger straight from a server's database (SQLite file or PostgreSQL
    URL), read-only: no store is opened, nothing is migrated, a running server is fine."""
    where = "" if tenant is None else " WHERE tenant = $1"
    query = f"SELECT {COLUMNS} FROM usage_ledger{{}} ORDER BY tenant, key_id, model, status"
    if db.startswith(("postgresql://", "postgres://")):
        import asyncpg

        con = await asyncpg.connect(db, timeout=5)
        try:
            rows = await con.fetch(query.format(where), *([] if tenant is None else [tenant]))
        finally:
            await con.close()
        return [ledger_row(r) for r in rows]
    path = db.removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        cur = con.execute(
            query.format(where.replace("$1", "?")), () if tenant is None else (tenant,)
        )
        return [ledger_row(r) for r in cur.fetchall()]
