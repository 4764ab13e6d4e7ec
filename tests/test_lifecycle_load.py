"""Load: 200 concurrent background streams, half cancelled at random, 1-3 readers each.

Every invariant of `invariants.check_response` holds for every response, and the server's
open file descriptors and asyncio tasks return to their baseline (no leaks).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import Any

import httpx
import pytest

from conftest import raw_events
from invariants import Cancel, Seen, check_response

RESPONSES = 200
LENGTH = 60
#: tokens/s of each response. The test's client parses every event of up to 600 streams in
#: Python on the server's 2 cores: at 50/s it fell seconds behind on a slower machine, its
#: cancels then reached responses that had long ended, and none was cancelled.
RATE = 10


async def read(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    seen: Seen,
    created: asyncio.Future[str] | None = None,
    **kwargs: Any,
) -> None:
    async with client.stream(method, url, **kwargs) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                seen.done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                seen.events.append(event)
                if created is not None and not created.done():
                    created.set_result(event["response"]["id"])


async def one(
    client: httpx.AsyncClient,
    base: str,
    rng: random.Random,
    results: list[tuple[str, list[Seen], list[Cancel]]],
) -> None:
    first = Seen(after=-1)
    created: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    body = {"model": "scripted", "input": "hi", "background": True, "stream": True}
    tasks = [
        asyncio.ensure_future(read(client, "POST", f"{base}/responses", first, created, json=body))
    ]
    rid = await asyncio.wait_for(created, 30)
    readers = [first]
    for _ in range(rng.randint(0, 2)):
        seen = Seen(after=rng.randint(0, 5))
        readers.append(seen)
        tasks.append(
            asyncio.ensure_future(
                read(
                    client,
                    "GET",
                    f"{base}/responses/{rid}",
                    seen,
                    params={"stream": "true", "starting_after": seen.after},
                )
            )
        )
    cancels: list[Cancel] = []
    if rng.random() < 0.5:
        await asyncio.sleep(rng.uniform(0, LENGTH / RATE * 1.1))  # a random moment
        r = await client.post(f"{base}/responses/{rid}/cancel")
        cancels.append(Cancel(r.status_code, r.json(), time.time()))
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    results.append((rid, readers, cancels))


def stats(base: str) -> dict[str, int]:
    data: dict[str, int] = httpx.get(f"{base.removesuffix('/v1')}/debug/process").json()
    return data


@pytest.mark.anyio
async def test_200_concurrent_streams_half_cancelled(make_server) -> None:  # type: ignore[no-untyped-def]
    seed = int(os.environ.get("TETHER_SEED", random.randrange(2**32)))
    print(f"seed={seed} (rerun with TETHER_SEED={seed})")
    rng = random.Random(seed)
    server = make_server("--scripted-length", str(LENGTH), "--scripted-rate", str(RATE))
    base = server.base_url
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        warm: list[Any] = []
        await one(client, base, random.Random(0), warm)  # first-use allocations
        baseline = stats(base)
        results: list[tuple[str, list[Seen], list[Cancel]]] = []
        await asyncio.gather(*(one(client, base, rng, results) for _ in range(RESPONSES)))
    assert len(results) == RESPONSES
    cancelled = 0
    for rid, readers, cancels in results:
        log = raw_events(server, rid)  # the log as stored, read independently
        check_response(base, rid, log, readers, cancels, server.trace(rid))
        cancelled += log[-1]["response"]["status"] == "cancelled"
    print(f"{cancelled} of {RESPONSES} cancelled")
    assert cancelled > 0
    # No leaks: descriptors and tasks go back to where they were (connections close async).
    deadline = time.monotonic() + 10
    while (now := stats(base)) != baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert now["runs"] == 0
    assert now["open_fds"] <= baseline["open_fds"], (baseline, now)
    assert now["tasks"] <= baseline["tasks"], (baseline, now)
