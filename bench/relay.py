"""Relay throughput: events/s tether streams to 1 and to 50 readers of one response,
against a bare in-memory relay of the same events (bench/bare_relay.py).

Run: `python bench/relay.py` (about 30 s). It starts a scripted-engine tether at full
speed (`--scripted-rate 0 --scripted-length 10000`, temp database: every event is persisted)
and `bench/bare_relay.py` (same events, same SSE framing, nothing stored), each on a free
loopback port, and for each server and each reader count it runs `--repeats` rounds of:

- `--mode post+get` (default): one `POST /v1/responses` with `stream: true, background:
  true`, and, as soon as its first event names the id, `readers - 1` concurrent
  `GET /v1/responses/{id}?stream=true` resumes (full replays, then live);
- `--mode get`: one `POST` with `background: true` (JSON), then `readers` concurrent GETs.

Readers use httpx (async, `client.stream`), read raw bytes and count `data:` lines (the
`[DONE]` line excluded), not the openai SDK, so client-side parsing does not dominate. Per
reader: events / (first byte -> `[DONE]`). Aggregate: events received by all readers /
wall time (first byte of the first reader -> `[DONE]` of the last). Every reader must
receive exactly `length + 9` events ending with `[DONE]`, or the round is reported.

The table shows the median round (by aggregate events/s) of each case, with the CPU that
the server and the client used over that round (% of one core; the machine has 2 cores, so
a busy client slows the server it measures; a note flags cases where the client was near
100%). `--client-procs N` spreads the readers over N processes. `--profile [DIR]` records
the tether server with py-spy (if installed) during its largest-reader rounds and prints
its hot spots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.process
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import orjson

import _server
from _report import Chart, Transcript, progress, save

BENCH = Path(__file__).resolve().parent
MARK = b"\ndata: "
DONE = b"data: [DONE]\n\n"
HEADER_EVENTS = 9  # created, queued, in_progress, item/part added, text/part/item done, completed


@dataclass
class Reader:
    events: int = 0
    first_byte: float | None = None
    done_at: float | None = None
    done: bool = False
    error: str | None = None

    @property
    def rate(self) -> float:
        if self.first_byte is None or self.done_at is None or self.done_at <= self.first_byte:
            return float("nan")
        return self.events / (self.done_at - self.first_byte)


async def _consume(
    response: httpx.Response, out: Reader, first_frame: asyncio.Future[bytes] | None = None
) -> None:
    """Count `data:` lines in a raw SSE body; hand the first frame to `first_frame`."""
    if response.status_code != 200:
        out.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
        if first_frame is not None and not first_frame.done():
            first_frame.set_exception(RuntimeError(out.error))
        return
    count = 0
    carry = b""
    head = b""
    async for chunk in response.aiter_raw():
        if out.first_byte is None:
            out.first_byte = time.perf_counter()
        if first_frame is not None and not first_frame.done():
            head += chunk
            end = head.find(b"\n\n")
            if end >= 0:
                first_frame.set_result(head[:end])
        data = carry + chunk
        count += data.count(MARK)
        carry = data[-(len(MARK) - 1) :]
        tail = data[-len(DONE) :]
    out.done_at = time.perf_counter()
    out.done = tail == DONE
    out.events = count - 1 if out.done else count  # the [DONE] line is not an event


async def _read(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    out: Reader,
    body: dict[str, Any] | None = None,
    first_frame: asyncio.Future[bytes] | None = None,
) -> None:
    try:
        async with client.stream(method, url, json=body) as response:
            await _consume(response, out, first_frame)
    except Exception as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        if first_frame is not None and not first_frame.done():
            first_frame.set_exception(exc)


def _id_of(frame: bytes) -> str:
    data = frame[frame.index(b"data: ") + 6 :]
    return str(orjson.loads(data)["response"]["id"])


async def _gets(client: httpx.AsyncClient, url: str, rid: str, out: list[Reader]) -> None:
    await asyncio.gather(
        *(_read(client, "GET", f"{url}/v1/responses/{rid}?stream=true", r) for r in out)
    )


def _client(readers: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=readers + 5, max_keepalive_connections=readers + 5)
    return httpx.AsyncClient(limits=limits, timeout=120.0)


class Helpers:
    """Reader processes besides this one (`--client-procs`), each with its own event loop,
    fed over a pipe, so that the client side can use both cores."""

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_helper_main, args=(child,), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            conn.recv()  # ready

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    async def run(self, url: str, rid: str, counts: list[int]) -> list[Reader]:
        loop = asyncio.get_running_loop()
        for conn, n in zip(self.conns, counts, strict=True):
            conn.send((url, rid, n))
        results = await asyncio.gather(*(loop.run_in_executor(None, c.recv) for c in self.conns))
        return [Reader(*fields) for batch in results for fields in batch]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def _helper_main(conn: Connection) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        async with _client(200) as client:
            conn.send("ready")
            while (job := await loop.run_in_executor(None, conn.recv)) is not None:
                url, rid, n = job
                out = [Reader() for _ in range(n)]
                await _gets(client, url, rid, out)
                conn.send([(r.events, r.first_byte, r.done_at, r.done, r.error) for r in out])

    _server.run(serve())


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def one_round(
    url: str, readers: int, mode: str, helpers: Helpers | None = None
) -> tuple[list[Reader], float]:
    body = {"model": "scripted", "input": "bench relay", "background": True}
    gets = readers - 1 if mode == "post+get" else readers
    shares = _split(gets, 1 + (len(helpers.conns) if helpers else 0))
    mine = [Reader() for _ in range(readers - gets + shares[0])]
    async with _client(readers) as client:
        if mode == "post+get":
            first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            post = asyncio.create_task(
                _read(
                    client, "POST", f"{url}/v1/responses", mine[0], {**body, "stream": True}, first
                )
            )
            rid = _id_of(await first)
            tasks = [post, _gets(client, url, rid, mine[1:])]
        else:
            created = await client.post(f"{url}/v1/responses", json=body)
            rid = created.json()["id"]
            tasks = [_gets(client, url, rid, mine)]
        if helpers is not None:
            theirs = asyncio.create_task(helpers.run(url, rid, shares[1:]))
        await asyncio.gather(*tasks)
        out = mine + (await theirs if helpers is not None else [])
    return out, _wall(out)


def _wall(out: list[Reader]) -> float:
    firsts = [r.first_byte for r in out if r.first_byte is not None]
    ends = [r.done_at for r in out if r.done_at is not None]
    return max(ends) - min(firsts) if firsts and ends else float("nan")


@dataclass
class Case:
    server: str
    readers: int
    aggregate: float  # events/s, all readers
    per_reader: float  # median events/s of one reader
    slowest: float  # events/s of the slowest reader
    wall: float
    server_cpu: float  # fraction of one core over the round
    client_cpu: float
    problems: list[str]


def _client_cpu(helpers: Helpers | None) -> float:
    return _server.cpu_seconds() + sum(
        _server.cpu_seconds(p) for p in (helpers.pids if helpers else [])
    )


async def run_case(
    name: str,
    url: str,
    pid: int,
    readers: int,
    args: argparse.Namespace,
    expected: int,
    helpers: Helpers | None,
    bar: Any = None,
) -> Case:
    rounds = []
    for _ in range(args.repeats):
        cpu0, scpu0, t0 = _client_cpu(helpers), _server.cpu_seconds(pid), time.perf_counter()
        out, wall = await one_round(url, readers, args.mode, helpers)
        elapsed = time.perf_counter() - t0
        ccpu = (_client_cpu(helpers) - cpu0) / elapsed
        scpu = (_server.cpu_seconds(pid) - scpu0) / elapsed
        problems = [f"reader {i}: {r.error}" for i, r in enumerate(out) if r.error]
        problems += [
            f"reader {i}: {r.events} events, [DONE] {'seen' if r.done else 'missing'}"
            for i, r in enumerate(out)
            if not r.error and (r.events != expected or not r.done)
        ]
        total = sum(r.events for r in out)
        rates = [r.rate for r in out]
        rounds.append(
            Case(
                name,
                readers,
                total / wall,
                statistics.median(rates),
                min(rates),
                wall,
                scpu,
                ccpu,
                problems,
            )
        )
        if bar is not None:
            bar.update(1)
        await asyncio.sleep(0.2)  # let the server settle (group commits, evictions)
    rounds.sort(key=lambda c: c.aggregate)
    median = rounds[len(rounds) // 2]
    median.problems = [p for c in rounds for p in c.problems]
    return median


class Profiler:
    """py-spy record of one process, summarized as top self / inclusive frames."""

    def __init__(self, pid: int, path: Path) -> None:
        self.path = path
        exe = shutil.which("py-spy")
        self.proc = (
            None
            if exe is None
            else subprocess.Popen(
                [exe, "record", "-p", str(pid), "-f", "raw", "-r", "250", "-o", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        if self.proc is None:
            print("(py-spy not installed: `pip install py-spy` to profile)")
        else:
            time.sleep(0.5)  # py-spy attaches

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(2)  # SIGINT: py-spy writes its output
            self.proc.wait(30)

    def report(self, top: int = 15) -> None:
        if self.proc is None or not self.path.exists():
            return
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for line in self.path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = stack.split(";")
            if any("concurrent/futures/thread.py" in f for f in frames):
                continue  # idle executor threads
            total += int(n)
            own[frames[-1]] += int(n)
            for f in set(frames):
                inclusive[f] += int(n)
        if not total:
            return
        print(f"\n## py-spy: tether server during its rounds ({total} samples, {self.path})")
        print(
            _server.table(
                ["self %", "function (file:line)"],
                [[f"{100 * n / total:.1f}", f] for f, n in own.most_common(top)],
            )
        )
        print()
        mine = [
            (f, n)
            for f, n in inclusive.most_common()
            if ("tether/" in f or "sse_starlette" in f or "starlette" in f)
        ][:top]
        print(
            _server.table(
                ["incl %", "tether / starlette function (file:line)"],
                [[f"{100 * n / total:.1f}", f] for f, n in mine],
            )
        )


async def bench(
    servers: list[tuple[str, _server.Server]],
    args: argparse.Namespace,
    profile: Path | None,
    helpers: Helpers | None,
) -> list[Case]:
    expected = args.length + HEADER_EVENTS
    cases = []
    bar = progress(
        total=len(servers) * len(args.readers) * (args.repeats + 1), desc="rounds", unit="round"
    )
    for name, srv in servers:
        for readers in args.readers:
            await one_round(srv.url, readers, args.mode, helpers)  # warm-up, not measured
            bar.update(1)
            prof = (
                Profiler(srv.pid, profile / f"{name}-{readers}.txt")
                if profile is not None and name == "tether" and readers == max(args.readers)
                else None
            )
            try:
                cases.append(
                    await run_case(name, srv.url, srv.pid, readers, args, expected, helpers, bar)
                )
            finally:
                if prof is not None:
                    prof.stop()
                    prof.report()
    bar.close()
    return cases


def main() -> int:
    with Transcript() as printed:
        code, cases = measure()
    save("relay", printed.text, *charts(cases))
    return code


def charts(cases: list[Case]) -> list[Chart]:
    """Aggregate and per-reader events/s per reader count, one series per server."""
    readers = sorted({c.readers for c in cases})
    servers = list(dict.fromkeys(c.server for c in cases))
    by = {(c.server, c.readers): c for c in cases}

    def series(attr: str) -> dict[str, list[float]]:
        return {
            s: [getattr(by[s, n], attr) if (s, n) in by else float("nan") for n in readers]
            for s in servers
        }

    return [
        Chart(
            "aggregate events/s (all readers)",
            "events/s",
            readers,
            series("aggregate"),
            xlabel="readers of one response",
        ),
        Chart(
            "per-reader events/s (median reader)",
            "events/s",
            readers,
            series("per_reader"),
            xlabel="readers of one response",
        ),
    ]


def measure() -> tuple[int, list[Case]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--length", type=int, default=10000, help="scripted tokens per response (10000)")
    p.add_argument(
        "--readers", type=int, nargs="+", default=[1, 50], help="reader counts to measure (1 50)"
    )
    p.add_argument("--repeats", type=int, default=5, help="rounds per case; median shown")
    p.add_argument("--mode", choices=["post+get", "get"], default="post+get")
    p.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="processes the readers are spread over (1); the POST is in the first",
    )
    p.add_argument("--only", choices=["tether", "bare"], help="measure one server only")
    p.add_argument(
        "--profile",
        nargs="?",
        const="",
        metavar="DIR",
        help="py-spy the tether server during its largest-reader rounds",
    )
    args = p.parse_args()

    print("# relay throughput: tether vs bare in-memory relay")
    print(
        _server.table(
            ["parameter", "value"],
            [
                ["scripted length (tokens)", args.length],
                ["events per response", f"{args.length + HEADER_EVENTS} (length + 9)"],
                ["scripted rate", "0 (full speed)"],
                ["readers", " and ".join(map(str, args.readers))],
                [
                    "mode",
                    args.mode
                    + (
                        " (1 POST stream + N-1 GET resumes)"
                        if args.mode == "post+get"
                        else " (N GET readers)"
                    ),
                ],
                ["rounds per case", f"{args.repeats} (median shown)"],
                [
                    "client",
                    f"httpx {httpx.__version__}, raw bytes, count `data:` lines, "
                    f"{args.client_procs} process(es)",
                ],
                [
                    "tether",
                    "--engine scripted --scripted-rate 0, SQLite temp db (events persisted)",
                ],
                ["bare", "bench/bare_relay.py: Starlette + uvicorn, in-memory fan-out, no storage"],
                ["machine", _server.machine()],
            ],
        )
    )

    profile = None
    if args.profile is not None:
        profile = Path(args.profile or os.environ.get("TMPDIR", "/tmp")) / "tether-relay-prof"
        profile.mkdir(parents=True, exist_ok=True)

    servers: list[tuple[str, _server.Server]] = []
    helpers = Helpers(args.client_procs - 1) if args.client_procs > 1 else None
    try:
        if args.only != "bare":
            servers.append(
                (
                    "tether",
                    _server.Server(
                        _server.tether_cmd(rate=0, length=args.length), name="tether"
                    ).start(),
                )
            )
        if args.only != "tether":
            servers.append(
                (
                    "bare",
                    _server.Server(
                        [
                            sys.executable,
                            str(BENCH / "bare_relay.py"),
                            "--port",
                            "{port}",
                            "--length",
                            str(args.length),
                        ],
                        name="bare",
                    ).start(),
                )
            )
        cases = _server.run(bench(servers, args, profile, helpers))
    finally:
        if helpers is not None:
            helpers.close()
        for _, srv in servers:
            srv.stop()
            srv.cleanup()

    rows = []
    for c in cases:
        rows.append(
            [
                c.server,
                c.readers,
                c.aggregate,
                c.per_reader,
                c.slowest,
                c.wall * 1000,
                f"{c.server_cpu:.0%}",
                f"{c.client_cpu:.0%}",
                "ok" if not c.problems else f"{len(c.problems)} problems",
            ]
        )
    print()
    print(
        _server.table(
            [
                "server",
                "readers",
                "aggregate events/s",
                "per-reader events/s (median)",
                "slowest reader events/s",
                "wall ms",
                "server CPU",
                "client CPU",
                "check",
            ],
            rows,
        )
    )
    by = {(c.server, c.readers): c for c in cases}
    ratios = []
    for readers in args.readers:
        t, b = by.get(("tether", readers)), by.get(("bare", readers))
        if t and b:
            ratios.append(
                [
                    readers,
                    b.aggregate / t.aggregate,
                    b.per_reader / t.per_reader,
                    "yes" if b.aggregate / t.aggregate <= 2 else "NO",
                ]
            )
    if ratios:
        print()
        print(
            _server.table(
                [
                    "readers",
                    "bare / tether (aggregate)",
                    "bare / tether (per reader)",
                    "tether within 2x of bare",
                ],
                ratios,
            )
        )
    bound = [f"{c.server} x{c.readers}" for c in cases if c.client_cpu >= 0.95]
    if bound:
        print(
            f"\nnote: the client used >= 95% of a core in {', '.join(bound)}: there the "
            "client is (near) the bottleneck and events/s is a floor for that server."
        )
    failed = False
    for c in cases:
        for problem in c.problems[:5]:
            print(f"  {c.server} x{c.readers}: {problem}")
            failed = True
    return 1 if failed else 0, cases


if __name__ == "__main__":
    sys.exit(main())
