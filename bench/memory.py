"""Memory under a burst: RSS growth of a tether serving many streamed responses at once.

Run: `python bench/memory.py` (about a minute). It starts a scripted-engine tether at full
speed (`--scripted-rate 0 --scripted-length TOKENS`, temp SQLite database), warms it up
with `--warmup` responses, then streams `--responses` responses of `--tokens` tokens,
`--at-once` at a time (each a `POST /v1/responses` with `stream: true`, read to `[DONE]`),
then `--more` responses again. It reports the server's RSS (`/proc/PID/status` VmRSS) after
the warm-up, after the burst and after the second round, its peak (VmHWM), and
`tether_log_cache_bytes` from `/metrics`.

Issue 14's figure: 2,000 x 500 tokens, 20 at a time, grew RSS from 93 to 1,763 MB, every
finished log cached whole (with ~1 KiB of orjson buffer per event) for 30 s. The goal:
growth <= 256 MB. `--budget BYTES` passes `--log-cache-bytes` (default: the server's).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx

import _server
from _report import Chart, Transcript, progress, save

MIB = 1024 * 1024


def vm(pid: int, field: str) -> int:
    """`VmRSS` or `VmHWM` of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def gauge(page: str, name: str) -> float:
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


async def stream_one(http: httpx.AsyncClient, base_url: str) -> int:
    """One streamed response read to `[DONE]`; the bytes received."""
    body = {"model": "scripted", "input": "hello", "stream": True}
    received = 0
    tail = b""
    async with http.stream("POST", f"{base_url}/responses", json=body) as r:
        r.raise_for_status()
        async for chunk in r.aiter_raw():
            received += len(chunk)
            tail = (tail + chunk)[-32:]
    if not tail.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError("a stream ended without [DONE]")
    return received


async def burst(base_url: str, n: int, at_once: int, stage: str) -> float:
    """`n` streamed responses, `at_once` at a time; the seconds it took."""
    bar = progress(total=n, desc=stage, unit="resp")
    start = time.monotonic()
    todo = iter(range(n))
    # No keep-alive: a pooled connection the server closes as it is reused fails a POST.
    limits = httpx.Limits(max_connections=at_once, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def worker() -> None:
            for _ in todo:
                await stream_one(http, base_url)
                bar.update(1)

        await asyncio.gather(*(worker() for _ in range(at_once)))
    bar.close()
    return time.monotonic() - start


def main() -> None:
    with Transcript() as printed:
        rows, base = measure()
    stages = [r[0] for r in rows]
    save(
        "memory",
        printed.text,
        Chart(
            "server memory after each stage (MiB)",
            "MiB",
            stages,
            {
                "RSS": [r[3] for r in rows],
                "peak RSS": [r[4] for r in rows],
                "log cache": [r[5] for r in rows],
            },
            marks={"warm-up + 256 MiB (goal)": base / MIB + 256},
        ),
    )


def measure() -> tuple[list[list[object]], int]:
    """The table's rows (stage, responses, seconds, RSS, peak, cache, tasks) and the RSS
    after the warm-up, in bytes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--at-once", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--more", type=int, default=500)
    parser.add_argument("--budget", type=int, default=None, help="--log-cache-bytes")
    args = parser.parse_args()
    extra = [] if args.budget is None else ["--log-cache-bytes", str(args.budget)]
    print(_server.machine())
    with _server.tether_server(rate=0, length=args.tokens, extra=extra) as srv:
        rows: list[list[object]] = []

        def sample(stage: str, n: int, seconds: float) -> None:
            page = httpx.get(f"{srv.url}/metrics", timeout=10).text
            rss = vm(srv.pid, "VmRSS")
            rows.append(
                [
                    stage,
                    n,
                    seconds,
                    rss / MIB,
                    vm(srv.pid, "VmHWM") / MIB,
                    gauge(page, "tether_log_cache_bytes") / MIB,
                    gauge(page, "tether_tasks"),
                ]
            )

        sample("start", 0, 0.0)
        for stage, n in (("warm-up", args.warmup), ("burst", args.responses), ("more", args.more)):
            sample(stage, n, _server.run(burst(srv.base_url, n, args.at_once, stage)))
            if stage == "warm-up":
                base = vm(srv.pid, "VmRSS")
            elif stage == "burst":
                after_burst = vm(srv.pid, "VmRSS")
        print(
            _server.table(
                [
                    "stage",
                    "responses",
                    "seconds",
                    "RSS MiB",
                    "peak RSS MiB",
                    "log cache MiB",
                    "tasks",
                ],
                rows,
            )
        )
        peak = vm(srv.pid, "VmHWM")
        print(
            f"\n{args.responses} x {args.tokens} tokens, {args.at_once} at a time: RSS "
            f"+{(after_burst - base) / MIB:.0f} MiB over the warm-up "
            f"(peak +{(peak - base) / MIB:.0f} MiB); {args.more} more: "
            f"+{(vm(srv.pid, 'VmRSS') - after_burst) / MIB:.0f} MiB"
        )
    return rows, base


if __name__ == "__main__":
    main()
