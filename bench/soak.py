"""Soak: a long steady mix of creates, cancels, disconnects, resumes and deletes, sampling
the server's RSS, open fds, asyncio tasks and database size, and checking every response.

Run: `python bench/soak.py` (30 minutes, embedded store: SQLite, scripted engine), or
`--scaled` (one `tether serve` on a fresh PostgreSQL database + Redis prefix, both removed
afterwards). `--minutes` sets the length; `--rate` the operations per second. Every
`--every` seconds (10) it samples `/proc/PID/status` VmRSS, `/proc/PID/fd`, the
`tether_tasks` and `tether_log_cache_bytes` gauges of `/metrics`, and the database size
(the SQLite file with its WAL, or `pg_database_size`). At the end it prints the samples as
a table, writes them to `bench/out/soak.csv` and, with the table, to `soak.md` and
`soak.png` (`soak-scaled.*` with `--scaled`; `--out DIR` or `TETHER_BENCH_OUT` moves them),
and says whether RSS, fds and tasks stayed flat after the warm-up (the first `--warmup`
fraction of the run). A progress bar on stderr shows the minutes gone.

Operations, drawn at random at a steady rate (weights in `OPS`):
- `stream`: create with `stream: true`, read to `[DONE]`;
- `disconnect`: create streamed (half of them `background: true`), read a few events,
  hang up (docs/contract.md §4.7: a non-background one is then cancelled);
- `background`: create with `background: true` (JSON reply);
- `cancel`: cancel a response that is still running;
- `resume`: `GET ?stream=true&starting_after=N` of a running or a recently finished one;
- `delete`: delete a finished, checked response (then it must be 404).

Each response is checked once it has ended (`tests/invariants.py`, as the proofs do): a
contiguous log with one terminal event, last; every reader that stayed got exactly the log
after its cursor; usage, text and deltas agree; a 200 cancel means `cancelled`; no token
after a cancel reply. Resumes of checked responses must equal the log's tail. Any failure
is a violation, printed at the end (goal: 0). The server runs with `--retention`
(default 120 s) so that the database stays flat too: purged logs leave pages to reuse.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

import _report
import _server
from _report import Chart, Transcript, progress, save

sys.path.insert(0, str(_server.REPO / "tests"))
from invariants import Cancel, Seen, check_response  # tests/invariants.py

MIB = 1024 * 1024
OPS = {"stream": 30, "disconnect": 15, "background": 15, "cancel": 10, "resume": 20, "delete": 10}
MAX_IN_FLIGHT = 300  # operations at once; more are skipped (counted), not queued
CHECKS_AT_ONCE = 8
STUCK_AFTER = 120.0  # seconds a response may stay live before it is a violation


@dataclass
class Tracked:
    """A response this run created, until it is checked."""

    rid: str
    readers: list[Seen] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    busy: int = 0  # operations on it still running (it is checked after they end)
    checking: bool = False
    created: float = field(default_factory=time.monotonic)


@dataclass
class Sample:
    t: float
    rss: float  # MiB
    cpu: float  # % of one core the server used since the previous sample
    fds: int
    tasks: float
    cache: float  # MiB
    db: float  # MiB: the database (SQLite: its main file)
    wal: float  # MiB: SQLite's write-ahead log (0 for PostgreSQL)
    ops: int
    checked: int
    violations: int


def parse_sse(raw: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The events of an SSE body (complete frames only) and whether `[DONE]` came."""
    events, done = [], False
    for frame in raw.split(b"\n\n"):
        for line in frame.split(b"\n"):
            if line.startswith(b"data: "):
                if line == b"data: [DONE]":
                    done = True
                else:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        events.append(orjson.loads(line[6:]))
    return events, done


