"""The run queue and cancel signals between processes (`RedisDispatch`), on the real Redis:
one server, and a Redis Cluster of 3 masters (the queue in shards).

Two dispatch objects stand for two processes; each has its own Redis connections."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from tether import redisconn
from tether.dispatch import LocalDispatch, RedisDispatch
from tether.store.base import StoreUnavailable

from services import REDIS_KINDS, delete_prefix, redis_of

pytestmark = pytest.mark.anyio


@pytest.fixture(params=REDIS_KINDS)
def url(request: pytest.FixtureRequest) -> str:
    return redis_of(request.param)


@pytest.fixture
async def pair(
    url: str,
) -> AsyncIterator[tuple[RedisDispatch, RedisDispatch, list[str], list[str]]]:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    cancels: tuple[list[str], list[str]] = ([], [])
    a = RedisDispatch(url, prefix, "a")
    b = RedisDispatch(url, prefix, "b")
    await a.open(cancels[0].append)
    await b.open(cancels[1].append)
    yield a, b, *cancels
    await delete_prefix(url, prefix)
    await a.close()
    await b.close()


async def test_each_submitted_run_is_taken_once(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, _, _ = pair
    ids = [f"resp_{i}" for i in range(20)]
    for rid in ids:
        await a.submit(rid, "t")

    async def drain(d: RedisDispatch, into: list[str]) -> None:
        while True:
            rid, tenant = await d.take()
            assert tenant == "t"
            into.append(rid)

    got_a: list[str] = []
    got_b: list[str] = []
    tasks = [asyncio.create_task(drain(a, got_a)), asyncio.create_task(drain(b, got_b))]

    async def all_taken() -> None:
        while len(got_a) + len(got_b) < len(ids):
            await asyncio.sleep(0.01)  # poll interval of a bounded wait

    await asyncio.wait_for(all_taken(), 10)
    for task in tasks:
        task.cancel()
    assert sorted(got_a + got_b) == sorted(ids)  # none lost, none twice


async def test_a_cancel_signal_reaches_the_other_process(pair) -> None:  # type: ignore[no-untyped-def]
    a, _, _, seen_b = pair

    async def signalled() -> None:
        while "resp_x" not in seen_b:
            await a.cancel("resp_x")  # pub/sub: the subscriber may still be connecting
            await asyncio.sleep(0.05)

    await asyncio.wait_for(signalled(), 10)
    assert "resp_x" in seen_b


async def test_the_queue_comes_back_after_redis_loses_it(pair, url: str) -> None:  # type: ignore[no-untyped-def]
    # A Redis restart loses the streams and their groups; taking makes them again.
    a, b, _, _ = pair
    await a.submit("resp_1", "t")
    assert await asyncio.wait_for(b.take(), 10) == ("resp_1", "t")
    r = redisconn.connect(redisconn.parse(url))
    for k in range(a._layout.shards):
        await r.delete(a._layout.runs(k))
    await r.aclose()
    taking = asyncio.create_task(b.take())
    await a.submit("resp_2", "t")
    assert await asyncio.wait_for(taking, 10) == ("resp_2", "t")


async def test_submit_without_redis_is_unavailable_not_a_hang() -> None:
    d = RedisDispatch("redis://127.0.0.1:1", "x", "c")  # nothing listens on port 1
    await d.open(lambda _: None)
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(d.submit("resp_1", "t"), 10)
    finally:
        await d.close()


async def test_local_dispatch_is_a_queue_and_a_call() -> None:
    d = LocalDispatch()
    seen: list[str] = []
    await d.open(seen.append)
    await d.submit("resp_1", "t")
    assert await d.take() == ("resp_1", "t")
    await d.cancel("resp_1")
    assert seen == ["resp_1"]


async def test_a_failing_listener_is_logged_when_it_fails_and_close_still_closes(
    caplog: pytest.LogCaptureFixture, url: str
) -> None:
    # open() and close() from different tasks, as the lifecycle may call them.
    d = RedisDispatch(url, f"test-{uuid.uuid4().hex[:8]}", "c")
    failed = asyncio.Event()

    def on_cancel(rid: str) -> None:
        failed.set()
        raise RuntimeError(f"bug handling {rid}")

    await asyncio.create_task(d.open(on_cancel))

    async def signalled() -> None:
        while not failed.is_set():
            await d.cancel("resp_x")  # pub/sub: the subscriber may still be connecting
            await asyncio.sleep(0.05)

    await asyncio.wait_for(signalled(), 10)
    listener = d._listener
    assert listener is not None
    await asyncio.wait_for(asyncio.wait([listener]), 10)  # it ended, logging why
    assert "the cancel channel listener failed" in caplog.text
    assert "bug handling resp_x" in caplog.text
    await asyncio.wait_for(asyncio.create_task(d.close()), 10)  # raises nothing of it
    assert d._listener is None


async def test_cluster_shards_spread_over_the_masters_and_a_response_keeps_one_slot() -> None:
    from redis.crc import key_slot

    from redis_cluster import shared_cluster

    cluster = shared_cluster()
    layout = redisconn.Layout("tether", redisconn.parse(cluster.url))
    assert layout.shards == redisconn.DEFAULT_SHARDS
    owners = [cluster.node_of(layout.runs(k)).port for k in range(layout.shards)]
    # 8 shards over 3 even slot ranges: 3, 3 and 2 (never all on one master).
    assert sorted(owners.count(p) for p in set(owners)) == [2, 3, 3]
    for k in range(layout.shards):  # a shard's keys and channels share its slot
        names = [layout.runs(k), layout.later(k), layout.cancel(k), layout.ring(k), layout.wake(k)]
        assert len({key_slot(n.encode()) for n in names}) == 1
    assert key_slot(layout.log("resp_abc").encode()) == key_slot(b"resp_abc")
    single = redisconn.Layout("tether", redisconn.parse("redis://127.0.0.1:6379/0"))
    # One server keeps the names tether always used.
    assert (single.shards, single.runs(0), single.log("resp_1")) == (
        1,
        "tether:runs",
        "tether:log:resp_1",
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+cluster://", "host:port"),
        ("redis+cluster://a:1,b", "host:port"),
        ("redis+cluster://a:1/3", "database 0"),
        ("redis+cluster://a:1?shards=0", "shards=N"),
        ("redis+cluster://a:1?bogus=1", "shards=N"),
    ],
)
def test_bad_cluster_urls_say_what_is_wrong(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        redisconn.parse(url)


def test_cluster_url_parts() -> None:
    t = redisconn.parse("rediss+cluster://u:p%40ss@h1:7000,[::1]:7001/?shards=4")
    assert t.cluster and t.nodes == (("h1", 7000), ("::1", 7001)) and t.shards == 4
    assert t.options == {"ssl": True, "username": "u", "password": "p@ss"}


async def test_a_burst_of_submits_is_queued_whole(pair) -> None:  # type: ignore[no-untyped-def]
    """1,000 submits at once (the create burst): none refused (redis-py's pool holds 100
    connections; the submits go in rounds, one pipeline each), each taken once."""
    a, b, _, _ = pair
    ids = [f"resp_burst_{i}" for i in range(1000)]
    await asyncio.gather(*(a.submit(rid, "t") for rid in ids))
    got: list[str] = []
    async with asyncio.timeout(30):
        while len(got) < len(ids):
            got.append((await b.take())[0])
    assert sorted(got) == sorted(ids)
