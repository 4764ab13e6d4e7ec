"""Gateways in front of a scripted chat upstream: tether, its bare relay, a naive relay.

Run: `python bench/upstream.py` (about 2 minutes). It starts, each on a free loopback
port: two `bench/scripted_upstream.py` servers (one as fast as it can, one paced at
`--rate` tokens/s) and, one after another, three gateways in front of them:

- naive relay: `bench/naive_relay.py`, Starlette + httpx on uvicorn's h11 and asyncio
  loop, one write per delta, nothing stored (issue 20's "naive bare relay");
- bare relay: `bench/bare_upstream_relay.py`, tether's own stack (uvloop, httptools,
  tether.wire frames) re-framing each network read, nothing stored: the ceiling;
- tether: `--engine none --upstream fast=... --upstream paced=...`, temp SQLite database,
  every event persisted.

Each gateway is pinned to core 0 (`taskset -c 0`), the upstreams and this load client to
core 1 (`--no-pin`: nothing pinned). Measured, per gateway:
1. the load: `--singles` 200-token responses one after another on one connection
   (`--tokens`, one delta per token), then `--rounds` rounds of `--streams` 50 streams
   that start together (one keep-alive connection each; a round ends with its last
   stream): deltas/s (all deltas / wall time), time to first delta (request written →
   first delta event read) p50/p99, and gateway CPU (its processes' user + system time
   over the phase) per 1,000 deltas. The load client (bench/_sse_load.py) is raw
   HTTP/1.1 and counts delta events in the bytes; the load core's busy share (client +
   fast upstream CPU / wall) is printed so a saturated load side shows;
2. time to first token: direct to the upstream, and through each gateway (the added time
   is the difference of medians), `--ttft` sequential requests of 5 tokens (httpx);
3. cancels through the paced upstream, `--cancels` streams, 10 at a time, each cancelled
   after a random 3..30 deltas: tether's `POST /responses/{id}/cancel` (the relays have
   no cancel: their client closes the stream instead). From the upstream's records: cancel
   call → upstream connection closed (p50/p99), and upstream tokens generated after the
   cancel reply (tether; goal 0) or after the client closed (relays).
Then issue 20's goals, tether against the two relays, met or not. Tables and a PNG go
to bench/out/upstream.{md,png} (bench/_report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
import _sse_load
from _report import Chart, progress, save
from _sse_load import Load

BENCH = Path(__file__).resolve().parent


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
    c: httpx.AsyncClient, url: str, upstream: str, relay: bool, rng: random.Random
) -> dict[str, float]:
    run = uuid.uuid4().hex
    k = rng.randint(3, 30)
    body = {
        "model": "paced",
        "input": f"RUN={run} LENGTH=2000",
        "stream": True,
        **({} if relay else {"background": True}),
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
        if relay:
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


async def cancels(
    name: str, url: str, upstream: str, relay: bool, n: int, seed: int
) -> list[dict[str, float]]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(10)
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        with progress(total=n, desc=f"{name}: cancels", unit="cancel") as bar:

            async def guarded() -> dict[str, float]:
                async with gate:
                    got = await one_cancel(c, url, upstream, relay, rng)
                bar.update(1)
                return got

            return await asyncio.gather(*[guarded() for _ in range(n)])


def gateways(ups: list[str], pin: list[str], only: list[str]) -> dict[str, _server.Server]:
    py = sys.executable
    relay_args = [f"--upstream={u}" for u in ups]
    tether = [py, "-m", "tether", "serve", "--engine", "none", "--db", "bench.db"]
    cmds = {
        "naive relay": [py, str(BENCH / "naive_relay.py"), "--port", "{port}", *relay_args],
        "bare relay": [py, str(BENCH / "bare_upstream_relay.py"), "--port", "{port}", *relay_args],
        "tether": [*tether, "--port", "{port}", *[a for u in ups for a in ("--upstream", u)]],
    }
    return {
        name: _server.Server([*pin, *cmd], name=name.split()[0])
        for name, cmd in cmds.items()
        if not only or name.split()[0] in only
    }


def load_table(rows: dict[str, dict[str, Any]], streams: int) -> str:
    return _server.table(
        [
            "gateway",
            "deltas/s 1 stream",
            f"deltas/s {streams} streams",
            "TTFD p50 / p99 ms, 1 stream",
            f"TTFD p50 / p99 ms, {streams} streams",
            "gateway CPU ms / 1,000 deltas, 1 stream",
            f"{streams} streams",
            f"gateway / load core busy, {streams} streams",
        ],
        [
            [
                name,
                r["one"].rate,
                r["many"].rate,
                f"{_server._fmt(r['one'].p50)} / {_server._fmt(r['one'].p99)}",
                f"{_server._fmt(r['many'].p50)} / {_server._fmt(r['many'].p99)}",
                r["one"].cpu,
                r["many"].cpu,
                f"{r['many'].core:.0%} / {r['many'].busy:.0%}",
            ]
            for name, r in rows.items()
        ],
    )


def other_table(rows: dict[str, dict[str, Any]]) -> str:
    return _server.table(
        [
            "gateway",
            "TTFT added ms",
            "cancel→upstream closed p50 ms",
            "p99 ms",
            "cancel reply p50 ms",
            "upstream tokens after reply",
        ],
        [
            [name, r["ttft"], r["c50"], r["c99"], r["reply"], int(r["after"])]
            for name, r in rows.items()
        ],
    )


def warnings(rows: dict[str, dict[str, Any]]) -> list[str]:
    """What makes a row not the gateway's own speed."""
    out = []
    for name, r in rows.items():
        many: Load = r["many"]
        if many.core < 0.9:
            out.append(
                f"warning: {name} used {many.core:.0%} of its core under load: other "
                "processes shared it (see the load average), or it waited on the load side."
            )
        if many.busy > 0.9:
            out.append(f"warning: the load core was {many.busy:.0%} busy under {name}.")
    return out


