"""Alembic environment for PostgreSQL, offline mode only: it renders the upgrade as SQL.

The store runs that SQL itself over asyncpg (its one driver: no libpq, no greenlet), in
one transaction under an advisory lock, after reading the current revision under that
lock (`postgres.migrate`). So several processes opening the same database at once
migrate it once, and a failed upgrade leaves the previous revision intact (Postgres DDL
is transactional).
"""

from __future__ import annotations

from alembic import context

assert context.is_offline_mode(), "run by tether.store.postgres.migrate (SQL only)"
context.configure(
    dialect_name="postgresql",
    literal_binds=True,
    transactional_ddl=False,  # the caller's transaction holds the lock and the DDL
    output_buffer=context.config.attributes["buffer"],
)
with context.begin_transaction():
    context.run_migrations()
