"""Scale-out figures (issue 5): tether on PostgreSQL + Redis, API replicas and workers.

Run: `python bench/scale.py` (about 4 minutes on the 2-core machine; `--quick`: about 1).
Every cluster is real processes on loopback: `tether serve --workers 0` API replicas and
`tether worker` workers (`--engine scripted --debug-routes`), all on one fresh PostgreSQL
database (`tether_bench_<random>` on --pg, dropped afterwards) and one fresh Redis key
prefix (`tether-bench-<random>` on --redis, its keys deleted afterwards). Each part starts
its own cluster and stops it, even on failure or Ctrl-C. Clients are raw httpx (async),
parsing SSE frames themselves (the SDK's typed events would make the client the
bottleneck). Client, servers, PostgreSQL and Redis share the machine's cores, and the
scripted engine's trace times (`GET /debug/engine/{id}` on the worker that ran it) and
the client's times come from the same wall clock.

1. Throughput, 1 vs 2 workers (`--tp-*`). `--apis` API replicas (2) and 1, then 2,
   workers. A round: N background+stream responses created at once, alternating between
   the replicas; the POST stream of each is its reader. Aggregate events/s = events
   received by all readers / (first POST sent -> last `[DONE]`); each reader must get
   exactly length + 9 events and `[DONE]`. Median of `--tp-repeats` rounds (after an
   untimed warm-up). Two modes (`--tp-modes`):
   - `full`: `--scripted-rate 0` (as fast as possible), `--tp-streams` x `--tp-length`:
     the engine costs nothing, so this is bound by the CPU of the relay itself (workers,
     PostgreSQL, Redis, API replicas, client), all on the same cores;
   - `slots`: each worker runs at most `--tp-slots` responses at once
     (`tether worker --workers N`) at `--tp-slot-rate` tokens/s, `--tp-slot-streams` x
     `--tp-slot-length`: an engine that is the bottleneck (as a GPU with a fixed batch
     would be), so a second worker can add capacity if the rest keeps up.
   The CPU seconds of every process over the median round are printed: the client, each
   API replica and worker, this database's PostgreSQL backends, the other PostgreSQL
   processes (WAL writer, checkpointer, other databases), all redis-server processes, the
   whole machine (/proc/stat) and "other" (the machine minus all of those: anything else
   running), and server CPU per event (tether + its PostgreSQL backends + Redis).

2. `--many` (1000) concurrent background+stream responses, 2 API replicas (alternate),
   2 workers, `--many-rate` tokens/s, `--many-length` tokens: all POSTs are issued at
   once (`--many-ramp S` spreads them over S seconds), each POST stream is one reader.
   The client behaves as the SDK and `tether.client.resumable` would: a create answered
   503 is retried after 1 s, a stream that breaks before `[DONE]` is resumed on the other
   replica with `starting_after` = the last event received; both are counted, and fail
   the checks. Checks per reader: HTTP 200; `sequence_number` 0..n-1 contiguous, no
   duplicate; the last event is terminal, then `[DONE]` and nothing after; the events
   equal (byte for byte, or as JSON) a `GET ?stream=true` replay made afterwards on the
   other replica; the replay's deltas == the engine trace's `produced`. Events lost =
   events of the replay missing from the reader, plus engine tokens missing from the log;
   and no response may exist in the database whose create the client saw fail.
   Latency: "token -> reader" = time the reader received delta i minus the engine's
   `token_times[i]` (so it includes the store, Redis, the API replica, the network and
   the client's event loop), pooled over all deltas, and again over only the tokens made
   once every reader had its first event (without the create burst); "create -> first
   event" = POST sent -> first event received. The same load on a single-process
   `tether serve` with SQLite (`--no-baseline` skips it) gives the baseline; "added by
   scale-out" = cluster minus single process, per percentile.

3. `--cancels` (200) cancels from another replica than the one streaming: 2 API replicas
   (A, B), 2 workers at `--cancel-rate` (100) tokens/s, `--cancel-length` (200) tokens,
   `--cancel-concurrency` (20) at a time. Each response is created (background+stream)
   on A and read there; after a random number of deltas (uniform in
   [--min-deltas, --max-deltas], seeded: `--seed`, printed) `POST /cancel` goes to B.
   Cancel -> engine stopped = trace `aborted_at` - cancel request sent; cancel -> reply;
   cancel -> terminal event on A's stream; engine tokens after the reply = trace
   `token_times` later than the reply's arrival (goal 0, docs/contract.md §3.3). Checks: reply
   200 `cancelled`; its `usage.output_tokens` == trace `produced` == deltas on the stream;
   the stream ends with `response.failed` (status `cancelled`), then `[DONE]`.

The exit code is 1 if any check failed. Every part is bounded by `--part-timeout`
seconds; readers that did not finish by then count as failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

import _server
from _report import Chart, Transcript, progress, save
from _server import HOST, Server, percentile, table

PY = sys.executable
HEADER_EVENTS = 9  # created, queued, in_progress, item/part added, text/part/item done, end
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
DELTA = "response.output_text.delta"
T = TypeVar("T")


# --- backing services and clusters ---------------------------------------------------------


class Backing:
    """A fresh PostgreSQL database and Redis key prefix; `drop()` removes both."""

    def __init__(self, pg: str, redis: str) -> None:
        self.pg = pg.rstrip("/")
        self.redis = redis
        self.name = f"tether_bench_{secrets.token_hex(4)}"
        self.prefix = f"tether-bench-{secrets.token_hex(4)}"
        self.created = False

    @property
    def url(self) -> str:
        return f"{self.pg}/{self.name}"

    async def response_ids(self) -> list[str]:
        """Every response id in the database."""
        return await _ids(self.url)

    def create(self) -> None:
        _admin(self.pg, f'CREATE DATABASE "{self.name}"')
        self.created = True

    def drop(self) -> None:
        if self.created:
            try:
                _admin(self.pg, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
                self.created = False
            except Exception as exc:
                print(f"warning: could not drop database {self.name}: {exc}")
        import redis

        try:
            r = redis.Redis.from_url(self.redis, socket_timeout=5)
            keys = list(r.scan_iter(match=f"{self.prefix}:*", count=1000))
            for i in range(0, len(keys), 500):
                r.delete(*keys[i : i + 500])
            r.close()
        except Exception as exc:
            print(f"warning: could not delete Redis keys {self.prefix}:*: {exc}")


def _admin(pg: str, sql: str) -> None:
    import asyncpg

    async def go() -> None:
        con = await asyncpg.connect(f"{pg}/postgres", timeout=10)
        try:
            await con.execute(sql, timeout=30)
        finally:
            await con.close()

    asyncio.run(go())


async def _ids(url: str) -> list[str]:
    import asyncpg

    con = await asyncpg.connect(url, timeout=10)
    try:
        return [r[0] for r in await con.fetch("SELECT id FROM responses", timeout=30)]
    finally:
        await con.close()


class Cluster:
    """`apis` API replicas and `workers` workers on one Backing, scripted engine."""

    def __init__(
        self,
        backing: Backing,
        workdir: Path,
        *,
        apis: int,
        workers: int,
        rate: float,
        length: int,
        worker_args: Sequence[str] = (),
    ) -> None:
        shared = [
            "--db",
            backing.url,
            "--redis",
            backing.redis,
            "--redis-prefix",
            backing.prefix,
            "--engine",
            "scripted",
            "--debug-routes",
            "--host",
            HOST,
            "--port",
            "{port}",
            "--scripted-rate",
            str(rate),
            "--scripted-length",
            str(length),
        ]
        self.backing = backing
        self.apis = [
            Server(
                [PY, "-m", "tether", "serve", "--workers", "0", *shared],
                workdir=workdir,
                name=f"api{i + 1}",
            )
            for i in range(apis)
        ]
        self.workers = [
            Server(
                [PY, "-m", "tether", "worker", *shared, *worker_args],
                workdir=workdir,
                name=f"worker{i + 1}",
            )
            for i in range(workers)
        ]

    @property
    def all(self) -> list[Server]:
        return [*self.apis, *self.workers]

    def start(self) -> None:
        # The first process migrates the fresh database; the others start together.
        self.all[0].start()
        with ThreadPoolExecutor(len(self.all)) as pool:
            for f in [pool.submit(s.start) for s in self.all[1:]]:
                f.result()

    def stop(self) -> None:
        for s in self.all:
            s.stop()


_EXC = re.compile(
    r"^([\w.]+(Error|Exception|Unavailable)\b.*|store unavailable on .*|"
    r"WARNING.*|ERROR.*)$"
)


def log_problems(servers: Sequence[Server]) -> list[str]:
    """The servers' log lines that name an error or a warning, counted (ids and numbers
    blanked so that alike lines count together)."""
    out = []
    for s in servers:
        try:
            lines = s.log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        seen = Counter(
            re.sub(r"resp_[0-9a-f]+|\d+(\.\d+)?", "#", ln)[:160] for ln in lines if _EXC.match(ln)
        )
        for line, n in seen.most_common(4):
            out.append(f"{s.name}: {n} x {line}")
    return out


@contextlib.contextmanager
def cluster(
    args: argparse.Namespace,
    *,
    apis: int,
    workers: int,
    rate: float,
    length: int,
    worker_args: Sequence[str] = (),
) -> Iterator[Cluster]:
    """A started cluster on a fresh database and prefix, all removed afterwards."""
    backing = Backing(args.pg, args.redis)
    workdir = Path(tempfile.mkdtemp(prefix="tether-bench-scale-"))
    c = Cluster(
        backing,
        workdir,
        apis=apis,
        workers=workers,
        rate=rate,
        length=length,
        worker_args=worker_args,
    )
    ok = False
    try:
        backing.create()
        c.start()
        yield c
        ok = True
    finally:
        c.stop()
        for line in log_problems(c.all):
            print(f"  log: {line}")
        backing.drop()
        if args.keep_logs or not ok:
            print(f"  (server logs kept in {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def single(rate: float, length: int) -> Iterator[Server]:
    """The baseline: one `tether serve` process on a temp SQLite file."""
    srv = Server(_server.tether_cmd(rate=rate, length=length), name="single")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        srv.cleanup()


# --- CPU accounting --------------------------------------------------------------------------


def _procs(comm: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _machine_busy() -> float:
    """CPU seconds the whole machine spent busy so far (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuProbe:
    """CPU seconds per process group between `start()` and `stop()`."""

    def __init__(
        self, servers: Sequence[Server], dbname: str | None, backing: Backing | None = None
    ) -> None:
        self.servers = servers
        self.dbname = dbname
        self.backing = backing
        self.ops: dict[str, int] = {}  # store operations between start and stop

    def _ops(self) -> dict[str, int]:
        """PostgreSQL transactions of this database and Redis commands (the whole server,
        by command), as counters."""
        out: dict[str, int] = {}
        if self.backing is None:
            return out
        with contextlib.suppress(Exception):
            sql = (
                "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                f"WHERE datname = '{self.backing.name}'"
            )
            got = subprocess.run(
                ["psql", "-Atc", sql, self.backing.url], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            out["PostgreSQL transactions"] = int(got or 0)
        with contextlib.suppress(Exception):
            import redis

            r = redis.Redis.from_url(self.backing.redis, socket_timeout=5)
            for name, stat in r.info("commandstats").items():
                out["Redis " + name.removeprefix("cmdstat_").upper()] = int(stat["calls"])
            r.close()
        return out

    def _groups(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {"client": [os.getpid()]}
        for s in self.servers:
            if s.proc is not None:
                groups[s.name] = [s.pid]
        pg = _procs("postgres")
        if self.dbname:
            ours = [p for p in pg if f" {self.dbname} " in _cmdline(p)]
            groups["postgres (this db)"] = ours
            groups["postgres (other)"] = [p for p in pg if p not in ours]
        else:
            groups["postgres (all)"] = pg
        groups["redis-server (all)"] = _procs("redis-server")
        return groups

    def _sample(self) -> dict[str, dict[int, float]]:
        return {g: {p: _server.cpu_seconds(p) for p in pids} for g, pids in self._groups().items()}

    def start(self) -> None:
        self.ops0 = self._ops()
        self.t0, self.busy0, self.s0 = time.perf_counter(), _machine_busy(), self._sample()

    def stop(self) -> dict[str, float]:
        wall, busy, s1 = time.perf_counter() - self.t0, _machine_busy() - self.busy0, self._sample()
        out: dict[str, float] = {}
        for g, pids in s1.items():
            before = self.s0.get(g, {})
            out[g] = sum(
                max(0.0, c - before.get(p, 0.0)) for p, c in pids.items() if c == c
            )  # NaN: the process is gone
        out["other"] = max(0.0, busy - sum(out.values()))
        out["machine busy"] = busy
        out["wall"] = wall
        ops1 = self._ops()
        self.ops = {
            k: v - self.ops0.get(k, 0) for k, v in ops1.items() if v - self.ops0.get(k, 0) > 0
        }
        return out


def ops_line(ops: dict[str, int], events: int) -> str:
    """Store operations per event received: PostgreSQL transactions, and the Redis
    commands that are at least 5% of them (the Redis figures count the whole server)."""
    if not ops or not events:
        return ""
    pg = ops.pop("PostgreSQL transactions", None)
    redis_total = sum(ops.values())
    top = [
        f"{k.split()[1]} {v / events:.2f}"
        for k, v in sorted(ops.items(), key=lambda kv: -kv[1])
        if v >= 0.05 * redis_total
    ][:6]
    return (
        f"per event received: PostgreSQL transactions {pg / events:.3f}"
        if pg is not None
        else "per event received:"
    ) + f"; Redis commands {redis_total / events:.2f} ({', '.join(top)})"


NOT_SERVER = {"client", "postgres (other)", "other", "machine busy", "wall"}


def server_cpu(cpu: dict[str, float]) -> float:
    """CPU seconds of tether's processes, this database's backends and Redis."""
    return sum(v for g, v in cpu.items() if g not in NOT_SERVER)


# --- SSE readers -----------------------------------------------------------------------------


@dataclass
class Reader:
    """One SSE stream, parsed. `keep`: keep every event (seq, type, data) and the
    arrival time of every delta; else only count events (cheap)."""

    keep: bool = True
    status: int | None = None
    rid: str | None = None
    count: int = 0
    events: list[tuple[int, str, bytes]] = field(default_factory=list)
    delta_at: list[float] = field(default_factory=list)
    deltas: int = 0
    sent_at: float | None = None
    first_at: float | None = None
    terminal: dict[str, Any] | None = None
    terminal_at: float | None = None
    done: bool = False
    done_at: float | None = None
    after_end: int = 0  # frames after the terminal event or after [DONE] (must be 0)
    error: str | None = None
    retried: int = 0  # creates answered 503 and retried (`create`)
    cuts: int = 0  # streams that broke before [DONE] and were resumed (`create`)
    cut_errors: list[str] = field(default_factory=list)
    _buf: bytes = b""

    def feed(self, chunk: bytes, now: float) -> None:
        buf = self._buf + chunk
        frames = buf.split(b"\n\n")
        self._buf = frames.pop()
        for frame in frames:
            self._frame(frame, now)

    def _frame(self, frame: bytes, now: float) -> None:
        kind = data = None
        for line in frame.split(b"\n"):
            if line.startswith(b"data: "):
                data = line[6:]
            elif line.startswith(b"event: "):
                kind = line[7:].decode()
        if data is None:
            return  # a keepalive comment
        if self.done:
            self.after_end += 1
            return
        if data == b"[DONE]":
            self.done, self.done_at = True, now
            return
        if self.terminal is not None:
            self.after_end += 1
        self.count += 1
        if self.first_at is None:
            self.first_at = now
        if self.rid is None:
            self.rid = orjson.loads(data)["response"]["id"]
        if kind == DELTA:
            self.deltas += 1
            if self.keep:
                self.delta_at.append(now)
        if self.keep:
            parsed = orjson.loads(data)
            kind = parsed["type"]
            self.events.append((parsed["sequence_number"], kind, data))
        if kind in TERMINAL:
            self.terminal = orjson.loads(data)
            self.terminal_at = now

    async def read(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        body: dict[str, Any] | None = None,
        on_event: Callable[[Reader], None] | None = None,
    ) -> None:
        self._buf = b""  # a frame cut by a broken connection is dropped
        self.error = None
        try:
            if self.sent_at is None:
                self.sent_at = time.time()
            async with client.stream(method, url, json=body) as response:
                self.status = response.status_code
                if response.status_code != 200:
                    self.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return
                async for chunk in response.aiter_raw():
                    before = self.count
                    self.feed(chunk, time.time())
                    if on_event is not None and self.count != before:
                        on_event(self)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    async def create(
        self,
        client: httpx.AsyncClient,
        create: str,
        resume: str,
        body: dict[str, Any],
        attempts: int = 5,
    ) -> None:
        """POST a streaming create, as a careful client would: a 503 before any event
        is retried after a second (the reply says `retry-after: 1, x-should-retry:
        true`); a stream that breaks before `[DONE]` is resumed on `resume` with
        `starting_after` = the last event received. Both are counted."""
        for _ in range(attempts):
            await self.read(client, "POST", f"{create}/v1/responses", body)
            if self.status != 503 or self.rid is not None:
                break
            self.retried += 1
            await asyncio.sleep(1.0)
        for _ in range(attempts):
            if self.done or self.rid is None or self.status not in (200, 503):
                break
            if self.status == 503:
                await asyncio.sleep(1.0)
            else:
                self.cuts += 1
                self.cut_errors.append(self.error or "body ended before [DONE]")
            after = self.events[-1][0] if self.events else -1
            await self.read(
                client,
                "GET",
                f"{resume}/v1/responses/{self.rid}?stream=true&starting_after={after}",
            )

    def contiguous(self) -> bool:
        return [e[0] for e in self.events] == list(range(len(self.events)))

    def complete(self) -> bool:
        return (
            self.error is None and self.terminal is not None and self.done and self.after_end == 0
        )


def http_client(connections: int, timeout: float = 120.0) -> httpx.AsyncClient:
    # Idle connections are dropped after 2 s, before uvicorn closes them (5 s): reusing
    # one the server is closing would fail a request that never reached the server.
    limits = httpx.Limits(
        max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=2.0
    )
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=30.0))


def tracked(jobs: Sequence[Coroutine[Any, Any, T]], desc: str) -> list[Coroutine[Any, Any, T]]:
    """The same jobs, each ticking one progress bar (stderr) when it ends."""
    bar = progress(total=len(jobs), desc=desc, unit="job")

    async def one(job: Coroutine[Any, Any, T]) -> T:
        try:
            return await job
        finally:
            bar.update(1)

    return [one(job) for job in jobs]


async def gather_limited(n: int, jobs: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Await `jobs`, at most `n` at a time."""
    sem = asyncio.Semaphore(n)

    async def one(job: Coroutine[Any, Any, T]) -> T:
        async with sem:
            return await job

    return await asyncio.gather(*(one(j) for j in jobs))


async def traces(
    client: httpx.AsyncClient, workers: Sequence[str], rids: Sequence[str]
) -> dict[str, tuple[int, dict[str, Any]]]:
    """The engine trace of each response: (index of the worker that ran it, trace)."""
    out: dict[str, tuple[int, dict[str, Any]]] = {}

    async def one(rid: str) -> None:
        for i, url in enumerate(workers):
            r = await client.get(f"{url}/debug/engine/{rid}")
            if r.status_code == 200:
                out[rid] = (i, r.json())
                return

    await gather_limited(32, [one(rid) for rid in rids])
    return out


def ms(values: Sequence[float]) -> list[float]:
    return [
        percentile(values, 50) * 1000,
        percentile(values, 99) * 1000,
        (max(values) if values else float("nan")) * 1000,
    ]


# --- part 1: throughput, 1 vs 2 workers ---------------------------------------------------


@dataclass
class Round:
    workers: int
    events: int
    wall: float
    rate: float
    problems: list[str]
    cpu: dict[str, float]
    spread: list[int]  # responses run per worker
    ops: dict[str, int]  # store operations (CpuProbe.ops)


async def tp_round(c: Cluster, n: int, length: int, probe: CpuProbe | None) -> Round:
    apis = [a.url for a in c.apis]
    body = {
        "model": "scripted",
        "input": "bench scale",
        "background": True,
        "stream": True,
        "max_output_tokens": length,
    }
    readers = [Reader(keep=False) for _ in range(n)]
    async with http_client(n + 10) as client:
        if probe:
            probe.start()
        t0 = time.time()
        await asyncio.gather(
            *tracked(
                [
                    r.read(client, "POST", f"{apis[i % len(apis)]}/v1/responses", body)
                    for i, r in enumerate(readers)
                ],
                f"{len(c.workers)} worker(s): streams ended",
            )
        )
        cpu = probe.stop() if probe else {}
        ops = dict(probe.ops) if probe else {}
        ends = [r.done_at for r in readers if r.done_at is not None]
        wall = (max(ends) - t0) if ends else float("nan")
        rids = [r.rid for r in readers if r.rid]
        ran = await traces(client, [w.url for w in c.workers], rids)
    spread = [sum(1 for i, _ in ran.values() if i == w) for w in range(len(c.workers))]
    problems = [
        f"reader {i}: {r.error or f'{r.count} events, [DONE] {r.done}'}"
        for i, r in enumerate(readers)
        if r.error or r.count != length + HEADER_EVENTS or not r.done
    ]
    events = sum(r.count for r in readers)
    return Round(len(c.workers), events, wall, events / wall, problems, cpu, spread, ops)


@dataclass
class Mode:
    name: str
    streams: int
    length: int
    rate: float
    slots: int | None  # runs a worker executes at once (`tether worker --workers N`)


def tp_modes(args: argparse.Namespace) -> list[Mode]:
    modes = {
        "full": Mode("full speed (CPU-bound)", args.tp_streams, args.tp_length, 0, None),
        "slots": Mode(
            f"engine-bound ({args.tp_slots} runs/worker at {args.tp_slot_rate:g} tokens/s)",
            args.tp_slot_streams,
            args.tp_slot_length,
            args.tp_slot_rate,
            args.tp_slots,
        ),
    }
    return [modes[m] for m in args.tp_modes]


def part_throughput(args: argparse.Namespace) -> tuple[list[tuple[Mode, list[Round]]], bool]:
    print(
        f"\n## 1. throughput: {args.apis} API replica(s), 1 vs 2 workers, "
        f"{args.tp_repeats} round(s) per case, median"
    )
    out = []
    ok = True
    for mode in tp_modes(args):
        print(f"\n### {mode.name}: {mode.streams} streams x {mode.length} tokens")
        medians = []
        for workers in (1, 2):
            extra = ["--workers", str(mode.slots)] if mode.slots else []
            with cluster(
                args,
                apis=args.apis,
                workers=workers,
                rate=mode.rate,
                length=mode.length,
                worker_args=extra,
            ) as c:
                probe = CpuProbe(c.all, c.backing.name, c.backing)

                async def go(
                    c: Cluster = c, probe: CpuProbe = probe, mode: Mode = mode
                ) -> list[Round]:
                    await tp_round(c, mode.streams, min(mode.length, 20), None)  # warm-up
                    return [
                        await tp_round(c, mode.streams, mode.length, probe)
                        for _ in range(args.tp_repeats)
                    ]

                rounds = _server.run(asyncio.wait_for(go(), args.part_timeout))
            rounds.sort(key=lambda r: r.rate)
            median = rounds[len(rounds) // 2]
            median.problems = [p for r in rounds for p in r.problems]
            medians.append(median)
            print(
                f"  {workers} worker(s): "
                + ", ".join(f"{r.rate:,.0f}" for r in rounds)
                + " events/s"
            )
        print()
        print(
            table(
                [
                    "workers",
                    "aggregate events/s",
                    "events",
                    "wall s",
                    "runs per worker",
                    "server CPU µs/event",
                    "check",
                ],
                [
                    [
                        r.workers,
                        r.rate,
                        r.events,
                        r.wall,
                        "/".join(map(str, r.spread)),
                        1e6 * server_cpu(r.cpu) / r.events,
                        "ok" if not r.problems else f"{len(r.problems)} problems",
                    ]
                    for r in medians
                ],
            )
        )
        ratio = medians[1].rate / medians[0].rate
        print(f"\n2 workers / 1 worker: {ratio:.2f}x (goal >= 1.7x)")
        groups = list(dict.fromkeys(g for r in medians for g in r.cpu))
        print(
            "\nCPU seconds over the median round (cores: CPU s / wall s; the machine has "
            f"{os.cpu_count()}):"
        )
        print(
            table(
                ["process", *[f"{r.workers} worker(s)" for r in medians]],
                [
                    [
                        g,
                        *[
                            f"{r.cpu.get(g, 0):.2f} ({r.cpu.get(g, 0) / r.cpu['wall']:.2f})"
                            for r in medians
                        ],
                    ]
                    for g in groups
                    if g != "wall"
                ],
            )
        )
        for r in medians:
            if line := ops_line(dict(r.ops), r.events):
                print(f"{r.workers} worker(s), {line}")
        for r in medians:
            for p in r.problems[:5]:
                print(f"  problem ({r.workers} worker(s)): {p}")
        ok &= all(not r.problems for r in medians)
        out.append((mode, medians))
    return out, ok


# --- part 2: many concurrent streams -----------------------------------------------------


@dataclass
class ManyResult:
    name: str
    readers: int
    complete: int = 0
    equal_replay: int = 0
    events: int = 0  # received by all readers
    ops: dict[str, int] = field(default_factory=dict)  # store operations (CpuProbe.ops)
    http_errors: int = 0  # still not 200 after the retries
    retried: int = 0  # creates answered 503, retried
    cuts: int = 0  # streams broken before [DONE], resumed
    cut_errors: Counter[str] = field(default_factory=Counter)
    orphans: int = 0  # responses in the database the client never got an id for
    lost: int = 0
    duplicated: int = 0
    not_contiguous: int = 0
    engine_missing: int = 0  # engine tokens missing from the durable log
    token_pairs: list[tuple[float, float]] = field(default_factory=list)  # (made, received)
    first_lat: list[float] = field(default_factory=list)
    opened_at: float = float("inf")  # when the last reader got its first event

    @property
    def token_lat(self) -> list[float]:
        return [got - made for made, got in self.token_pairs]

    @property
    def steady_lat(self) -> list[float]:
        """Token -> reader for the tokens made once every stream was open."""
        return [got - made for made, got in self.token_pairs if made > self.opened_at]

    wall: float = 0.0
    spread: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)


async def many_run(
    name: str,
    apis: Sequence[str],
    workers: Sequence[str],
    n: int,
    timeout: float,
    probe: CpuProbe,
    ramp: float = 0.0,
    backing: Backing | None = None,
) -> ManyResult:
    res = ManyResult(name, n)
    body = {"model": "scripted", "input": "bench scale many", "background": True, "stream": True}
    readers = [Reader() for _ in range(n)]
    async with http_client(n + 50, timeout) as client:
        probe.start()
        t0 = time.time()

        async def start(i: int, r: Reader) -> None:
            if ramp:
                await asyncio.sleep(ramp * i / n)
            await r.create(client, apis[i % len(apis)], apis[(i + 1) % len(apis)], body)

        jobs = tracked([start(i, r) for i, r in enumerate(readers)], f"{name}: streams ended")
        tasks = [asyncio.ensure_future(job) for job in jobs]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for r, t in zip(readers, tasks, strict=True):
            if t in pending and r.error is None:
                r.error = f"not finished after {timeout:.0f}s"
        res.cpu = probe.stop()
        res.ops = dict(probe.ops)
        ends = [r.done_at for r in readers if r.done_at is not None]
        res.wall = (max(ends) - t0) if ends else float("nan")
        res.opened_at = max((r.first_at for r in readers if r.first_at), default=res.opened_at)

        # Replays on the other replica, then the engine traces.
        replays: dict[int, Reader] = {}

        async def replay(i: int, rid: str) -> None:
            rep = Reader()
            await rep.read(
                client, "GET", f"{apis[(i + 1) % len(apis)]}/v1/responses/{rid}?stream=true"
            )
            replays[i] = rep

        await gather_limited(32, [replay(i, r.rid) for i, r in enumerate(readers) if r.rid])
        ran = await traces(client, workers, [r.rid for r in readers if r.rid])
    res.spread = [sum(1 for w, _ in ran.values() if w == k) for k in range(len(workers))]

    res.events = sum(r.count for r in readers)
    res.retried = sum(r.retried for r in readers)
    res.cuts = sum(r.cuts for r in readers)
    res.cut_errors = Counter(e.split(":")[0] for r in readers for e in r.cut_errors)
    if backing is not None:
        known = {r.rid for r in readers if r.rid}
        res.orphans = len(set(await backing.response_ids()) - known)
    for i, r in enumerate(readers):
        if r.status is not None and r.status != 200:
            res.http_errors += 1
        rep = replays.get(i)
        trace = ran.get(r.rid or "", (0, None))[1]
        if r.complete():
            res.complete += 1
        elif len(res.problems) < 5:
            res.problems.append(
                f"reader {i} ({r.rid}): incomplete: error={r.error} "
                f"terminal={r.terminal is not None} done={r.done} "
                f"after_end={r.after_end} events={r.count}"
            )
        if not r.contiguous():
            res.not_contiguous += 1
        seqs = [e[0] for e in r.events]
        res.duplicated += len(seqs) - len(set(seqs))
        if rep is None or not rep.complete():
            if len(res.problems) < 10:
                res.problems.append(
                    f"reader {i} ({r.rid}): no complete replay ({rep.error if rep else 'no id'})"
                )
            continue
        res.lost += len({e[0] for e in rep.events} - set(seqs))
        same = [e[0] for e in r.events] == [e[0] for e in rep.events] and all(
            a[2] == b[2] or orjson.loads(a[2]) == orjson.loads(b[2])
            for a, b in zip(r.events, rep.events, strict=True)
        )
        res.equal_replay += same and r.complete()
        if trace is None:
            res.problems.append(f"reader {i} ({r.rid}): no engine trace on any worker")
            continue
        produced = int(trace["produced"])
        res.engine_missing += max(0, produced - rep.deltas)
        times = trace["token_times"]
        res.token_pairs += list(zip(times, r.delta_at, strict=False))
        if r.first_at is not None and r.sent_at is not None:
            res.first_lat.append(r.first_at - r.sent_at)
    return res


def part_many(args: argparse.Namespace) -> tuple[list[ManyResult], bool]:
    print(
        f"\n## 2. {args.many} concurrent background+stream responses: 2 API replicas "
        f"(alternate), 2 workers, {args.many_rate:g} tokens/s x {args.many_length} tokens, "
        + (f"creates spread over {args.many_ramp:g} s" if args.many_ramp else "all created at once")
    )
    results = []
    with cluster(args, apis=2, workers=2, rate=args.many_rate, length=args.many_length) as c:
        results.append(
            _server.run(
                many_run(
                    "cluster: 2 API + 2 workers, PostgreSQL + Redis",
                    [a.url for a in c.apis],
                    [w.url for w in c.workers],
                    args.many,
                    args.part_timeout,
                    CpuProbe(c.all, c.backing.name, c.backing),
                    args.many_ramp,
                    c.backing,
                )
            )
        )
    if not args.no_baseline:
        with single(args.many_rate, args.many_length) as s:
            results.append(
                _server.run(
                    many_run(
                        "single process, SQLite",
                        [s.url],
                        [s.url],
                        args.many,
                        args.part_timeout,
                        CpuProbe([s], None),
                        args.many_ramp,
                    )
                )
            )
    print()
    names = [r.name.split(",")[0] for r in results]
    print(
        table(
            ["", *names],
            [
                ["readers (POST streams)", *[r.readers for r in results]],
                ["complete: terminal event, [DONE], nothing after", *[r.complete for r in results]],
                ["equal to the replay on the other replica", *[r.equal_replay for r in results]],
                ["events in the replay missing from the reader", *[r.lost for r in results]],
                [
                    "events duplicated / readers not contiguous",
                    *[f"{r.duplicated} / {r.not_contiguous}" for r in results],
                ],
                ["engine tokens missing from the log", *[r.engine_missing for r in results]],
                ["creates answered 503 (retried after 1 s)", *[r.retried for r in results]],
                [
                    "streams broken before [DONE] (resumed)",
                    *[f"{r.cuts} {dict(r.cut_errors) if r.cut_errors else ''}" for r in results],
                ],
                ["readers failed after retries (HTTP error)", *[r.http_errors for r in results]],
                ["responses in the db the client never got", *[r.orphans for r in results]],
                ["wall s (first POST -> last [DONE])", *[r.wall for r in results]],
                ["events received", *[r.events for r in results]],
                [
                    "server CPU µs/event (tether, its PG backends, Redis)",
                    *[1e6 * server_cpu(r.cpu) / max(1, r.events) for r in results],
                ],
                ["runs per worker", *["/".join(map(str, r.spread)) for r in results]],
            ],
        )
    )
    print(
        "\nLatency, ms. token -> reader: the reader received delta i - the engine's "
        "token_times[i] (every delta; 'once all open': only tokens made after the last "
        "reader got its first event, i.e. without the create burst). create -> first "
        "event: POST sent -> first event received (503 retries included)."
    )
    rows: list[list[object]] = []
    measures: list[tuple[str, Callable[[ManyResult], list[float]]]] = [
        ("token -> reader, all", lambda r: r.token_lat),
        ("token -> reader, once all open", lambda r: r.steady_lat),
        ("create -> first event", lambda r: r.first_lat),
    ]
    for label, get in measures:
        for r in results:
            rows.append([label, r.name.split(",")[0], *ms(get(r)), len(get(r))])
        if len(results) == 2:
            a, b = (ms(get(r)) for r in results)
            rows.append(
                [
                    label,
                    "added by scale-out (cluster - single)",
                    *[x - y for x, y in zip(a, b, strict=True)],
                    "",
                ]
            )
    print(table(["measure", "setup", "p50", "p99", "max", "samples"], rows))
    print("\nCPU seconds during the streams (cores):")
    groups = list(dict.fromkeys(g for r in results for g in r.cpu if g != "wall"))
    print(
        table(
            ["process", *names],
            [
                [
                    g,
                    *[
                        f"{r.cpu[g]:.2f} ({r.cpu[g] / r.cpu['wall']:.2f})" if g in r.cpu else ""
                        for r in results
                    ],
                ]
                for g in groups
            ],
        )
    )
    for r in results:
        if line := ops_line(dict(r.ops), r.events):
            print(f"{r.name.split(',')[0]}, {line}")
    ok = True
    for r in results:
        for p in r.problems[:10]:
            print(f"  problem ({r.name}): {p}")
        ok &= (
            r.complete == r.readers == r.equal_replay
            and r.lost
            == r.duplicated
            == r.not_contiguous
            == r.engine_missing
            == r.retried
            == r.cuts
            == r.orphans
            == 0
        )
    return results, ok


# --- part 3: cancel from another replica ------------------------------------------------


@dataclass
class Cancel:
    after: int  # deltas seen before the cancel
    reader: Reader = field(default_factory=Reader)
    sent: float | None = None
    replied: float | None = None
    reply_status: int | None = None
    reply: dict[str, Any] | None = None
    error: str | None = None


async def cancel_one(client: httpx.AsyncClient, a: str, b: str, job: Cancel) -> None:
    body = {"model": "scripted", "input": "bench scale cancel", "background": True, "stream": True}
    fired: list[asyncio.Task[None]] = []

    async def cancel(rid: str) -> None:
        try:
            job.sent = time.time()
            r = await client.post(f"{b}/v1/responses/{rid}/cancel")
            job.replied = time.time()
            job.reply_status = r.status_code
            job.reply = r.json()
        except Exception as exc:
            job.error = f"{type(exc).__name__}: {exc}"

    def on_event(r: Reader) -> None:
        if not fired and r.deltas >= job.after and r.rid:
            fired.append(asyncio.ensure_future(cancel(r.rid)))

    await job.reader.read(client, "POST", f"{a}/v1/responses", body, on_event)
    if fired:
        await fired[0]
    else:
        job.error = job.error or "the stream ended before the cancel was sent"


def part_cancel(args: argparse.Namespace, seed: int) -> tuple[dict[str, Any], bool]:
    print(
        f"\n## 3. cancel on API B of responses created and streamed on API A: 2 workers, "
        f"{args.cancels} cancels, {args.cancel_concurrency} at a time, "
        f"{args.cancel_rate:g} tokens/s x {args.cancel_length} tokens, cancel after "
        f"{args.min_deltas}..{args.max_deltas} deltas (seed {seed})"
    )
    rng = random.Random(seed)
    jobs = [Cancel(rng.randint(args.min_deltas, args.max_deltas)) for _ in range(args.cancels)]
    with cluster(args, apis=2, workers=2, rate=args.cancel_rate, length=args.cancel_length) as c:
        a, b = c.apis[0].url, c.apis[1].url

        probe = CpuProbe(c.all, c.backing.name, c.backing)

        async def go() -> dict[str, tuple[int, dict[str, Any]]]:
            async with http_client(2 * args.cancel_concurrency + 10) as client:
                probe.start()
                await gather_limited(
                    args.cancel_concurrency,
                    tracked([cancel_one(client, a, b, j) for j in jobs], "cancels"),
                )
                cpu.update(probe.stop())
                return await traces(
                    client, [w.url for w in c.workers], [j.reader.rid for j in jobs if j.reader.rid]
                )

        cpu: dict[str, float] = {}
        ran = _server.run(asyncio.wait_for(go(), args.part_timeout))
    reply, stop, terminal, after_reply, between = [], [], [], [], []
    checks = {
        "reply 200 cancelled": 0,
        "usage == engine produced == stream deltas": 0,
        "stream ends response.failed (cancelled) + [DONE]": 0,
    }
    problems = []
    for i, j in enumerate(jobs):
        r = j.reader
        trace = ran.get(r.rid or "", (0, None))[1]
        if j.error or j.sent is None or j.replied is None or trace is None:
            problems.append(f"cancel {i} ({r.rid}): {j.error or r.error or 'no trace'}")
            continue
        reply.append(j.replied - j.sent)
        if trace["aborted_at"] is not None:
            stop.append(trace["aborted_at"] - j.sent)
        if r.terminal_at is not None:
            terminal.append(r.terminal_at - j.sent)
        times = trace["token_times"]
        after_reply.append(sum(1 for t in times if t > j.replied))
        between.append(sum(1 for t in times if j.sent < t <= j.replied))
        status_ok = j.reply_status == 200 and (j.reply or {}).get("status") == "cancelled"
        checks["reply 200 cancelled"] += status_ok
        usage = ((j.reply or {}).get("usage") or {}).get("output_tokens")
        checks["usage == engine produced == stream deltas"] += (
            usage == trace["produced"] == r.deltas
        )
        t = r.terminal or {}
        checks["stream ends response.failed (cancelled) + [DONE]"] += (
            r.complete()
            and t.get("type") == "response.failed"
            and t.get("response", {}).get("status") == "cancelled"
        )
        if not status_ok and len(problems) < 10:
            problems.append(f"cancel {i} ({r.rid}): reply {j.reply_status} {str(j.reply)[:200]}")
    spread = [sum(1 for w, _ in ran.values() if w == k) for k in range(2)]
    print()
    print(
        table(
            ["ms", "p50", "p99", "max"],
            [
                ["cancel request (B) -> engine stopped (trace aborted_at)", *ms(stop)],
                ["cancel request (B) -> reply", *ms(reply)],
                ["cancel request (B) -> terminal event on A's stream", *ms(terminal)],
            ],
        )
    )
    print()
    print(
        table(
            ["tokens", "max", "total", "responses > 0"],
            [
                [
                    "engine tokens after the cancel reply (goal 0)",
                    max(after_reply, default=0),
                    sum(after_reply),
                    sum(1 for x in after_reply if x),
                ],
                [
                    "engine tokens between cancel request and reply",
                    max(between, default=0),
                    sum(between),
                    sum(1 for x in between if x),
                ],
            ],
        )
    )
    print()
    print(table(["check", "pass", "fail"], [[k, v, len(jobs) - v] for k, v in checks.items()]))
    print(
        f"runs per worker: {'/'.join(map(str, spread))}; engine stopped seen for "
        f"{len(stop)}/{len(jobs)}"
    )
    for p in problems[:10]:
        print(f"  problem: {p}")
    ok = not problems and all(v == len(jobs) for v in checks.values()) and not any(after_reply)
    print(
        f"CPU (cores): tether + PG + Redis {server_cpu(cpu) / cpu['wall']:.2f}, client "
        f"{cpu['client'] / cpu['wall']:.2f}, other processes {cpu['other'] / cpu['wall']:.2f}"
        f", machine busy {cpu['machine busy'] / cpu['wall']:.2f} of {os.cpu_count()}"
    )
    return {
        "stop": stop,
        "reply": reply,
        "after_reply": after_reply,
        "n": len(jobs),
        "cpu": cpu,
    }, ok


# --- main -------------------------------------------------------------------------------


def _interrupt(*_: object) -> None:
    """SIGTERM: do what Ctrl-C does. Inside `asyncio.Runner` a SIGINT cancels the running
    part cleanly (raising KeyboardInterrupt from this handler instead could land inside
    a task and be kept there); outside it, it raises KeyboardInterrupt."""
    signal.raise_signal(signal.SIGINT)


def main() -> int:
    with Transcript() as printed:
        charts: list[Chart] = []
        code = run(charts)
    save("scale", printed.text, *charts)
    return code


def run(charts: list[Chart]) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small, fast smoke run of every part (about 1 minute)",
    )
    p.add_argument(
        "--pg",
        default="postgresql://postgres@127.0.0.1:5432",
        help="PostgreSQL server (a database is created and dropped on it)",
    )
    p.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/0",
        help="Redis (a random key prefix is used, its keys deleted)",
    )
    p.add_argument("--apis", type=int, default=2, help="API replicas in part 1 (2)")
    p.add_argument("--tp-streams", type=int, default=20, help="part 1: concurrent streams")
    p.add_argument("--tp-length", type=int, default=20000, help="part 1: tokens per response")
    p.add_argument("--tp-repeats", type=int, default=3, help="part 1: rounds (median shown)")
    p.add_argument(
        "--tp-modes",
        nargs="+",
        choices=["full", "slots"],
        default=["full", "slots"],
        help="part 1: full speed (--tp-streams, --tp-length) and/or engine-bound "
        "workers (--tp-slots runs each at --tp-slot-rate)",
    )
    p.add_argument(
        "--tp-slots",
        type=int,
        default=10,
        help="part 1, engine-bound: runs a worker executes at once (10)",
    )
    p.add_argument(
        "--tp-slot-rate",
        type=float,
        default=100.0,
        help="part 1, engine-bound: tokens/s of each run (100)",
    )
    p.add_argument(
        "--tp-slot-streams",
        type=int,
        default=40,
        help="part 1, engine-bound: concurrent streams (40)",
    )
    p.add_argument(
        "--tp-slot-length",
        type=int,
        default=300,
        help="part 1, engine-bound: tokens per response (300)",
    )
    p.add_argument("--many", type=int, default=1000, help="part 2: concurrent responses")
    p.add_argument("--many-rate", type=float, default=2.0, help="part 2: tokens/s")
    p.add_argument("--many-length", type=int, default=20, help="part 2: tokens per response")
    p.add_argument(
        "--many-ramp",
        type=float,
        default=0.0,
        help="part 2: spread the creates evenly over this many seconds (0: all at once)",
    )
    p.add_argument(
        "--no-baseline", action="store_true", help="part 2: skip the single-process SQLite baseline"
    )
    p.add_argument("--cancels", type=int, default=200, help="part 3: cancels")
    p.add_argument("--cancel-concurrency", type=int, default=20)
    p.add_argument("--cancel-rate", type=float, default=100.0)
    p.add_argument("--cancel-length", type=int, default=200)
    p.add_argument("--min-deltas", type=int, default=1)
    p.add_argument("--max-deltas", type=int, default=150)
    p.add_argument("--seed", type=int, help="part 3's RNG seed (default: random, printed)")
    p.add_argument(
        "--part-timeout",
        type=float,
        default=300.0,
        help="seconds any part may take before it is stopped (300)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' log files")
    args = p.parse_args()
    if args.quick:
        args.tp_streams, args.tp_length, args.tp_repeats = 4, 2000, 1
        args.tp_slot_streams, args.tp_slot_length = 20, 100
        args.many, args.cancels, args.cancel_concurrency = 100, 20, 10
        args.max_deltas = min(args.max_deltas, 100)
        args.part_timeout = min(args.part_timeout, 120.0)
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    # SIGTERM and Ctrl-C end the run through every `finally`, which cleans up.
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, _interrupt)
    # One socket per reader here and in the servers (children inherit the limit).
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 4 * args.many + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    print("# scale-out: API replicas + workers on PostgreSQL + Redis (scripted engine)")
    print(
        table(
            ["parameter", "value"],
            [
                ["parts", " ".join(map(str, args.parts)) + (" (--quick)" if args.quick else "")],
                ["PostgreSQL", f"{args.pg} (fresh database per part, dropped)"],
                ["Redis", f"{args.redis} (fresh key prefix per part, deleted)"],
                ["client", f"httpx {httpx.__version__} (async, raw SSE), one process"],
                ["seed (part 3)", seed],
                ["machine", _server.machine()],
            ],
        )
    )

    t0 = time.perf_counter()
    ok = True
    summary: list[list[object]] = []
    others: list[str] = []  # CPU of processes outside the benchmark, per case

    def other(name: str, cpu: dict[str, float]) -> None:
        if cpu:
            others.append(f"{name} {cpu['other'] / cpu['wall']:.2f}")

    try:
        if 1 in args.parts:
            cases, good = part_throughput(args)
            ok &= good
            charts.append(
                Chart(
                    "events/s, 1 vs 2 workers",
                    "events/s",
                    [mode.name.split(" (")[0] for mode, _ in cases],
                    {
                        f"{k + 1} worker(s)": [medians[k].rate for _, medians in cases]
                        for k in range(2)
                    },
                )
            )
            for mode, medians in cases:
                ratio = medians[1].rate / medians[0].rate
                summary += [
                    [
                        f"{mode.name}: events/s 1 -> 2 workers (ratio)",
                        f"{medians[0].rate:,.0f} -> {medians[1].rate:,.0f} ({ratio:.2f}x)",
                        ">= 1.7x",
                    ]
                ]
                for rnd in medians:
                    other(f"1/{mode.name.split()[0]}/{rnd.workers}w", rnd.cpu)
        if 2 in args.parts:
            results, good = part_many(args)
            ok &= good
            c = results[0]
            for r in results:
                other(f"2/{r.name.split(':')[0].split(',')[0]}", r.cpu)
            summary += [
                [
                    f"{c.readers} concurrent: readers complete and equal to replay",
                    f"{c.equal_replay}/{c.readers}",
                    "all",
                ],
                [
                    f"{c.readers} concurrent: events lost (reader vs replay, engine vs log)",
                    f"{c.lost} + {c.engine_missing}",
                    "0",
                ],
                [
                    f"{c.readers} concurrent: creates answered 503 / streams broken (resumed)",
                    f"{c.retried} / {c.cuts}",
                    "0 / 0",
                ],
            ]
            lat = [(r, ms(r.token_lat)[1], ms(r.steady_lat)[1]) for r in results]
            charts.append(
                Chart(
                    f"token -> reader p99, {c.readers} streams",
                    "ms",
                    [r.name.split(",")[0] for r, _, _ in lat],
                    {"all": [a for _, a, _ in lat], "once all open": [b for _, _, b in lat]},
                )
            )
            summary += [
                [
                    f"token -> reader p99 ms, {r.name.split(',')[0]}",
                    f"{a:,.1f} (once all open: {b:,.1f})",
                    "",
                ]
                for r, a, b in lat
            ]
            if len(lat) == 2:
                summary += [
                    [
                        "p99 added by scale-out ms (cluster - single)",
                        f"{lat[0][1] - lat[1][1]:,.1f} (once all open: "
                        f"{lat[0][2] - lat[1][2]:,.1f})",
                        "",
                    ]
                ]
        if 3 in args.parts:
            fig, good = part_cancel(args, seed)
            ok &= good
            other("3", fig["cpu"])
            charts.append(
                Chart(
                    f"cancel on another replica ({fig['n']} cancels)",
                    "ms",
                    ["p50", "p99"],
                    {"engine stopped": ms(fig["stop"])[:2], "reply": ms(fig["reply"])[:2]},
                )
            )
            summary += [
                [
                    "cancel on B -> engine stopped p50 / p99 ms",
                    f"{ms(fig['stop'])[0]:.1f} / {ms(fig['stop'])[1]:.1f}",
                    "",
                ],
                [
                    "cancel on B -> reply p50 / p99 ms",
                    f"{ms(fig['reply'])[0]:.1f} / {ms(fig['reply'])[1]:.1f}",
                    "",
                ],
                [
                    f"max engine tokens after the cancel reply ({fig['n']} cancels)",
                    max(fig["after_reply"], default=0),
                    "0",
                ],
            ]
    except (TimeoutError, KeyboardInterrupt) as exc:
        print(f"\nstopped: {type(exc).__name__} {exc}")
        ok = False
    print("\n## summary")
    if others:
        summary.append(
            [
                "CPU of processes outside this benchmark, cores (part/case)",
                ", ".join(others),
                "~0 (a quiet machine)",
            ]
        )
    print(table(["figure", "value", "goal"], summary))
    print(
        f"\nwall {time.perf_counter() - t0:.0f} s; load average now "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; checks "
        f"{'passed' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
