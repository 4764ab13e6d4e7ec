"""Capacity check (issue 21): K API replicas + K workers on a Redis Cluster and PostgreSQL,
measured against the capacity model (`bench/capacity.py`, docs/capacity.md).

Run: `python bench/scale_cluster.py` (K = 1 and 2, about 3 minutes on the 2-core machine;
`--cluster 1 2 3` adds K = 3). It is `bench/scale.py`'s cluster mode, in a module of its own
(scale.py is long); it uses scale.py's processes, CPU probe and SSE reader.

Everything is real processes on loopback: a Redis Cluster of 3 masters started here from
Debian's `redis-server` (tests/redis_cluster.py), a fresh database on the PostgreSQL at --pg,
and per K a fresh set of tether processes (scripted engine, `--debug-routes`): K API replicas
(`tether serve --workers 0`) that the readers use, K workers, and one more API replica nobody
reads from, the *listener*: every process hears every wake-up of the deployment, and the
listener's CPU is what that costs one process. Per K:

1. idle, `--idle` s: CPU of each process at rest.
2. a ramp: `--ramp-step` background+stream responses at `--rate` tokens/s are added at a
   time (alternating over the API replicas, each POST stream read to the end by one reader:
   fan-out 1); once they have their first event and `--ramp-settle` s passed, a
   `--ramp-window` s window is measured: events appended (PostgreSQL: the sum of
   `last_seq + 1`) and delivered (the readers), CPU seconds of each process kind, Redis
   commands (`INFO commandstats`) and bytes in / out (`INFO stats`) of the 3 masters,
   PostgreSQL transactions, rows written (`pg_stat_database`) and WAL bytes
   (`pg_current_wal_lsn()`). A step *kept up* if the readers got >= `--keep-up` (90%) of
   the events the streams' rate makes; the ramp stops after two steps in a row that did not.
   The step with the most events/s both appended and delivered while keeping up is the
   measured capacity of the machine for the setup. The first step has `--ramp-start`
   streams.
3. The first K's best step gives the model's costs (`capacity.Costs`: CPU per event of each
   process kind above its idle CPU, the listener's as every process's hearing cost, counts
   per event), saved to bench/out/capacity_costs.json. The model then predicts each K's
   capacity (`capacity.machine_max`) on the cores that processes outside the benchmark left
   free in that step, each process limited to one core; printed beside the measured figure
   with the ratio, goal within 25%. The first K calibrates, so its ratio is ~1 by
   construction (up to the idle CPU and the free cores); the other Ks are the check.

The client (this process, raw httpx) shares the cores, so the prediction counts its CPU per
event too. The exit code is 1 if a prediction is off by more than 25%.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import capacity
import scale
from _report import Chart, out_dir, progress, save
from _server import machine, run, table
from cluster_probe import Probe, Window
from redis_cluster import PrivateRedisCluster

# --- load --------------------------------------------------------------------------------


@dataclass
class Load:
    """N streams open at once, each read by one reader (its POST stream)."""

    readers: list[scale.Reader] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def delivered(self) -> int:
        return sum(r.count for r in self.readers)

    def failed(self) -> list[str]:
        return [f"{r.rid}: {r.error}" for r in self.readers if r.error]


async def grow(load: Load, apis: list[str], n: int, length: int, client: Any, limit: float) -> None:
    """Create `n` more background+stream responses (alternating over `apis`); return once
    every reader has its first event (or after `limit` s)."""
    body = {
        "model": "scripted",
        "input": "capacity",
        "background": True,
        "stream": True,
        "max_output_tokens": length,
    }
    new = [scale.Reader(keep=False) for _ in range(n)]
    start = len(load.readers)
    load.readers += new
    load.tasks += [
        asyncio.ensure_future(
            r.read(client, "POST", f"{apis[(start + i) % len(apis)]}/v1/responses", body)
        )
        for i, r in enumerate(new)
    ]
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        if all(r.first_at is not None or r.error or r.done for r in new):
            return
        await asyncio.sleep(0.1)


async def close(load: Load) -> None:
    for t in load.tasks:
        t.cancel()
    await asyncio.gather(*load.tasks, return_exceptions=True)


async def measure(probe: Probe, load: Load | None, seconds: float, desc: str) -> Window:
    """Counters over `seconds` (the snapshots' own cost runs in a thread, so the readers
    keep reading meanwhile)."""
    delivered = load.delivered if load is not None else lambda: 0
    a = await asyncio.to_thread(probe.snap, delivered())
    if desc:
        for _ in progress(range(ticks := max(1, int(seconds / 0.5))), desc=desc, unit="tick"):
            await asyncio.sleep(seconds / ticks)
    else:
        await asyncio.sleep(seconds)
    b = await asyncio.to_thread(probe.snap, delivered())
    return Window.between(a, b)


# --- one setup ------------------------------------------------------------------------------


@dataclass
class Step:
    streams: int
    window: Window

    def kept_up(self, rate: float, share: float) -> bool:
        """The readers got at least `share` of the events the streams' rate makes."""
        return self.window.rate >= share * self.streams * rate

    @property
    def sustained(self) -> float:
        """Events/s both appended and delivered (readers catching up can deliver more than
        was appended in a window, and the other way round)."""
        return min(self.window.delivered, self.window.appended) / self.window.wall