def goals(rows: dict[str, dict[str, Any]], streams: int) -> list[list[object]]:
    """Issue 20's goals for tether at `streams` streams, against the relays of this run:
    [goal, tether, limit, tether / relay, met]."""
    t: Load | None = rows.get("tether", {}).get("many")
    n: Load | None = rows.get("naive relay", {}).get("many")
    b: Load | None = rows.get("bare relay", {}).get("many")
    if t is None:
        return []
    # (goal, tether's figure, the relay's, the factor, whether tether must stay below)
    wanted = [
        *(
            [
                ("CPU / delta ≤ 0.5x naive's (ms / 1,000)", t.cpu, n.cpu, 0.5, True),
                (f"TTFD p99 at {streams} ≤ naive's (ms)", t.p99, n.p99, 1.0, True),
                (f"deltas/s at {streams} ≥ 1.5x naive's", t.rate, n.rate, 1.5, False),
            ]
            if n
            else []
        ),
        *([("CPU / delta ≤ 1.5x bare's (ms / 1,000)", t.cpu, b.cpu, 1.5, True)] if b else []),
    ]
    out: list[list[object]] = []
    for text, mine, theirs, factor, below in wanted:
        limit = factor * theirs
        met = mine <= limit if below else mine >= limit
        out.append([text, mine, limit, f"{mine / theirs:.2f}x", "met" if met else "not met"])
    return out


def charts(rows: dict[str, dict[str, Any]], streams: int) -> list[Chart]:
    naive = rows.get("naive relay")
    bare = rows.get("bare relay")
    rate_marks = {f"goal: 1.5x naive at {streams}": 1.5 * naive["many"].rate} if naive else {}
    ttfd_marks = {"goal: p99 ≤ naive's": naive["many"].p99} if naive else {}
    cpu_marks = {
        **({"goal: 0.5x naive": 0.5 * naive["many"].cpu} if naive else {}),
        **({"goal: 1.5x bare": 1.5 * bare["many"].cpu} if bare else {}),
    }
    loads = ["1 stream", f"{streams} streams"]
    return [
        Chart(
            "deltas/s",
            "deltas/s",
            loads,
            {k: [r["one"].rate, r["many"].rate] for k, r in rows.items()},
            marks=rate_marks,
        ),
        Chart(
            f"time to first delta, {streams} streams",
            "ms",
            ["p50", "p99"],
            {k: [r["many"].p50, r["many"].p99] for k, r in rows.items()},
            marks=ttfd_marks,
        ),
        Chart(
            "gateway CPU per 1,000 deltas",
            "CPU ms",
            loads,
            {k: [r["one"].cpu, r["many"].cpu] for k, r in rows.items()},
            marks=cpu_marks,
        ),
    ]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200, help="tokens (deltas) a response")
    parser.add_argument("--singles", type=int, default=100, help="responses at 1 stream")
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of --streams streams")
    parser.add_argument(
        "--repeats", type=int, default=2, help="load repeats per gateway (the best is shown)"
    )
    parser.add_argument("--ttft", type=int, default=30)
    parser.add_argument("--cancels", type=int, default=40)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument(
        "--upstream-batch",
        type=int,
        default=1,
        help="chunks the fast upstream writes at once (1: a write per token, as a server "
        "streaming its tokens does)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--only",
        action="append",
        choices=["naive", "bare", "tether"],
        default=[],
        help="measure only these gateways (repeatable)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin the gateway to core 0 and the upstreams and client to core 1",
    )
    return parser.parse_args()


