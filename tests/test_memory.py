"""Memory stays bounded by `--log-cache-bytes` (issue 14, item 3).

A burst of streamed responses used to keep every log whole in memory, each event with its
JSON (in orjson's >= 1 KiB buffer) and its SSE frame, for 30 s after it ended: RSS grew by
~850 KiB per response held. Now the cache has a byte budget and finished logs beyond it are
read from the database. The full-size burst (2,000 x 500 tokens) is `bench/soak.py --burst`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tether.store import logcache
from tether.store.base import LogEntry, Record
from tether.store.logcache import ENTRY_BYTES, LogCache, Tail
from tether.store.sqlite import SQLiteStore

from conftest import Server, raw_events
from services import postgres_url, redis_url

MIB = 1024 * 1024
BUDGET = 2 * MIB
RESPONSES = 200  # after the warm-up; 200 x ~0.4 MiB unbounded >> BUDGET + MARGIN
TOKENS = 300
AT_ONCE = 20
# What a Python server's RSS drifts by, cache aside: allocator arenas, SQLite's page cache,
# the engine's traces, connections. The unbounded cache grew by ~80 MiB here.
MARGIN = 32 * MIB


def vm(pid: int, field: str) -> int:
    """`VmRSS` or `VmHWM` (peak) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def gauge(page: str, name: str) -> float:
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


async def stream_one(http: httpx.AsyncClient, base_url: str) -> str:
    """POST a streamed response and read it to `[DONE]`; its id."""
    body = {"model": "scripted", "input": "hello", "stream": True}
    rid = ""
    async with http.stream("POST", f"{base_url}/responses", json=body) as r:
        assert r.status_code == 200
        tail = b""
        async for chunk in r.aiter_bytes():
            if not rid and b'"id":"resp_' in chunk:
                start = chunk.index(b'"id":"resp_') + 6
                rid = chunk[start : chunk.index(b'"', start)].decode()
            tail = (tail + chunk)[-64:]
    assert tail.endswith(b"data: [DONE]\n\n"), tail
    return rid


async def burst(base_url: str, n: int) -> list[str]:
    ids: list[str] = []
    # No keep-alive: a pooled connection the server closes as it is reused fails the POST.
    limits = httpx.Limits(max_connections=AT_ONCE, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        queue = list(range(n))

        async def worker() -> None:
            while queue:
                queue.pop()
                ids.append(await stream_one(http, base_url))

        await asyncio.gather(*(worker() for _ in range(AT_ONCE)))
    return ids


@pytest.fixture(params=["sqlite", "postgres+redis"])
def burst_server(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Server]:
    """A scripted tether at full speed, on SQLite or on PostgreSQL + Redis (its per-process
    cache of live logs, `livelog.py`, has the same budget)."""
    # Set by environment, not flag, so the same test runs against a tether without the flag.
    monkeypatch.setenv("TETHER_LOG_CACHE_BYTES", str(BUDGET))
    args = ["--engine", "scripted", "--scripted-rate", "0", "--scripted-length", str(TOKENS)]
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            server = Server(tmp_path / "tether.db", args)
        else:
            db = stack.enter_context(postgres_url())
            server = Server(
                db,
                [
                    *args,
                    "--redis",
                    redis_url(),
                    "--redis-prefix",
                    f"tether-test-{uuid.uuid4().hex[:8]}",
                ],
                log_dir=tmp_path,
            )
        stack.callback(server.stop)
        server.start()
        yield server


def test_a_burst_stays_within_the_cache_budget(burst_server: Server) -> None:
    server = burst_server
    assert server.proc is not None
    pid = server.proc.pid
    asyncio.run(burst(server.base_url, 40))  # warm-up: imports, pools, arenas
    before = vm(pid, "VmRSS")
    started = time.monotonic()
    ids = asyncio.run(burst(server.base_url, RESPONSES))
    grown, peak = vm(pid, "VmRSS") - before, vm(pid, "VmHWM") - before
    print(
        f"{RESPONSES} x {TOKENS} tokens in {time.monotonic() - started:.1f}s: "
        f"RSS +{grown / MIB:.1f} MiB, peak +{peak / MIB:.1f} MiB"
    )
    assert grown <= BUDGET + MARGIN, f"RSS grew by {grown / MIB:.1f} MiB"
    assert peak <= BUDGET + MARGIN, f"peak RSS grew by {peak / MIB:.1f} MiB"
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert 0 < gauge(metrics, "tether_log_cache_bytes") <= BUDGET
    assert gauge(metrics, "tether_tasks") < 50  # nothing left running per response
    # The first responses are long out of the cache: their logs come from the database,
    # whole, from any cursor.
    rng = random.Random(14)
    for rid in ids[:5]:
        log = raw_events(server, rid)
        assert [e["sequence_number"] for e in log] == list(range(len(log)))
        assert log[-1]["type"] == "response.completed"
        deltas = [e["delta"] for e in log if e["type"] == "response.output_text.delta"]
        assert len(deltas) == TOKENS
        after = rng.randrange(len(log))
        assert raw_events(server, rid, starting_after=after) == log[after + 1 :], after


# --- the store itself ----------------------------------------------------------------------


def record(rid: str) -> Record:
    return Record(
        id=rid,
        tenant="t",
        status="queued",
        snapshot={"id": rid},
        run={},
        input_items=[],
        run_token=None,
        owner="me",
        lease_until=0.0,
        last_seq=-1,
        input_tokens=0,
        finished_at=None,
    )


def delta(i: int) -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "item_id": "msg_" + "0" * 32,
        "output_index": 0,
        "content_index": 0,
        "delta": f" w{i}",
        "logprobs": [],
    }


