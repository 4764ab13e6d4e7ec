"""Profile tether's relay path: many concurrent streams from a fast scripted upstream.

Run: `python bench/profile_relay.py [--profile] [--streams 50] [--length 200] [--seconds 10]`.

Starts `bench/scripted_upstream.py` (as fast as it can, `--batch` chunks a write) and
tether with `--engine none --upstream fast=...` (temp SQLite database), optionally under
cProfile (`--profile`: the top functions by own and cumulative time are printed, and the raw
profile is kept in `bench/out/profile_relay.prof`); `--target bare` measures
`bench/bare_upstream_relay.py` instead. Load: `--streams` clients, each creating
streamed responses of `--length` tokens one after another for `--seconds` seconds.
Printed: deltas/s, time to first delta p50/p99 (request sent → first
`response.output_text.delta` byte), and the server's CPU per 1,000 deltas over the load.
`--cpu N` pins the server to core N (taskset), the clients stay where the OS puts them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import signal
import sys
import time
from pathlib import Path

import httpx

import _server
from _report import out_dir, progress

BENCH = Path(__file__).resolve().parent
MARK = b"event: response.output_text.delta\n"


async def one(c: httpx.AsyncClient, url: str, length: int) -> tuple[int, float]:
    """(deltas, time to first delta) of one streamed create."""
    body = {"model": "fast", "input": f"LENGTH={length}", "stream": True}
    started, first, deltas, carry = time.perf_counter(), 0.0, 0, b""
    async with c.stream("POST", f"{url}/v1/responses", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for chunk in resp.aiter_bytes():
            buf = carry + chunk
            n = buf.count(MARK)
            if n and not first:
                first = time.perf_counter() - started
            deltas += n
            carry = buf[-len(MARK) + 1 :]
    assert deltas == length, (deltas, length)
    return deltas, first


async def load(url: str, pid: int, args: argparse.Namespace) -> dict[str, float]:
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        await one(c, url, 5)  # warm up
        if args.profile:
            os.kill(pid, signal.SIGUSR1)  # bench/_profiled.py: profile the load only
        ttfd: list[float] = []
        deltas = 0
        bar = progress(total=args.seconds, desc="load", unit="s")
        cpu0, t0 = _server.cpu_seconds(pid), time.perf_counter()
        end = t0 + args.seconds

        async def client() -> None:
            nonlocal deltas
            while time.perf_counter() < end:
                n, first = await one(c, url, args.length)
                deltas += n
                ttfd.append(first)

        async def ticker() -> None:
            while time.perf_counter() < end:
                await asyncio.sleep(0.5)
                bar.n = min(args.seconds, round(time.perf_counter() - t0, 1))
                bar.refresh()

        await asyncio.gather(ticker(), *[client() for _ in range(args.streams)])
        wall, cpu = time.perf_counter() - t0, _server.cpu_seconds(pid) - cpu0
        if args.profile:
            os.kill(pid, signal.SIGUSR2)
            await asyncio.sleep(2)  # a signal has no reply: give it time to write
        bar.close()
    return {
        "deltas/s": deltas / wall,
        "ttfd p50 ms": _server.percentile(ttfd, 50) * 1e3,
        "ttfd p99 ms": _server.percentile(ttfd, 99) * 1e3,
        "cpu ms / 1k deltas": cpu / deltas * 1e6,
        "responses": float(len(ttfd)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--target", choices=["tether", "bare"], default="tether")
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1, help="chunks the upstream writes at once")
    args = parser.parse_args()
    print(f"# bench/profile_relay.py — {_server.machine()}")
    py = sys.executable
    fast = _server.Server(
        [py, str(BENCH / "scripted_upstream.py"), "--port", "{port}", "--batch", str(args.batch)],
        name="fast-upstream",
    ).start()
    prof = out_dir() / "profile_relay.prof"
    pin = ["taskset", "-c", str(args.cpu)] if args.cpu is not None else []
    if args.target == "bare":
        cmd = [py, str(BENCH / "bare_upstream_relay.py"), "--port", "{port}"]
        cmd += [f"--upstream=fast={fast.base_url}"]
    else:
        run = [str(BENCH / "_profiled.py"), str(prof)] if args.profile else ["-m", "tether"]
        cmd = [py, *run]
        cmd += ["serve", "--engine", "none", "--db", "bench.db"]
        cmd += ["--port", "{port}", "--upstream", f"fast={fast.base_url}"]
    srv = _server.Server([*pin, *cmd], name=args.target)
    try:
        srv.start()
        got = _server.run(load(srv.url, srv.pid, args))
    finally:
        srv.stop(timeout=30)
        srv.cleanup()
        fast.stop()
        fast.cleanup()
    print(f"{args.target}: {args.streams} streams x {args.length} tokens, {args.seconds:g} s")
    print(_server.table(list(got), [list(got.values())]))
    if args.profile and args.target == "tether":
        stats = pstats.Stats(str(prof))
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
