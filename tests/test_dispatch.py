"""The run queue and cancel signals between processes (`RedisDispatch`), on the real Redis.

Two dispatch objects stand for two processes; each has its own Redis connections."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from tether.dispatch import LocalDispatch, RedisDispatch
from tether.store.base import StoreUnavailable

from services import redis_url

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pair() -> AsyncIterator[tuple[RedisDispatch, RedisDispatch, list[str], list[str]]]:
    url = redis_url()
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    cancels: tuple[list[str], list[str]] = ([], [])
    a = RedisDispatch(url, prefix, "a")
    b = RedisDispatch(url, prefix, "b")
    await a.open(cancels[0].append)
    await b.open(cancels[1].append)
    yield a, b, *cancels
    import redis.asyncio as aioredis

    r = aioredis.from_url(url)
    await r.delete(f"{prefix}:runs", f"{prefix}:later")
    await r.aclose()
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


async def test_the_queue_comes_back_after_redis_loses_it(pair) -> None:  # type: ignore[no-untyped-def]
    # A Redis restart loses the stream and its group; taking makes them again.
    a, b, _, _ = pair
    await a.submit("resp_1", "t")
    assert await asyncio.wait_for(b.take(), 10) == ("resp_1", "t")
    import redis.asyncio as aioredis

    r = aioredis.from_url(redis_url())
    await r.delete(a._layout.runs(0))
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
    caplog: pytest.LogCaptureFixture,
) -> None:
    # open() and close() from different tasks, as the lifecycle may call them.
    d = RedisDispatch(redis_url(), f"test-{uuid.uuid4().hex[:8]}", "c")
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
