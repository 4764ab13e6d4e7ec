"""Stores: where responses and their event logs live."""

from __future__ import annotations

from tether.store.base import IdempotencyConflict, LogEntry, Record, Store


def make_store(url: str, redis: str | None = None, prefix: str = "tether") -> Store:
    """A store for `--db`: a SQLite file path (the default) or `sqlite:///path`."""
    from tether.store.sqlite import SQLiteStore

    if url.startswith(("postgresql://", "postgres://")):
        raise ValueError("the PostgreSQL store is not built yet")

    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    return SQLiteStore(path)


__all__ = ["IdempotencyConflict", "LogEntry", "Record", "Store", "make_store"]
