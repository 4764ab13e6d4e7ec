"""The real services of the scale-out tests: PostgreSQL on 127.0.0.1:5432, Redis on :6379.

`postgres_url()` gives each test its own fresh database (dropped afterwards), so tests
never see each other's rows; `redis_url()` is the shared server (tests keep apart by key
prefix). A service that cannot be reached fails the run under `CI=true` and skips the
test otherwise, naming the command that starts it. `TETHER_TEST_POSTGRES` (an admin URL)
and `TETHER_TEST_REDIS` point elsewhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, NoReturn, TypeVar

import pytest

START = "scripts/services"  # starts whichever of PostgreSQL and Redis is down
POSTGRES_ADMIN = (
    "postgresql://postgres@127.0.0.1:5432/postgres",
    "postgresql://root@127.0.0.1:5432/postgres",
)
REDIS = "redis://127.0.0.1:6379/0"

T = TypeVar("T")


def missing(service: str, why: object) -> NoReturn:
    message = f"{service} is not reachable ({why}); start it with `{START}`"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop
    (an async test calling a sync helper): on a thread of its own."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def redis_url() -> str:
    """The Redis URL, after checking that it answers."""
    import redis.asyncio as aioredis

    url = os.environ.get("TETHER_TEST_REDIS", REDIS)

    async def ping() -> None:
        client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        run(ping())
    except Exception as exc:
        missing(f"Redis at {url}", exc)
    return url


def _admin_urls() -> tuple[str, ...]:
    url = os.environ.get("TETHER_TEST_POSTGRES")
    return (url,) if url else POSTGRES_ADMIN


def _with_database(admin: str, name: str) -> str:
    base, _, _ = admin.rpartition("/")
    return f"{base}/{name}"


async def _admin(sql: str) -> str:
    """Run `sql` as the first admin URL that connects; which one it was."""
    import asyncpg

    errors = []
    for url in _admin_urls():
        try:
            con = await asyncpg.connect(url, timeout=3)
        except Exception as exc:
            errors.append(f"{url}: {exc}")
            continue
        try:
            await con.execute(sql)
        finally:
            await con.close()
        return url
    raise ConnectionError("; ".join(errors))


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    """A fresh, empty database (`tether_<random>`), dropped afterwards."""
    name = f"tether_{uuid.uuid4().hex[:12]}"
    try:
        admin = run(_admin(f"CREATE DATABASE {name}"))
    except Exception as exc:
        missing("PostgreSQL at 127.0.0.1:5432", exc)
    try:
        yield _with_database(admin, name)
    finally:
        # FORCE: connections a test left open (a killed process's) must not keep it.
        run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def prefix() -> str:
    """A Redis key prefix of one's own."""
    return f"t{uuid.uuid4().hex[:10]}"


async def delete_prefix(url: str, key_prefix: str) -> None:
    """Remove every key under `key_prefix:` (a test's cleanup); on a cluster, on every
    master, including the shards' keys (`{key_prefix:qN}:...`)."""
    from tether import redisconn

    client = redisconn.connect(redisconn.parse(url), socket_timeout=5)
    try:
        for match in (f"{key_prefix}:*", f"{{{key_prefix}:q*"):
            keys = [k async for k in client.scan_iter(match=match, count=1000)]
            for key in keys:  # one by one: on a cluster, keys of one call share a slot
                await client.delete(key)
    finally:
        await client.aclose()


# The kinds of Redis the scale-out tests run on: `one` server (the shared one) and
# `cluster` (a private 3-master Redis Cluster, `redis_cluster.shared_cluster`).
REDIS_KINDS = ("one", "cluster")


def redis_of(kind: str) -> str:
    """The URL of a kind of `REDIS_KINDS`."""
    if kind == "one":
        return redis_url()
    from redis_cluster import shared_cluster

    try:
        return shared_cluster().url
    except Exception as exc:
        missing("a private Redis Cluster (redis-server, redis-cli)", exc)
