"""tether's chat engine in front of a scripted upstream, beside a bare relay.

Run: `python bench/upstream.py` (about 1-2 minutes). It starts, each on a free loopback
port: two `bench/scripted_upstream.py` servers (one as fast as it can, one paced at
`--rate` tokens/s), tether with `--engine none --upstream fast=... --upstream paced=...`
(temp SQLite database: every event is persisted), and `bench/bare_upstream_relay.py`
(the same upstream calls and SSE frames, nothing stored: the ceiling).

Measured, for the bare relay and for tether:
1. events/s relayed on one stream (`--length` tokens, full speed), and over `--streams`
   concurrent streams (`--length-many` tokens each; aggregate events / wall time);
2. time to first token: direct to the upstream, and through each relay (the added time
   is the difference of medians), `--ttft` sequential requests of 5 tokens;
3. cancels through the paced upstream, `--cancels` streams, 10 at a time, each cancelled
   after a random 3..30 deltas: tether's `POST /responses/{id}/cancel` (the bare relay has
   no cancel: its client closes the stream instead). From the upstream's records: cancel
   call → upstream connection closed (p50/p99), and upstream tokens generated after the
   cancel reply (tether; goal 0) or after the client closed (bare).
Clients use async httpx and count raw `data:` lines (SDK parsing would be the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

import _server

BENCH = Path(__file__).resolve().parent


async def stream_events(
    client: httpx.AsyncClient, url: str, model: str, text: str, **extra: Any
) -> tuple[int, float, float]:
    """(events, first byte, [DONE]) of one streamed create."""
    events, first = 0, 0.0
    body = {"model": model, "input": text, "stream": True, **extra}
    async with client.stream("POST", f"{url}/v1/responses", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for chunk in resp.aiter_bytes():
            if not first:
                first = time.perf_counter()
            events += chunk.count(b"data: ")
    return events - 1, first, time.perf_counter()  # `[DONE]` is not an event


async def throughput(url: str, args: argparse.Namespace) -> tuple[float, float]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as c:
        singles = []
        for _ in range(3):
            n, first, done = await stream_events(c, url, "fast", f"LENGTH={args.length}")
            singles.append(n / (done - first))
        started = time.perf_counter()
        results = await asyncio.gather(
            *[
                stream_events(c, url, "fast", f"LENGTH={args.length_many}")
                for _ in range(args.streams)
            ]
        )
        wall = time.perf_counter() - started
    return statistics.median(singles), sum(r[0] for r in results) / wall


async def first_token(client: httpx.AsyncClient, url: str, direct: bool) -> float:
    started = time.perf_counter()
    if direct:
        body: dict[str, Any] = {
            "model": "fast",
            "stream": True,
            "messages": [{"role": "user", "content": "LENGTH=5"}],
        }
        path, mark = "/v1/chat/completions", b'"content"'
    else:
        body, path = {"model": "fast", "input": "LENGTH=5", "stream": True}, "/v1/responses"
        mark = b"output_text.delta"
    took = 0.0
    async with client.stream("POST", url + path, json=body) as resp:
        async for chunk in resp.aiter_bytes():  # read to the end: the connection is reused
            if not took and mark in chunk:
                took = time.perf_counter() - started
    assert took, "no token"
    return took


async def ttft(url: str, n: int, direct: bool = False) -> float:
    async with httpx.AsyncClient(timeout=30) as c:
        await first_token(c, url, direct)  # warm the connection
        return statistics.median([await first_token(c, url, direct) for _ in range(n)]) * 1e3


async def one_cancel(
    c: httpx.AsyncClient, url: str, upstream: str, bare: bool, rng: random.Random
) -> dict[str, float]:
    run = uuid.uuid4().hex
    k = rng.randint(3, 30)
    body = {
        "model": "paced",
        "input": f"RUN={run} LENGTH=2000",
        "stream": True,
        **({} if bare else {"background": True}),
    }
    deltas, rid = 0, ""
    async with c.stream("POST", f"{url}/v1/responses", json=body) as resp:
        async for line in resp.aiter_lines():
            if not rid and line.startswith("data: ") and '"response.created"' in line:
                rid = orjson.loads(line[6:])["response"]["id"]
            deltas += '"response.output_text.delta"' in line
            if deltas == k:
                break
        called = time.time()
        if bare:
            await resp.aclose()
            replied = called
        else:
            reply = await c.post(f"{url}/v1/responses/{rid}/cancel")
            replied = time.time()
            assert reply.json()["status"] == "cancelled", reply.text
    record: dict[str, Any] | None = None
    for _ in range(100):  # the upstream notices the disconnect a moment later
        record = (await c.get(f"{upstream}/records/{run}")).json()
        if record and record["disconnected"]:
            break
        await asyncio.sleep(0.02)
    assert record and record["disconnected"], f"upstream still streaming run {run}"
    return {
        "closed_ms": (record["disconnected"] - called) * 1e3,
        "reply_ms": (replied - called) * 1e3,
        "after": float(sum(1 for t in record["tokens"] if t > replied)),
    }


async def cancels(url: str, upstream: str, bare: bool, n: int, seed: int) -> list[dict[str, float]]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(10)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as c:

        async def guarded() -> dict[str, float]:
            async with gate:
                return await one_cancel(c, url, upstream, bare, rng)

        return await asyncio.gather(*[guarded() for _ in range(n)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=20000)
    parser.add_argument("--length-many", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--ttft", type=int, default=30)
    parser.add_argument("--cancels", type=int, default=40)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"# bench/upstream.py — {_server.machine()}")
    print(
        f"length {args.length}, {args.streams} streams x {args.length_many}, "
        f"ttft n={args.ttft}, {args.cancels} cancels at {args.rate:g} tokens/s, "
        f"seed {args.seed}\n"
    )
    py = sys.executable
    fast = _server.Server(
        [py, str(BENCH / "scripted_upstream.py"), "--port", "{port}"], name="fast-upstream"
    ).start()
    paced = _server.Server(
        [py, str(BENCH / "scripted_upstream.py"), "--port", "{port}", "--rate", str(args.rate)],
        name="paced-upstream",
    ).start()
    ups = [f"fast={fast.base_url}", f"paced={paced.base_url}"]
    servers = {
        "bare relay": _server.Server(
            [
                py,
                str(BENCH / "bare_upstream_relay.py"),
                "--port",
                "{port}",
                *[f"--upstream={u}" for u in ups],
            ],
            name="bare",
        ),
        "tether": _server.Server(
            [
                py,
                "-m",
                "tether",
                "serve",
                "--engine",
                "none",
                "--db",
                "bench.db",
                "--port",
                "{port}",
                *[a for u in ups for a in ("--upstream", u)],
            ],
            name="tether",
        ),
    }
    try:
        rows: dict[str, dict[str, float]] = {}
        direct = _server.run(ttft(fast.url, args.ttft, direct=True))
        for name, srv in servers.items():
            srv.start()
            one, many = _server.run(throughput(srv.url, args))
            first = _server.run(ttft(srv.url, args.ttft))
            got = _server.run(
                cancels(srv.url, paced.url, name != "tether", args.cancels, args.seed)
            )
            closed = [g["closed_ms"] for g in got]
            rows[name] = {
                "one": one,
                "many": many,
                "ttft": first - direct,
                "c50": _server.percentile(closed, 50),
                "c99": _server.percentile(closed, 99),
                "after": sum(g["after"] for g in got),
                "reply": _server.percentile([g["reply_ms"] for g in got], 50),
            }
            srv.stop()
        print(f"time to first token direct to the upstream: {direct:.2f} ms (median)\n")
        print(
            _server.table(
                [
                    "relay",
                    "events/s 1 stream",
                    f"events/s {args.streams} streams",
                    "TTFT added ms",
                    "cancel→upstream closed p50 ms",
                    "p99 ms",
                    "cancel reply p50 ms",
                    "upstream tokens after reply",
                ],
                [
                    [
                        name,
                        r["one"],
                        r["many"],
                        r["ttft"],
                        r["c50"],
                        r["c99"],
                        r["reply"],
                        int(r["after"]),
                    ]
                    for name, r in rows.items()
                ],
            )
        )
        bare, tether = rows["bare relay"], rows["tether"]
        print(
            f"\ntether / bare: 1 stream {tether['one'] / bare['one']:.2f}x, "
            f"{args.streams} streams {tether['many'] / bare['many']:.2f}x (goal ≥ 0.6x)"
        )
        print(
            "bare relay: no cancel endpoint; its client closes the stream, so its "
            "'reply' is that moment."
        )
    finally:
        for srv in [*servers.values(), fast, paced]:
            srv.stop()
            srv.cleanup()


if __name__ == "__main__":
    main()