@dataclass
class Result:
    k: int
    idle: Window
    steps: list[Step]
    problems: list[str]

    def kept_up(self, rate: float, share: float) -> list[Step]:
        return [s for s in self.steps if s.kept_up(rate, share)]

    def best(self, rate: float, share: float) -> Step | None:
        """The step that delivered the most events/s with every stream at its rate: the
        measured capacity (the ramp stops two steps after the streams fall behind)."""
        return max(self.kept_up(rate, share), key=lambda s: s.sustained, default=None)


@contextlib.contextmanager
def setup(args: argparse.Namespace, k: int, redis: PrivateRedisCluster) -> Iterator[Probe]:
    """K API replicas + K workers + the listener on a fresh database and key prefix."""
    backing = scale.Backing(args.pg, redis.url)
    workdir = Path(tempfile.mkdtemp(prefix="tether-bench-capacity-"))
    tether = scale.Cluster(
        backing, workdir, apis=k + 1, workers=k, rate=args.rate, length=args.length
    )
    listener = tether.apis[-1].name
    ok = False
    try:
        backing.create()
        tether.start()
        yield Probe(tether, listener, redis, backing.name, backing.url)
        ok = True
    finally:
        tether.stop()
        for line in scale.log_problems(tether.all):
            print(f"  log: {line}")
        if backing.created:
            scale._admin(backing.pg, f'DROP DATABASE IF EXISTS "{backing.name}" WITH (FORCE)')
        if args.keep_logs or not ok:
            print(f"  (server logs kept in {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def run_setup(args: argparse.Namespace, k: int, probe: Probe) -> Result:
    apis = [s.url for s in probe.tether.apis[:k]]
    idle = await measure(probe, None, args.idle, f"K={k} idle")
    async with scale.http_client(args.ramp_max + 50, timeout=600) as client:
        steps, problems = await ramp(args, k, probe, apis, client)
    return Result(k, idle, steps, problems)


async def ramp(
    args: argparse.Namespace, k: int, probe: Probe, apis: list[str], client: Any
) -> tuple[list[Step], list[str]]:
    """Add `--ramp-step` streams at a time, measuring each step, until two steps in a row
    fall behind the streams' rate (or `--ramp-max` streams)."""
    load, steps, behind = Load(), list[Step](), 0
    await grow(load, apis, args.ramp_start - args.ramp_step, args.length, client, 60)
    with progress(total=args.ramp_max, desc=f"K={k} ramp", unit="stream") as bar:
        while len(load.readers) < args.ramp_max and behind < 2:
            await grow(load, apis, args.ramp_step, args.length, client, 30)
            bar.update(args.ramp_step)
            await asyncio.sleep(args.ramp_settle)
            step = Step(len(load.readers), await measure(probe, load, args.ramp_window, ""))
            steps.append(step)
            behind = 0 if step.kept_up(args.rate, args.keep_up) else behind + 1
    problems = load.failed()
    await close(load)
    return steps, problems


# --- costs from the calibration --------------------------------------------------------------


def costs_from(r: Result, args: argparse.Namespace) -> capacity.Costs:
    """The model's inputs from one setup's ramp, at its best step (the most events/s with
    every stream at its rate: the batching of a loaded deployment): CPU per event of each
    process kind above its idle CPU; hearing = the listener's; counts per event."""
    k = r.k
    best = r.best(args.rate, args.keep_up) or r.steps[-1]
    w, idle = best.window, r.idle
    events, delivered = max(1, w.appended), max(1, w.delivered)

    def busy(group: str) -> float:
        """CPU seconds of `group` above its idle rate, over the window."""
        return max(0.0, w.cpu.get(group, 0.0) - idle.cores(group) * w.wall)

    hear = busy("listener") / events
    commands = {c.removeprefix("cmd "): v / events for c, v in w.redis.items() if "cmd " in c}
    return capacity.Costs(
        api_us=1e6 * max(0.0, busy("api") - k * hear * events) / delivered,
        worker_us=1e6 * max(0.0, busy("worker") - k * hear * events) / events,
        hear_us=1e6 * hear,
        redis_us=1e6 * busy("redis") / events,
        pg_us=1e6 * (busy("pg") + busy("pg other")) / events,
        client_us=1e6 * busy("client") / delivered,
        idle_cores={
            kind: idle.cores(kind) / n
            for kind, n in (("api", k), ("worker", k), ("listener", 1), ("redis", 3))
        },
        redis_commands=sum(commands.values()),
        redis_by_command={c: round(v, 3) for c, v in commands.items() if v >= 0.01},
        redis_bytes_in=w.redis.get("bytes in", 0) / events,
        redis_bytes_out=w.redis.get("bytes out", 0) / events,
        pg_transactions=w.pg["transactions"] / events,
        pg_rows=w.pg["rows"] / events,
        pg_wal_bytes=w.pg["wal"] / events,
        measured_at=f"K={k}, {best.streams} streams x {args.rate:g} tokens/s, "
        f"{w.appended / w.wall:,.0f} events/s, {time.strftime('%Y-%m-%d')}",
    )


def predict(costs: capacity.Costs, k: int, window: Window) -> capacity.Limit:
    """The model's max events/s for K API replicas + K workers + the listener, on the cores
    that processes outside the benchmark left free during `window`."""
    cores = (os.cpu_count() or 2) - window.other / window.wall
    return capacity.machine_max(costs, apis=k, workers=k, listeners=1, cores=cores)


def report(args: argparse.Namespace, results: list[Result], costs: capacity.Costs) -> list[float]:
    """Print the check; return each K's ratio predicted / measured (NaN: no knee found)."""
    rows, ratios = [], []
    for r in results:
        best = r.best(args.rate, args.keep_up)
        if best is None:
            ratios.append(float("nan"))
            rows.append([f"K={r.k}", "no step kept up", "", "", ""])
            continue
        pred = predict(costs, r.k, best.window)
        ratios.append(pred.events_per_s / best.sustained)
        cores = (os.cpu_count() or 2) - best.window.other / best.window.wall
        rows.append(
            [
                f"K={r.k}: {r.k} API + {r.k} workers + listener",
                f"{best.sustained:,.0f} ({best.streams} streams)",
                f"{pred.events_per_s:,.0f} ({pred.limit})",
                f"{ratios[-1]:.2f}",
                f"{cores:.2f}",
            ]
        )
    out = [
        f"## the model vs measured: max events/s with every stream at {args.rate:g} tokens/s"
        f" (readers get >= {args.keep_up:.0%} of it)\n",
        table(
            [
                "setup",
                "measured: most events/s appended and delivered, streams at their rate",
                "model (first limit)",
                "model / measured",
                "cores free",
            ],
            rows,
        ),
        "\nCPU per process kind in each window (cores), and events/s:\n",
    ]
    groups = ["client", "api", "worker", "listener", "pg", "pg other", "redis"]
    windows = [(f"K={r.k} idle", r.idle) for r in results]
    windows += [(f"K={r.k} {s.streams} streams", s.window) for r in results for s in r.steps]
    out.append(
        table(
            ["window", *groups, "other", "delivered/s", "appended/s"],
            [
                [
                    name,
                    *[f"{w.cores(g):.2f}" for g in groups],
                    f"{w.other / w.wall:.2f}",
                    f"{w.rate:,.0f}",
                    f"{w.appended / w.wall:,.0f}",
                ]
                for name, w in windows
            ],
        )
    )
    out += [f"  problem (K={r.k}): {p}" for r in results for p in r.problems[:5]]
    return ratios, "\n".join(out)


def chart(results: list[Result]) -> Chart:
    counts = sorted({s.streams for r in results for s in r.steps})
    series = {}
    for r in results:
        rates = {s.streams: s.window.rate for s in r.steps}
        series[f"K={r.k}"] = [rates.get(n, float("nan")) for n in counts]
    return Chart(
        "events/s delivered as streams are added",
        "events/s",
        counts,
        series,
        kind="line",
        xlabel="streams",
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cluster", type=int, nargs="+", default=[1, 2], help="K values (1 2)")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream (20)")
    p.add_argument("--length", type=int, default=4000, help="tokens per response (4000)")
    p.add_argument("--ramp-step", type=int, default=20, help="streams added per step (20)")
    p.add_argument("--ramp-max", type=int, default=400, help="most streams (400)")
    p.add_argument("--ramp-start", type=int, default=60, help="streams of the first step (60)")
    p.add_argument("--ramp-window", type=float, default=3.0, help="seconds per step (3)")
    p.add_argument("--ramp-settle", type=float, default=1.0, help="seconds before (1)")
    p.add_argument(
        "--keep-up", type=float, default=0.9, help="share of the rate a step must deliver (0.9)"
    )
    p.add_argument("--idle", type=float, default=3.0, help="seconds measured at rest (3)")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args()

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8 * args.ramp_max)), hard))
    print("# capacity check: K API replicas + K workers on a Redis Cluster + PostgreSQL")
    print(
        table(
            ["parameter", "value"],
            [
                ["K", " ".join(map(str, args.cluster))],
                ["Redis", "a Redis Cluster of 3 masters (redis-server, started here)"],
                ["PostgreSQL", f"{args.pg} (a fresh database per K, dropped)"],
                ["load", f"{args.rate:g} tokens/s per stream, 1 reader per stream"],
                [
                    "ramp",
                    f"{args.ramp_start} streams, then +{args.ramp_step} per step (up to "
                    f"{args.ramp_max}), "
                    f"{args.ramp_window:g} s measured {args.ramp_settle:g} s after they opened",
                ],
                ["machine", machine()],
            ],
        )
    )
    t0 = time.perf_counter()
    redis = PrivateRedisCluster(masters=3)
    results: list[Result] = []
    try:
        redis.start()
        for k in args.cluster:
            with setup(args, k, redis) as probe:
                results.append(run(run_setup(args, k, probe)))
    finally:
        redis.cleanup()
    per_k = [costs_from(r, args) for r in results]
    costs = per_k[0]
    for r, c in zip(results, per_k, strict=True):
        print(f"\n## measured costs, K={r.k}" + (" (the model's inputs)" if c is costs else ""))
        print(capacity.costs_table(c))
    ratios, check = report(args, results, costs)
    print("\n" + check)
    (out_dir() / "capacity_costs.json").write_text(json.dumps(asdict(costs), indent=2) + "\n")
    md = f"{check}\n\n## measured costs (K={results[0].k})\n\n{capacity.costs_table(costs)}"
    save(
        "scale_cluster",
        md,
        chart(results),
    )
    ok = all(abs(x - 1) <= 0.25 for x in ratios)
    print(
        f"\nwall {time.perf_counter() - t0:.0f} s; load average now "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; model "
        f"{'within' if ok else 'NOT within'} 25% of measured"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
