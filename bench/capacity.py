"""The capacity model of a scaled-out tether (docs/capacity.md), as code.

    python bench/capacity.py                  # the docs' table: 10 k and 100 k streams
    python bench/capacity.py --streams 5000 --rate 30 --fanout 2
    python bench/capacity.py --costs bench/out/capacity_costs.json   # a fresh measurement

Inputs are per-event costs measured by `bench/scale_cluster.py` (CPU µs per event of each
process kind, Redis commands and bytes, PostgreSQL transactions, rows and WAL bytes per
event); `MEASURED` holds the run the docs quote. Two uses:

- `plan(costs, Target)`: how many API replicas, workers and Redis masters, and what
  PostgreSQL write rate, N concurrent streams at R tokens/s with F readers per stream need,
  each process kept at `utilization` of its one core, and what saturates first;
- `machine_max(costs, ...)`: the events/s one machine of `cores` sustains with a given set
  of processes on it (what bench/scale_cluster.py measures, to check the model).

The model is linear in events: a process kind's CPU = its idle CPU + its cost per event x
its events/s + `hear_us` x the deployment's events/s (every process hears every wake-up:
docs/scaling.md). Each tether process is one asyncio loop and each Redis master one thread,
so neither uses more than one core.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Costs:
    """Measured costs, per event appended to a log (per event delivered for `api_us` and
    `client_us`); CPU in µs."""

    api_us: float  # an API replica serving a reader, hearing excluded
    worker_us: float  # a worker running (scripted engine) and appending, hearing excluded
    hear_us: float  # any process, per event of the whole deployment: its wake-ups
    redis_us: float  # Redis, all masters together
    pg_us: float  # PostgreSQL: this database's backends and the WAL writer etc.
    client_us: float  # the benchmark's client (only for the machine check)
    idle_cores: dict[str, float] = field(default_factory=dict)  # per process, at rest
    redis_commands: float = 0.0
    redis_by_command: dict[str, float] = field(default_factory=dict)
    redis_bytes_in: float = 0.0
    redis_bytes_out: float = 0.0
    pg_transactions: float = 0.0
    pg_rows: float = 0.0
    pg_wal_bytes: float = 0.0
    measured_at: str = ""


# `flock /tmp/bench.lock python bench/scale_cluster.py`, 2026-12-06 (bench/README.md, scale.py
# section; docs/capacity.md): K=1's best step.
MEASURED = Costs(
    api_us=112.7,
    worker_us=115.4,
    hear_us=12.4,
    redis_us=14.1,
    pg_us=40.7,
    client_us=10.1,
    idle_cores={"api": 0.003, "worker": 0.007, "listener": 0.003, "redis": 0.002},
    redis_commands=2.292,
    redis_by_command={
        "XRANGE": 0.038,
        "XADD": 1.002,
        "MULTI": 0.038,
        "EXISTS": 0.038,
        "EXEC": 0.038,
        "SPUBLISH": 0.127,
        "EXPIRE": 1.002,
    },
    redis_bytes_in=571.5,
    redis_bytes_out=465.5,
    pg_transactions=0.049,
    pg_rows=2.397,
    pg_wal_bytes=654.5,
    measured_at="K=1, 220 streams x 20 tokens/s, 3,873 events/s, 2026-12-06",
)


# What one PostgreSQL primary is assumed to sustain (not measured here: the order of
# magnitude of a large server with fast NVMe; docs/capacity.md): WAL MB/s and cores.
PG_MAX_WAL_MB = 300.0
PG_MAX_CORES = 32.0


@dataclass(frozen=True)
class Target:
    streams: int
    rate: float = 20.0  # tokens (events) per second per stream
    fanout: float = 1.0  # readers per stream
    utilization: float = 0.7  # of each process's one core, headroom for bursts


@dataclass
class Limit:
    events_per_s: float
    limit: str  # what saturates first


@dataclass
class Plan:
    target: Target
    events_per_s: float
    apis: int
    workers: int
    redis_masters: int
    pg_cores: float
    pg_rows_per_s: float
    pg_transactions_per_s: float
    pg_wal_mb_per_s: float
    redis_commands_per_s: float
    redis_mb_per_s: float  # in + out
    hear_cores: float  # of each process, spent hearing wake-ups
    total_cores: float
    first_limit: str


def machine_max(
    costs: Costs, *, apis: int, workers: int, listeners: int, cores: float, client: bool = True
) -> Limit:
    """The events/s one machine of `cores` carries with these processes (fan-out 1), and
    the first limit: the machine's cores, or one process's single core."""
    idle = costs.idle_cores
    processes = apis + workers + listeners
    at_rest = (
        apis * idle.get("api", 0.0)
        + workers * idle.get("worker", 0.0)
        + listeners * idle.get("listener", 0.0)
        + 3 * idle.get("redis", 0.0)
    )
    per_event = (
        costs.api_us
        + costs.worker_us
        + costs.redis_us
        + costs.pg_us
        + processes * costs.hear_us
        + (costs.client_us if client else 0.0)
    )
    limits = {"machine cores": (cores - at_rest) * 1e6 / per_event}
    limits["one core per API replica"] = 1e6 / (costs.api_us / apis + costs.hear_us)
    limits["one core per worker"] = 1e6 / (costs.worker_us / workers + costs.hear_us)
    if client and costs.client_us > 0:
        limits["one core for the client"] = 1e6 / costs.client_us
    name = min(limits, key=lambda k: limits[k])
    return Limit(limits[name], name)


def plan(costs: Costs, target: Target, broadcast: bool = True) -> Plan:
    """Size a deployment for `target`, each process at `utilization` of its core.
    `broadcast`: every process hears every wake-up (tether today); False: a process hears
    only the responses it writes or reads (per-response wake channels: docs/scaling.md)."""
    events = target.streams * target.rate
    delivered = events * target.fanout
    u = target.utilization
    idle = costs.idle_cores
    hear = events * costs.hear_us / 1e6 if broadcast else 0.0  # cores of every process
    own = 0.0 if broadcast else costs.hear_us  # µs per own event (per-response channels)
    free_api = u - hear - idle.get("api", 0.0)
    free_worker = u - hear - idle.get("worker", 0.0)
    if min(free_api, free_worker) <= 0:
        apis = workers = 0
        total = float("nan")
        first = f"hearing wake-ups: {hear:,.1f} cores of every process"
    else:
        apis = math.ceil(delivered * (costs.api_us + own) / 1e6 / free_api)
        workers = math.ceil(events * (costs.worker_us + own) / 1e6 / free_worker)
        total = (
            (apis + workers) * hear
            + (delivered * (costs.api_us + own) + events * (costs.worker_us + own)) / 1e6
            + events * (costs.redis_us + costs.pg_us) / 1e6
        )
        first = "hearing wake-ups (each process)" if hear > u / 2 else _first(costs, target)
    wal = events * costs.pg_wal_bytes / 1e6
    if wal > PG_MAX_WAL_MB or events * costs.pg_us / 1e6 > PG_MAX_CORES:
        first = f"PostgreSQL, one primary ({wal:,.0f} WAL MB/s); " + first
    masters = max(1, math.ceil(events * costs.redis_us / 1e6 / u))
    return Plan(
        target,
        events,
        apis,
        workers,
        masters,
        events * costs.pg_us / 1e6,
        events * costs.pg_rows,
        events * costs.pg_transactions,
        events * costs.pg_wal_bytes / 1e6,
        events * costs.redis_commands,
        events * (costs.redis_bytes_in + costs.redis_bytes_out) / 1e6,
        hear,
        total,
        first,
    )


def _first(costs: Costs, target: Target) -> str:
    """The part that needs the most cores per event, so grows first."""
    parts = {
        "API replicas' CPU": costs.api_us * target.fanout,
        "workers' CPU": costs.worker_us,
        "PostgreSQL's CPU (one primary)": costs.pg_us,
    }
    return max(parts, key=lambda k: parts[k])


def costs_table(costs: Costs) -> str:
    rows = [
        ("API replica, per event delivered to a reader", f"{costs.api_us:.0f} µs CPU"),
        ("worker (scripted engine), per event appended", f"{costs.worker_us:.0f} µs CPU"),
        ("any process, hearing one event's wake-up", f"{costs.hear_us:.1f} µs CPU"),
        ("Redis (all masters), per event", f"{costs.redis_us:.0f} µs CPU"),
        ("PostgreSQL, per event", f"{costs.pg_us:.0f} µs CPU"),
        ("benchmark client, per event received", f"{costs.client_us:.0f} µs CPU"),
        (
            "idle, per process (cores)",
            ", ".join(f"{k} {v:.3f}" for k, v in costs.idle_cores.items()),
        ),
        (
            "Redis commands per event",
            f"{costs.redis_commands:.2f} ("
            + ", ".join(f"{k} {v:.2f}" for k, v in _by_count(costs.redis_by_command))
            + ")",
        ),
        (
            "Redis bytes per event, in / out",
            f"{costs.redis_bytes_in:,.0f} / {costs.redis_bytes_out:,.0f}",
        ),
        ("PostgreSQL transactions per event", f"{costs.pg_transactions:.3f}"),
        ("PostgreSQL rows written per event", f"{costs.pg_rows:.3f}"),
        ("PostgreSQL WAL bytes per event", f"{costs.pg_wal_bytes:,.0f}"),
        ("measured", costs.measured_at),
    ]
    return _table(["cost", "value"], [list(r) for r in rows])


def _by_count(counts: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(counts.items(), key=lambda kv: -kv[1])


def plans_table(plans: list[Plan], labels: list[str] | None = None) -> str:
    head = ["", *(labels or [f"{p.target.streams:,} streams" for p in plans])]
    rows: list[list[str]] = [
        ["events/s (streams x R)", *[f"{p.events_per_s:,.0f}" for p in plans]],
        [
            "events/s delivered (x fan-out)",
            *[f"{p.events_per_s * p.target.fanout:,.0f}" for p in plans],
        ],
        ["API replicas", *[str(p.apis) for p in plans]],
        ["workers", *[str(p.workers) for p in plans]],
        ["Redis masters (CPU)", *[str(p.redis_masters) for p in plans]],
        ["Redis commands/s", *[f"{p.redis_commands_per_s:,.0f}" for p in plans]],
        ["Redis MB/s in + out", *[f"{p.redis_mb_per_s:,.0f}" for p in plans]],
        ["PostgreSQL rows/s", *[f"{p.pg_rows_per_s:,.0f}" for p in plans]],
        ["PostgreSQL transactions/s", *[f"{p.pg_transactions_per_s:,.0f}" for p in plans]],
        ["PostgreSQL WAL MB/s", *[f"{p.pg_wal_mb_per_s:,.1f}" for p in plans]],
        ["PostgreSQL CPU (cores)", *[f"{p.pg_cores:,.1f}" for p in plans]],
        ["cores of each process hearing wake-ups", *[f"{p.hear_cores:.2f}" for p in plans]],
        ["total CPU (cores)", *[f"{p.total_cores:,.0f}" for p in plans]],
        ["saturates first", *[p.first_limit for p in plans]],
    ]
    return _table(head, rows)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    cells = [headers, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *[line(r) for r in rows]])


def load_costs(path: Path | None) -> Costs:
    if path is None:
        return MEASURED
    return Costs(**json.loads(path.read_text()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--costs", type=Path, help="a costs JSON from bench/scale_cluster.py")
    p.add_argument("--streams", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream (20)")
    p.add_argument("--fanout", type=float, default=1.0, help="readers per stream (1)")
    p.add_argument("--utilization", type=float, default=0.7, help="of each core (0.7)")
    args = p.parse_args()
    costs = load_costs(args.costs)
    print(costs_table(costs))
    print()
    print(tables(costs, args.streams, args.rate, args.fanout, args.utilization))
    return 0


def largest(costs: Costs, rate: float, share: float = 0.5) -> int:
    """Streams at `rate` at which hearing every wake-up takes `share` of each process's
    core: about as far as broadcast wake-ups go."""
    return int(share / (costs.hear_us / 1e6 * rate))


def tables(costs: Costs, streams: list[int], rate: float, fanout: float, u: float) -> str:
    """The docs' sizing table: each target today (every process hears every wake-up) and
    with per-response wake channels."""
    plans, labels = [], []
    for n in streams:
        target = Target(n, rate, fanout, u)
        plans += [plan(costs, target), plan(costs, target, broadcast=False)]
        labels += [f"{n:,} streams: today", f"{n:,}: per-response wake-ups"]
    return (
        plans_table(plans, labels)
        + f"\n\nR = {rate:g} tokens (events)/s per stream, fan-out {fanout:g} reader(s) per "
        f"stream, each process at {u:.0%} of its core. Broadcast wake-ups take half of every "
        f"process's core at {largest(costs, rate):,} streams."
    )


if __name__ == "__main__":
    sys.exit(main())
