"""Counters of a scaled-out tether on a Redis Cluster, for bench/scale_cluster.py: CPU
seconds per process kind, events appended and delivered, Redis commands and bytes,
PostgreSQL transactions, rows and WAL bytes; `Window` is what changed between two
`Snapshot`s."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

import scale
from _server import cpu_seconds
from redis_cluster import PrivateRedisCluster


def _psql(url: str, sql: str) -> list[str]:
    out = subprocess.run(
        ["psql", "-Atc", sql, url], capture_output=True, text=True, timeout=15, check=True
    )
    return out.stdout.strip().split("|")


@dataclass
class Snapshot:
    """Cumulative counters at one instant."""

    at: float
    cpu: dict[str, float]  # process group -> CPU seconds
    busy: float  # the whole machine's busy CPU seconds
    delivered: int  # events the readers received
    appended: int  # events in the log (sum of last_seq + 1)
    pg: dict[str, float]  # transactions, rows, WAL bytes
    redis: dict[str, float]  # commands by name, bytes in / out, CPU seconds


class Probe:
    """Counters of one setup: tether processes by kind, this database's PostgreSQL
    backends, the other PostgreSQL processes (WAL writer, checkpointer: shared with any
    other database), the Redis Cluster's masters, this client, the machine."""

    def __init__(
        self, tether: scale.Cluster, listener: str, redis: PrivateRedisCluster, db: str, url: str
    ) -> None:
        self.tether, self.listener, self.redis, self.db, self.url = tether, listener, redis, db, url

    def _groups(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {"client": [os.getpid()], "api": [], "worker": []}
        for s in self.tether.all:
            if s.proc is None:
                continue
            kind = "listener" if s.name == self.listener else s.name.rstrip("0123456789")
            groups.setdefault(kind, []).append(s.pid)
        pg = scale._procs("postgres")
        groups["pg"] = [p for p in pg if f" {self.db} " in scale._cmdline(p)]
        groups["pg other"] = [p for p in pg if p not in groups["pg"]]
        groups["redis"] = [n.proc.pid for n in self.redis.nodes if n.proc is not None]
        return groups

    def _pg(self) -> dict[str, float]:
        row = _psql(
            self.url,
            "SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0'), "
            "(SELECT coalesce(sum(last_seq + 1), 0) FROM responses) "
            f"FROM pg_stat_database WHERE datname = '{self.db}'",
        )
        return {
            "transactions": float(row[0]),
            "rows": float(row[1]),
            "wal": float(row[2]),
            "appended": float(row[3]),
        }

    def _redis(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.redis.nodes:
            if not node.alive():
                continue
            with node.client() as c:
                for name, stat in c.info("commandstats").items():
                    key = "cmd " + name.removeprefix("cmdstat_").upper()
                    out[key] = out.get(key, 0) + int(stat["calls"])
                stats = c.info("stats")
                out["bytes in"] = out.get("bytes in", 0) + stats["total_net_input_bytes"]
                out["bytes out"] = out.get("bytes out", 0) + stats["total_net_output_bytes"]
        return out

    def snap(self, delivered: int) -> Snapshot:
        cpu = {
            g: sum(c for p in pids if (c := cpu_seconds(p)) == c)  # NaN: the process is gone
            for g, pids in self._groups().items()
        }
        pg = self._pg()
        return Snapshot(
            time.perf_counter(),
            cpu,
            scale._machine_busy(),
            delivered,
            int(pg.pop("appended")),
            pg,
            self._redis(),
        )


@dataclass
class Window:
    """What happened between two snapshots."""

    wall: float
    cpu: dict[str, float]  # CPU seconds per group
    other: float  # CPU seconds of processes outside the benchmark
    delivered: int
    appended: int
    pg: dict[str, float]
    redis: dict[str, float]

    @staticmethod
    def between(a: Snapshot, b: Snapshot) -> Window:
        cpu = {g: max(0.0, b.cpu[g] - a.cpu.get(g, 0.0)) for g in b.cpu}
        return Window(
            b.at - a.at,
            cpu,
            max(0.0, (b.busy - a.busy) - sum(cpu.values())),
            b.delivered - a.delivered,
            b.appended - a.appended,
            {k: b.pg[k] - a.pg.get(k, 0) for k in b.pg},
            {k: b.redis[k] - a.redis.get(k, 0) for k in b.redis},
        )

    @property
    def rate(self) -> float:
        return self.delivered / self.wall

    def cores(self, group: str) -> float:
        return self.cpu.get(group, 0.0) / self.wall