def main() -> None:
    args = parse()
    pin = ["taskset", "-c", "0"] if args.pin else []
    if args.pin:
        os.sched_setaffinity(0, {1})
    machine, started = _server.machine(), time.monotonic()
    print(f"# bench/upstream.py — {machine}")
    print(setup(args) + "\n")
    py, side = sys.executable, ["taskset", "-c", "1"] if args.pin else []
    up = [py, str(BENCH / "scripted_upstream.py"), "--port", "{port}"]
    batch = ["--batch", str(args.upstream_batch)]
    fast = _server.Server([*side, *up, *batch], name="fast-upstream").start()
    paced = _server.Server([*side, *up, "--rate", str(args.rate)], name="paced-upstream").start()
    servers = gateways([f"fast={fast.base_url}", f"paced={paced.base_url}"], pin, args.only)
    try:
        loads: dict[str, list[tuple[Load, Load]]] = {name: [] for name in servers}
        rows: dict[str, dict[str, Any]] = {}
        direct = _server.run(ttft(fast.url, args.ttft, direct=True))
        # Repeats alternate the gateways, so a burst of other work on the machine
        # disturbs one repeat of each rather than every repeat of one.
        for repeat in range(args.repeats):
            for name, srv in servers.items():
                srv.start()
                label = name if args.repeats == 1 else f"{name} #{repeat + 1}"
                phases = _sse_load.load(
                    label,
                    srv.port,
                    (srv.pid, fast.pid),
                    args.tokens,
                    args.singles,
                    args.streams,
                    args.rounds,
                )
                loads[name].append(_server.run(phases))
                if not repeat:
                    rows[name] = _server.run(latencies(name, srv, direct, paced, args))
                srv.stop()
        for name, runs in loads.items():
            # Other work only ever slows a gateway down: its best repeat is its own speed.
            rows[name]["one"], rows[name]["many"] = max(runs, key=lambda r: r[1].rate)
            rows[name]["repeats"] = [r[1].rate for r in runs]
        report(rows, direct, machine, args)
        print(f"took {time.monotonic() - started:.0f} s")
    finally:
        for srv in [*servers.values(), fast, paced]:
            srv.stop()
            srv.cleanup()


def setup(args: argparse.Namespace) -> str:
    return (
        f"{args.tokens}-token responses: {args.singles} at 1 stream, {args.rounds} rounds of "
        f"{args.streams} streams, best of {args.repeats} repeats; ttft n={args.ttft}; "
        f"{args.cancels} cancels at {args.rate:g} tokens/s; seed {args.seed}; upstream "
        f"writes {args.upstream_batch} chunk(s) at once; "
        + ("gateway on core 0, upstreams and client on core 1" if args.pin else "not pinned")
    )


async def latencies(
    name: str,
    srv: _server.Server,
    direct: float,
    paced: _server.Server,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """TTFT added and the cancel figures of one gateway."""
    first = await ttft(srv.url, args.ttft)
    got = await cancels(name, srv.url, paced.url, name != "tether", args.cancels, args.seed)
    closed = [g["closed_ms"] for g in got]
    return {
        "ttft": first - direct,
        "c50": _server.percentile(closed, 50),
        "c99": _server.percentile(closed, 99),
        "after": sum(g["after"] for g in got),
        "reply": _server.percentile([g["reply_ms"] for g in got], 50),
    }


def report(
    rows: dict[str, dict[str, Any]], direct: float, machine: str, args: argparse.Namespace
) -> None:
    spread = "; ".join(
        f"{name} " + " / ".join(_server._fmt(x) for x in r["repeats"]) for name, r in rows.items()
    )
    parts = [
        f"# bench/upstream.py\n\n{machine}\n\n{setup(args)}",
        load_table(rows, args.streams),
        f"deltas/s at {args.streams} streams, each repeat: {spread}.",
        *warnings(rows),
        f"time to first token direct to the upstream: {direct:.2f} ms (median)",
        other_table(rows),
        "relays: no cancel endpoint; their client closes the stream, so their "
        "'reply' is that moment.",
    ]
    if met := goals(rows, args.streams):
        parts.append(
            "issue 20's goals, tether at "
            f"{args.streams} streams:\n\n"
            + _server.table(["goal", "tether", "limit", "tether / relay", "met"], met)
        )
    markdown = "\n\n".join(parts)
    print(markdown.split("\n\n", 3)[3])  # heading, machine and setup were printed first
    save("upstream", markdown, *charts(rows, args.streams))


if __name__ == "__main__":
    main()
