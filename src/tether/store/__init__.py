"""Stores: where responses and their event logs live."""

from __future__ import annotations

from tether.store.base import (
    Conversations,
    EventLog,
    IdempotencyConflict,
    Leases,
    LogEntry,
    Maintenance,
    Record,
    Store,
    StoreUnavailable,
    Transitions,
    UnknownItem,
)
from tether.store.logcache import DEFAULT_BUDGET


def make_store(
    url: str,
    redis: str | None = None,
    prefix: str = "tether",
    cache_bytes: int = DEFAULT_BUDGET,
    read_url: str | None = None,
) -> Store:
    """A store for `--db`: a SQLite file path (the default) or `sqlite:///path`; or a
    `postgresql://` URL, scaled out: PostgreSQL for durable records and Redis (`redis`,
    required then) for live event streams and wake-ups, its keys under `prefix:`. Either
    keeps at most about `cache_bytes` of event logs in memory (`logcache.py`). `read_url`
    (`--db-read`, PostgreSQL only): a streaming replica that replays finished logs."""
    if url.startswith(("postgresql://", "postgres://")):
        if not redis:
            raise ValueError(
                "a PostgreSQL store needs Redis too: pass --redis redis://HOST:PORT "
                "(or set TETHER_REDIS)"
            )
        from tether.store.postgres import PostgresStore

        return PostgresStore(url, redis, prefix, cache_bytes=cache_bytes, read_url=read_url)
    if read_url:
        raise ValueError("--db-read (a read replica) needs --db postgresql://...")
    from tether.store.sqlite import SQLiteStore

    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    return SQLiteStore(path, cache_bytes)


__all__ = [
    "Conversations",
    "EventLog",
    "IdempotencyConflict",
    "Leases",
    "LogEntry",
    "Maintenance",
    "Record",
    "Store",
    "StoreUnavailable",
    "Transitions",
    "UnknownItem",
    "make_store",
]
