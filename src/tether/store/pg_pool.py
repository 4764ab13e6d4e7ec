"""A PostgreSQL connection pool that never hangs: every failure to reach the database
becomes `StoreUnavailable` within bounded time, and the pool reconnects when the
database is back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg

from tether.store.base import StoreUnavailable

OP_TIMEOUT = 5.0  # seconds any store call may take before StoreUnavailable
CONNECT_TIMEOUT = 3.0
ACQUIRE_TIMEOUT = OP_TIMEOUT + CONNECT_TIMEOUT + 2.0
# Errors that mean "the database cannot be reached now", not "the request is wrong".
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)
# Of those, the ones a pooled connection shows when its server side is gone.
STALE: tuple[type[BaseException], ...] = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InternalClientError,
    ConnectionResetError,
    BrokenPipeError,
)


class Database:
    """An asyncpg pool of at most `size` connections to `url`."""

    def __init__(self, url: str, size: int = 10) -> None:
        self.url = url
        self.size = size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "store is not open"
        return self._pool

    async def open(self, migrate: Callable[[asyncpg.Connection], Awaitable[None]] | None) -> None:
        """Migrate the schema on a connection of its own, then open the pool. No
        `migrate` (a read replica): the pool connects when it is first used."""
        try:
            if migrate is not None:
                con = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT)
                try:
                    await asyncio.wait_for(migrate(con), 60)  # waits for another process's
                finally:
                    con.terminate()  # no goodbye: a hung server must not hang the open
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=0,
                max_size=self.size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=OP_TIMEOUT,
                max_inactive_connection_lifetime=60,
            )
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unreachable: {exc!r}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 2.0)
            except TimeoutError:
                self._pool.terminate()
            self._pool = None

    @contextlib.asynccontextmanager
    async def conn(self, transaction: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection (in a transaction if asked). Any loss of the database
        becomes `StoreUnavailable` within `OP_TIMEOUT`: a connection left in an unknown
        state is terminated, never waited on (a rollback or reset on a hung connection
        would wait as long as the hang)."""
        try:
            # Waiting for a busy pool is load, not an outage (connections in use give
            # up within OP_TIMEOUT when the database is gone): a longer bound than a
            # connect's, so a burst of requests queues instead of getting 503s.
            con = await self.pool.acquire(timeout=ACQUIRE_TIMEOUT)  # also bounds release
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
        keep = False  # only a connection that finished cleanly goes back to the pool
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                if transaction:
                    await con.execute("BEGIN")
                yield con
                if transaction:
                    await con.execute("COMMIT")
            keep = True
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
        finally:
            if keep:
                # The work is done (maybe committed): a connection that dies while it is
                # reset for the pool is the pool's loss, not this call's failure.
                try:
                    await self.pool.release(con)
                except UNAVAILABLE:
                    with contextlib.suppress(asyncpg.InterfaceError):
                        con.terminate()
            else:
                # The server rolls back whatever the connection had begun. (A connection
                # that was lost is back in the pool already: nothing to terminate.)
                with contextlib.suppress(asyncpg.InterfaceError):
                    con.terminate()

    async def query(self, method: str, query: str, *args: Any) -> Any:
        """One read-only statement (`fetch`, `fetchrow`, `fetchval`), tried again once on
        a fresh connection if the pooled one turned out dead (the database restarted or
        killed it): reads after an outage do not fail for a stale pool."""
        for attempt in (0, 1):
            try:
                async with self.conn() as con:
                    return await getattr(con, method)(query, *args)
            except StoreUnavailable as exc:
                if attempt or not isinstance(exc.__cause__, STALE):
                    raise
        raise AssertionError("unreachable")
