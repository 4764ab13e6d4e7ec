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
from tether.store.common import USAGE, USAGE_ORDER

# Summed into `totals`; `reasoning_tokens` are a part of `output_tokens` (and so of
# `total_tokens`), as in a response's usage.
TOTALS = ("responses", "input_tokens", "output_tokens", "reasoning_tokens", "total_tokens")


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
            "reasoning_tokens": r["reasoning_tokens"],
            "total_tokens": r["input_tokens"] + r["output_tokens"],
        }
        for r in rows
        if (key_id is None or r["key_id"] == key_id)
        and (model is None or r["model"] == model)
        and (status is None or r["status"] == status)
    ]
    totals = {f: sum(d[f] for d in data) for f in TOTALS}
    return {"object": "list", "tenant": tenant, "data": data, "totals": totals}


# A database the server has not migrated yet (before revision 0003) has no
# `reasoning_tokens`: its rows read as 0, as the migration would make them.
OLD_USAGE = USAGE.replace("reasoning_tokens FROM", "0 FROM")


async def read_ledger(db: str, tenant: str | None) -> list[dict[str, Any]]:
    """Read the ledger straight from a server's database (SQLite file or PostgreSQL
    URL), read-only: no store is opened, nothing is migrated, a running server is fine."""
    where = "" if tenant is None else " WHERE tenant = $1"
    args = () if tenant is None else (tenant,)
    if db.startswith(("postgresql://", "postgres://")):
        import asyncpg

        con = await asyncpg.connect(db, timeout=5)
        try:
            try:
                rows = await con.fetch(f"{USAGE}{where}{USAGE_ORDER}", *args)
            except asyncpg.UndefinedColumnError:
                rows = await con.fetch(f"{OLD_USAGE}{where}{USAGE_ORDER}", *args)
        finally:
            await con.close()
        return [ledger_row(r) for r in rows]
    path = db.removeprefix("sqlite:///")
    where = where.replace("$1", "?")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        try:
            cur = con.execute(f"{USAGE}{where}{USAGE_ORDER}", args)
        except sqlite3.OperationalError as exc:
            if "reasoning_tokens" not in str(exc):
                raise
            cur = con.execute(f"{OLD_USAGE}{where}{USAGE_ORDER}", args)
        return [ledger_row(r) for r in cur.fetchall()]