def test_a_cached_event_costs_its_frame_and_little_more() -> None:
    # Was ~1,400 bytes per delta: the orjson buffer (>= 1 KiB) plus a frame built from it.
    entries = []
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for i in range(1000, 11_000):
            event = {**delta(i), "sequence_number": i}
            entries.append(LogEntry(i, event["type"], orjson.dumps(event)))
        per_event = (tracemalloc.get_traced_memory()[0] - start) / len(entries)
    finally:
        tracemalloc.stop()
    frame = len(entries[0].frame)
    print(f"{per_event:.0f} bytes per cached event ({frame}-byte frame)")
    # ENTRY_BYTES is what the budget counts beside the frame: it must be about right.
    assert per_event <= frame + ENTRY_BYTES + 32, per_event
    assert orjson.loads(entries[0].data)["sequence_number"] == 1000
    assert entries[0].frame.startswith(b"event: response.output_text.delta\ndata: {")


@pytest.mark.anyio
async def test_finished_logs_leave_the_cache_first_and_read_from_the_database(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"), cache_bytes=64 * 1024)
    await store.open()
    try:
        await store.create(record("live"), [{"type": "response.created"}])
        assert await store.claim("live", "tok", "me", 0, {}, [])
        finished: list[list[bytes]] = []
        for n in range(20):  # each ~40 KiB: over the budget after two
            rid = f"done{n}"
            await store.create(record(rid), [{"type": "response.created"}])
            assert await store.claim(rid, "t", "me", 0, {}, [])
            assert await store.append(rid, "t", [delta(i) for i in range(150)], tokens=150)
            assert await store.finish(rid, "t", "completed", {}, [{"type": "response.completed"}])
            finished.append([e.frame for e in await store.read(rid, -1)])
            # the live log keeps growing, read by its follower, so it is the one kept
            assert await store.append("live", "tok", [delta(n)], tokens=1)
            await asyncio.sleep(0)  # the group commit
            assert [e.seq for e in await store.read("live", n)] == [n + 1]
        assert store.cache.size <= 64 * 1024
        assert store.cache.peek("live") is not None
        assert store.cache.peek("done0") is None and store.cache.evicted > 0
        for n, frames in enumerate(finished):
            assert [e.frame for e in await store.read(f"done{n}", -1)] == frames
            assert [e.frame for e in await store.read(f"done{n}", 99)] == frames[100:]
    finally:
        await store.close()


@pytest.mark.anyio
async def test_the_cache_drops_finished_logs_first_then_the_least_read_live_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logcache, "LINGER", 0.05)
    entries = [LogEntry(i, "response.output_text.delta", b'{"delta":"x"}') for i in range(10)]
    one = logcache.TAIL_BYTES + logcache.size_of(entries)
    cache = LogCache(budget=3 * one)
    for rid in ("a", "b", "c"):
        cache.put(rid, Tail(0, list(entries)))
    cache.finished("c")
    assert cache.get("a") is not None  # read: "b" is now the least recently read live log
    cache.put("d", Tail(0, list(entries)))  # over budget: the finished one goes first
    assert "c" not in cache and {"a", "b", "d"} <= {r for r in "abcd" if r in cache}
    cache.put("e", Tail(0, list(entries)))  # then the least recently read live one
    assert "b" not in cache and cache.size == 3 * one and cache.evicted == 2
    gone = cache.peek("a")
    assert gone is not None
    cache.pop("a")
    cache.grow(gone, entries)  # a writer still holding an evicted tail: nothing counted
    assert gone.entries == [] and cache.size == 2 * one
    cache.finished("d")
    await asyncio.sleep(0.2)  # LINGER: a finished log also goes with time
    assert "d" not in cache and "e" in cache and cache.size == one
