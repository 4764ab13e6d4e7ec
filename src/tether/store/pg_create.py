"""Plain creates (no idempotency key, no conversation turn) of the PostgreSQL store, many
in one statement (`sql.CREATE_MANY`), gathered by `rounds.Rounds`: in a burst of creates
a pooled connection is held for one round trip per round instead of one per create."""

from __future__ import annotations

import asyncio

import asyncpg

from tether.store import pg_partitions
from tether.store import pg_sql as sql
from tether.store.base import LogEntry, Record, StoreUnavailable
from tether.store.pg_pool import Database

Plain = tuple[Record, list[LogEntry], float]  # a record, its first events, creation time


async def create_round(db: Database, batch: list[Plain]) -> list[Exception | None]:
    """Each create's error, or None. If the statement fails for something other than
    the database being away, each create is tried alone, so that one bad create fails
    only its caller."""
    try:
        await insert(db, batch)
    except StoreUnavailable:
        raise
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
        alone = [insert(db, [one]) for one in batch]
        results = await asyncio.gather(*alone, return_exceptions=True)
        return [_alone(r) for r in results]
    return [None] * len(batch)


def _alone(result: BaseException | None) -> Exception | None:
    if isinstance(result, Exception):
        return result
    if result is not None:  # a cancel or an exit: not one create's error
        raise result
    return None


async def insert(db: Database, batch: list[Plain]) -> None:
    args = sql.create_columns(batch)
    try:
        async with db.conn() as con:
            await con.execute(sql.CREATE_MANY, *args)
    except asyncpg.CheckViolationError as exc:
        # No partition for this creation time (`PostgresStore.create`): make it, once more.
        if "no partition" not in str(exc):
            raise
        times = [created for _, _, created in batch]
        async with db.conn() as con:
            await pg_partitions.cover(con, min(times), max(times) + 1)
        async with db.conn() as con:
            await con.execute(sql.CREATE_MANY, *args)