class Soak:
    def __init__(self, srv: _server.Server, args: argparse.Namespace, db_size: Any) -> None:
        self.srv = srv
        self.args = args
        self.db_size = db_size
        self.rng = random.Random(args.seed)
        self.live: dict[str, Tracked] = {}
        self.due: collections.deque[tuple[float, str]] = collections.deque()
        self.recent: collections.deque[tuple[str, list[dict[str, Any]], float]] = collections.deque(
            maxlen=300
        )
        self.ops: collections.Counter[str] = collections.Counter()
        self.violations: list[str] = []
        self.samples: list[Sample] = []
        self.checked = 0
        self.cpu_seconds = 0.0
        self.reading: collections.Counter[str] = collections.Counter()  # resumes running
        self.tasks: set[asyncio.Task[None]] = set()
        limits = httpx.Limits(max_connections=MAX_IN_FLIGHT + 20, max_keepalive_connections=0)
        self.http = httpx.AsyncClient(base_url=srv.base_url, timeout=60, limits=limits)

    def violation(self, text: str) -> None:
        self.violations.append(text)
        print(f"  VIOLATION: {text}", flush=True)

    # --- operations ------------------------------------------------------------------

    async def op_stream(self, background: bool = False, cut: int | None = None) -> None:
        body = {"model": "scripted", "input": "soak", "stream": True, "background": background}
        seen = Seen(after=-1)
        tracked: Tracked | None = None
        raw = b""
        try:
            async with self.http.stream("POST", "/responses", json=body) as r:
                if r.status_code != 200:
                    self.violation(f"create: HTTP {r.status_code}")
                    return
                async for chunk in r.aiter_raw():
                    raw += chunk
                    if tracked is None and b'"id":"resp_' in raw:
                        start = raw.index(b'"id":"resp_') + 6
                        rid = raw[start : raw.index(b'"', start)].decode()
                        tracked = self.live[rid] = Tracked(rid, [seen])
                        tracked.busy += 1
                    if cut is not None and raw.count(b"\n\n") >= cut:
                        seen.connected = False
                        break
        finally:
            seen.events, seen.done = parse_sse(raw)
            if tracked is not None:
                tracked.busy -= 1
                self.due.append((time.monotonic() + 0.5, tracked.rid))

    async def op_background(self) -> None:
        body = {"model": "scripted", "input": "soak", "background": True}
        r = await self.http.post("/responses", json=body)
        if r.status_code != 200:
            self.violation(f"background create: HTTP {r.status_code}")
            return
        rid = r.json()["id"]
        self.live[rid] = Tracked(rid)
        self.due.append((time.monotonic() + 1.0, rid))

    async def op_cancel(self) -> None:
        if not self.live:
            return
        tracked = self.live[self.rng.choice(list(self.live))]
        tracked.busy += 1
        try:
            r = await self.http.post(f"/responses/{tracked.rid}/cancel")
            tracked.cancels.append(Cancel(r.status_code, r.json(), time.time()))
        finally:
            tracked.busy -= 1

    async def op_resume(self) -> None:
        finished = [x for x in self.recent if x[2] > time.time() - self.args.retention + 30]
        if self.live and (not finished or self.rng.random() < 0.5):
            tracked = self.live[self.rng.choice(list(self.live))]
            after = self.rng.choice([-1, 0, 1])  # created and queued are always there
            seen = Seen(after=after)
            tracked.readers.append(seen)
            tracked.busy += 1
            try:
                seen.events, seen.done = await self.read(tracked.rid, after)
            finally:
                tracked.busy -= 1
            return
        if not finished:
            return
        rid, log, _ = self.rng.choice(finished)
        after = self.rng.randrange(-1, len(log))
        self.reading[rid] += 1  # not deleted under the reader (it would end it early)
        try:
            events, done = await self.read(rid, after)
        finally:
            self.reading[rid] -= 1
            if not self.reading[rid]:
                del self.reading[rid]
        if events is None:
            return  # deleted meanwhile
        if not done or events != log[after + 1 :]:
            self.violation(f"{rid}: resume after {after} differs from its log")

    async def read(self, rid: str, after: int) -> tuple[Any, bool]:
        params = {"stream": "true"} | ({} if after < 0 else {"starting_after": str(after)})
        raw = b""
        async with self.http.stream("GET", f"/responses/{rid}", params=params) as r:
            if r.status_code == 404:
                return None, False
            if r.status_code != 200:
                self.violation(f"{rid}: resume HTTP {r.status_code}")
                return None, False
            async for chunk in r.aiter_raw():
                raw += chunk
        return parse_sse(raw)

    async def op_delete(self) -> None:
        if not self.recent:
            return
        index = self.rng.randrange(len(self.recent))
        rid = self.recent[index][0]
        if rid in self.reading:
            return
        del self.recent[index]
        r = await self.http.delete(f"/responses/{rid}")
        if r.status_code != 200:
            self.violation(f"{rid}: delete HTTP {r.status_code}")
        elif (await self.http.get(f"/responses/{rid}")).status_code != 404:
            self.violation(f"{rid}: still there after delete")

    def start_op(self) -> None:
        kind = self.rng.choices(list(OPS), weights=list(OPS.values()))[0]
        if len(self.tasks) >= MAX_IN_FLIGHT:
            self.ops["skipped"] += 1
            return
        self.ops[kind] += 1
        coro = {
            "stream": lambda: self.op_stream(),
            "disconnect": lambda: self.op_stream(
                self.rng.random() < 0.5, cut=self.rng.randrange(1, 40)
            ),
            "background": self.op_background,
            "cancel": self.op_cancel,
            "resume": self.op_resume,
            "delete": self.op_delete,
        }[kind]()
        task = asyncio.create_task(self.guarded(kind, coro))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def guarded(self, kind: str, coro: Any) -> None:
        try:
            await coro
        except httpx.HTTPError as exc:
            self.violation(f"{kind}: {type(exc).__name__}: {exc}")

    # --- checking --------------------------------------------------------------------

    async def checker(self) -> None:
        """Checks due responses, `CHECKS_AT_ONCE` at a time (a serial checker falls
        behind the creates of a busy run)."""
        slots = asyncio.Semaphore(CHECKS_AT_ONCE)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                if not self.due or self.due[0][0] > time.monotonic():
                    await asyncio.sleep(0.2)
                    continue
                _, rid = self.due.popleft()
                tracked = self.live.get(rid)
                if tracked is None or tracked.checking:
                    continue
                await slots.acquire()
                tracked.checking = True
                task = asyncio.create_task(self.check_one(tracked))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def check_one(self, tracked: Tracked) -> None:
        try:
            await self.check(tracked)
        except httpx.HTTPError as exc:
            self.violation(f"{tracked.rid}: check: {type(exc).__name__}: {exc}")
            self.live.pop(tracked.rid, None)
        finally:
            tracked.checking = False

    async def check(self, tracked: Tracked) -> None:
        rid = tracked.rid
        r = await self.http.get(f"/responses/{rid}")
        if r.status_code != 200:
            self.violation(f"{rid}: GET HTTP {r.status_code}")
            del self.live[rid]
            return
        if r.json()["status"] in ("queued", "in_progress") or tracked.busy:
            if time.monotonic() - tracked.created > STUCK_AFTER:
                self.violation(f"{rid}: still {r.json()['status']} after {STUCK_AFTER:.0f}s")
                del self.live[rid]
                return
            self.due.append((time.monotonic() + 0.5, rid))
            return
        del self.live[rid]
        log, done = await self.read(rid, -1)
        if log is None or not done:
            self.violation(f"{rid}: full log unreadable")
            return
        trace_reply = await self.http.get(f"{self.srv.url}/debug/engine/{rid}")
        trace = trace_reply.json() if trace_reply.status_code == 200 else None
        try:
            await asyncio.to_thread(
                check_response, self.srv.base_url, rid, log, tracked.readers, tracked.cancels, trace
            )
        except AssertionError as exc:
            self.violation(f"{rid}: invariant: {str(exc)[:300]}")
            return
        self.checked += 1
        self.recent.append((rid, log, time.time()))

    # --- sampling --------------------------------------------------------------------

    async def sample(self, start: float) -> None:
        page = (await self.http.get(f"{self.srv.url}/metrics")).text
        db, wal = await self.db_size()
        now, cpu = time.monotonic(), _server.cpu_seconds(self.srv.pid)
        before = self.samples[-1] if self.samples else None
        busy = (
            0.0
            if before is None
            else (100 * (cpu - self.cpu_seconds) / max(1e-9, now - start - before.t))
        )
        self.cpu_seconds = cpu
        self.samples.append(
            Sample(
                t=now - start,
                rss=vm_rss(self.srv.pid) / MIB,
                cpu=busy,
                fds=len(os.listdir(f"/proc/{self.srv.pid}/fd")),
                tasks=gauge(page, "tether_tasks"),
                cache=gauge(page, "tether_log_cache_bytes") / MIB,
                db=db / MIB,
                wal=wal / MIB,
                ops=sum(self.ops.values()),
                checked=self.checked,
                violations=len(self.violations),
            )
        )
        s = self.samples[-1]
        print(
            f"  {s.t:7.0f}s  CPU {s.cpu:3.0f}%  RSS {s.rss:7.1f} MiB  fds {s.fds:4d}  "
            f"tasks {s.tasks:5.0f}  "
            f"cache {s.cache:5.1f} MiB  db {s.db:7.1f} + wal {s.wal:6.1f} MiB  "
            f"ops {s.ops:6d}  "
            f"checked {s.checked:6d}  violations {s.violations}",
            flush=True,
        )

    async def sampler(self, start: float) -> None:
        while True:
            await self.sample(start)
            await asyncio.sleep(self.args.every)

    # --- the run ---------------------------------------------------------------------

    async def run(self) -> None:
        start = time.monotonic()
        end = start + self.args.minutes * 60
        sampler = asyncio.create_task(self.sampler(start))
        checker = asyncio.create_task(self.checker())
        interval = 1.0 / self.args.rate
        tick = start
        bar = progress(total=round(self.args.minutes * 60), desc="soak", unit="s")
        while time.monotonic() < end:
            self.start_op()
            tick += interval
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
            if (gone := int(time.monotonic() - start)) > bar.n:
                bar.update(min(gone, bar.total) - bar.n)
                bar.set_postfix_str(f"checked {self.checked}, violations {len(self.violations)}")
        bar.close()
        if self.tasks:  # let running operations end (a stream ends with its response)
            await asyncio.wait(set(self.tasks), timeout=STUCK_AFTER)
        deadline = time.monotonic() + STUCK_AFTER
        while (self.live or self.due) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        for task in (sampler, checker, *self.tasks):
            task.cancel()
        await asyncio.gather(sampler, checker, *self.tasks, return_exceptions=True)
        for rid in self.live:
            self.violation(f"{rid}: never checked (still live at the end)")
        await self.sample(start)
        await self.http.aclose()


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def gauge(page: str, name: str) -> float:
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


