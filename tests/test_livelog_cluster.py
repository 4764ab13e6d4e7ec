"""The live log on a Redis Cluster (issue 21): two `LiveLog`s stand for two processes on a
3-master cluster. Wake-ups travel on sharded channels, each response's stream lives on one
master, and a reader in the other process follows without touching PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from redis_cluster import shared_cluster
from tether.store.base import LogEntry
from tether.store.livelog import LiveLog

from services import delete_prefix

pytestmark = pytest.mark.anyio


def entries(first: int, n: int) -> list[LogEntry]:
    return [
        LogEntry(s, "response.output_text.delta", b'{"sequence_number":%d}' % s)
        for s in range(first, first + n)
    ]


async def nothing_durable(response_id: str, after: int) -> list[LogEntry]:
    raise AssertionError(f"{response_id} after {after} was read from PostgreSQL")


@pytest.fixture
async def pair() -> AsyncIterator[tuple[LiveLog, LiveLog]]:
    url, prefix = shared_cluster().url, f"t{uuid.uuid4().hex[:10]}"
    a, b = LiveLog(url, prefix), LiveLog(url, prefix)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()
        await delete_prefix(url, prefix)


async def test_a_reader_in_another_process_follows_every_shard(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert a.healthy and b.healthy  # subscribed to every wake channel, on every master
    ids = [f"resp_{uuid.uuid4().hex}" for _ in range(24)]
    assert len({a.layout.shard(rid) for rid in ids}) > 3  # wake-ups on several shards
    for rid in ids:
        a.committed(rid, entries(0, 3))
    await a.drained()
    for rid in ids:  # B has nothing cached: one Redis read each
        assert [e.seq for e in await b.read(rid, -1, None, nothing_durable)] == [0, 1, 2]

    async def follow(rid: str) -> list[int]:
        # Caught up at seq 2, with a trusted cache: only a wake-up from A can end the
        # wait before its (long) timeout.
        await asyncio.wait_for(b.wait(rid, 2, timeout=30), 10)
        return [e.seq for e in await b.read(rid, 2, None, nothing_durable)]

    followers = [asyncio.create_task(follow(rid)) for rid in ids]
    # Commit only once every follower waits: the wake-ups must end waits, not precede them.
    deadline = asyncio.get_running_loop().time() + 10
    while not all(b.waiting(rid) for rid in ids):
        assert asyncio.get_running_loop().time() < deadline, "the followers never waited"
        await asyncio.sleep(0)
    for rid in ids:
        a.committed(rid, entries(3, 2))
    assert await asyncio.gather(*followers) == [[3, 4]] * len(ids)
    assert b.stats["durable_reads"] == 0


async def test_a_gap_in_a_stream_is_read_from_postgres(pair) -> None:  # type: ignore[no-untyped-def]
    # What a failover can do: the new master lacks a batch the old one acknowledged.
    a, b = pair
    rid = f"resp_{uuid.uuid4().hex}"
    a.committed(rid, entries(0, 3))
    await a.drained()
    await a.redis.xtrim(a.key(rid), maxlen=0)  # the stream lost its batches
    a.committed(rid, entries(3, 2))
    await a.drained()
    durable: list[int] = []

    async def postgres(response_id: str, after: int) -> list[LogEntry]:
        durable.append(after)
        return entries(after + 1, 4 - after)

    assert [e.seq for e in await b.read(rid, -1, None, postgres)] == [0, 1, 2, 3, 4]
    assert durable == [-1]