# --- report ----------------------------------------------------------------------------------


def report(soak: Soak, args: argparse.Namespace, name: str) -> None:
    with Transcript() as printed:
        tables(soak, args, name)
    save(name, f"{args.header}\n{printed.text}", *charts(soak.samples))
    print(f"samples: {_report.out_dir() / name}.csv")


def tables(soak: Soak, args: argparse.Namespace, name: str) -> None:
    samples = soak.samples
    step = max(1, len(samples) // 30)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    print()
    print(
        _server.table(
            [
                "t (s)",
                "server CPU %",
                "RSS MiB",
                "open fds",
                "tasks",
                "log cache MiB",
                "DB MiB",
                "WAL MiB",
                "ops",
                "checked",
                "violations",
            ],
            [
                [
                    s.t,
                    s.cpu,
                    s.rss,
                    s.fds,
                    s.tasks,
                    s.cache,
                    s.db,
                    s.wal,
                    s.ops,
                    s.checked,
                    s.violations,
                ]
                for s in shown
            ],
        )
    )
    with (_report.out_dir() / f"{name}.csv").open("w") as f:
        f.write("t,cpu_pct,rss_mib,fds,tasks,cache_mib,db_mib,wal_mib,ops,checked,violations\n")
        for s in samples:
            f.write(
                f"{s.t:.1f},{s.cpu:.0f},{s.rss:.2f},{s.fds},{s.tasks},{s.cache:.2f},{s.db:.2f},"
                f"{s.wal:.2f},"
                f"{s.ops},{s.checked},{s.violations}\n"
            )
    warm = [s for s in samples if s.t >= args.warmup * args.minutes * 60] or samples
    first, last = warm[0], samples[-1]
    print(f"\nops: {dict(soak.ops)}; checked {soak.checked} responses")
    for name, unit, a, b, top in (
        ("RSS", " MiB", first.rss, last.rss, max(s.rss for s in warm)),
        ("open fds", "", first.fds, last.fds, max(s.fds for s in warm)),
        ("tasks", "", first.tasks, last.tasks, max(s.tasks for s in warm)),
        ("DB size", " MiB", first.db, last.db, max(s.db for s in warm)),
        ("WAL size", " MiB", first.wal, last.wal, max(s.wal for s in warm)),
    ):
        print(
            f"{name}: {a:.1f}{unit} after warm-up (t={first.t:.0f}s), {b:.1f}{unit} at the "
            f"end, max {top:.1f}{unit} after warm-up"
        )
    print(f"violations: {len(soak.violations)}")
    for v in soak.violations[:20]:
        print(f"  {v}")


def charts(samples: list[Sample]) -> list[Chart]:
    """The samples over time: memory, fds, tasks, database size."""
    t = [round(s.t / 60, 2) for s in samples]
    db = {"database": [s.db for s in samples]}
    if any(s.wal for s in samples):
        db["WAL"] = [s.wal for s in samples]
    return [
        Chart(
            "server memory",
            "MiB",
            t,
            {"RSS": [s.rss for s in samples], "log cache (counted)": [s.cache for s in samples]},
            kind="line",
            xlabel="minutes",
        ),
        Chart(
            "open fds", "fds", t, {"fds": [s.fds for s in samples]}, kind="line", xlabel="minutes"
        ),
        Chart(
            "asyncio tasks",
            "tasks",
            t,
            {"tasks": [s.tasks for s in samples]},
            kind="line",
            xlabel="minutes",
        ),
        Chart("database size", "MiB", t, db, kind="line", xlabel="minutes"),
    ]


# --- servers -------------------------------------------------------------------------------


def server_args(args: argparse.Namespace) -> list[str]:
    return [
        "--engine",
        "scripted",
        "--debug-routes",
        "--host",
        _server.HOST,
        "--port",
        "{port}",
        "--scripted-rate",
        str(args.tokens_per_s),
        "--scripted-length",
        str(args.length),
        "--retention",
        str(args.retention),
        *args.extra,
    ]


@contextlib.contextmanager
def sqlite_server(args: argparse.Namespace) -> Any:
    srv = _server.Server(
        [sys.executable, "-m", "tether", "serve", "--db", "soak.db", *server_args(args)],
        name="tether",
    )
    try:
        srv.start()

        async def size() -> tuple[int, int]:
            def of(name: str) -> int:
                with contextlib.suppress(OSError):
                    return (srv.workdir / name).stat().st_size
                return 0

            return of("soak.db"), of("soak.db-wal")

        yield srv, size
    finally:
        srv.stop()
        print(f"server log: {srv.log}")


@contextlib.contextmanager
def scaled_server(args: argparse.Namespace) -> Any:
    import asyncpg

    from scale import Backing

    backing = Backing(args.pg, args.redis)
    backing.create()
    srv = _server.Server(
        [
            sys.executable,
            "-m",
            "tether",
            "serve",
            "--db",
            backing.url,
            "--redis",
            backing.redis,
            "--redis-prefix",
            backing.prefix,
            *server_args(args),
        ],
        name="tether",
    )
    try:
        srv.start()

        async def size() -> tuple[int, int]:
            con = await asyncpg.connect(backing.url, timeout=10)
            try:
                return int(await con.fetchval("SELECT pg_database_size(current_database())")), 0
            finally:
                await con.close()

        yield srv, size
    finally:
        srv.stop()
        print(f"server log: {srv.log}")
        backing.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument(
        "--scaled", action="store_true", help="PostgreSQL + Redis instead of SQLite"
    )
    parser.add_argument("--rate", type=float, default=10.0, help="operations per second")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--warmup", type=float, default=0.2, help="fraction of the run before 'flat' is judged"
    )
    parser.add_argument("--length", type=int, default=300, help="scripted tokens")
    parser.add_argument("--tokens-per-s", type=float, default=200.0, help="scripted rate")
    parser.add_argument("--retention", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--out", default=None, help="directory of soak.md, .png and .csv (bench/out)"
    )
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--extra", nargs="*", default=[], help="more `tether serve` flags")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = secrets.randbelow(2**32)
    mode = "postgres+redis" if args.scaled else "sqlite"
    if args.out:
        os.environ["TETHER_BENCH_OUT"] = args.out
    args.header = (
        f"{_server.machine()}; mode {mode}; seed {args.seed}; {args.rate:g} ops/s, "
        f"{args.minutes:g} min, {args.length} tokens at {args.tokens_per_s:g}/s"
    )
    print(args.header)
    with (scaled_server if args.scaled else sqlite_server)(args) as (srv, size):
        soak = Soak(srv, args, size)
        _server.run(soak.run())
        report(soak, args, "soak-scaled" if args.scaled else "soak")
    sys.exit(1 if soak.violations else 0)


if __name__ == "__main__":
    main()
