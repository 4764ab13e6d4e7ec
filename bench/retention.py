"""Retention on PostgreSQL: dropping a time partition of the event log, under load.

A fresh database at the newest revision (`events` partitioned by creation time,
`pg_partitions.py`). One partition two days old is filled with `--events` events (one
event a row, the costliest shape: a row per flush) of responses that all finished then;
the current partition holds `--recent` finished responses of `--per-log` events. Then
`--readers` connections replay the current responses' logs (the store's own statement,
`pg_sql.READ`) and `--writers` append rows to the current partition, while the store's
retention (`pg_partitions.drop`: DETACH ... CONCURRENTLY, then DROP TABLE) removes the
old partition. Printed: how long the drop took, and the readers' and writers' latency in
the seconds before the drop, during it, and after.

`--delete` also runs the retention this replaced, on a second partition filled the same:
`DELETE FROM events WHERE response_id IN (responses finished before the retention)`.
`--hold S` also drops while another transaction that read `events` stays open S seconds:
the store's concurrent detach waits for it without blocking anyone, where a plain
`DROP TABLE` of the partition (a lock on all of `events`) queues every reader behind it.

    PYTHONPATH=src python bench/retention.py [--events 1000000] [--readers 8] [--delete] [--hold 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from _report import Chart, Transcript, progress, save
from _server import machine, percentile, table
from tether.store import pg_partitions, pg_sql

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
DAY = 86400.0
EVENT = (
    '{"type":"response.output_text.delta","sequence_number":'
    '\' || s || \',"item_id":"msg_0123456789abcdef","output_index":0,'
    '"content_index":0,"delta":" token","logprobs":[]}'
)


async def fill(con: asyncpg.Connection, prefix: str, at: float, events: int, per: int) -> None:
    """`events` events of `events // per` responses created (and finished) at `at`."""
    count = events // per
    await con.execute(
        "INSERT INTO responses (id, tenant, status, lease_until, last_seq, stored, created_at, "
        "finished_at) SELECT $1::text || g, 't', 'completed', 0, $2::int - 1, true, "
        "$3::float8 + g * 0.001, $3::float8 + g * 0.001 + 5 FROM generate_series(0, $4::int - 1) g",
        prefix,
        per,
        at,
        count,
    )
    await con.execute(
        "INSERT INTO events (response_id, first_seq, last_seq, types, tokens, data, created_at) "
        "SELECT $1::text || (g / $2::int), s, s, 'response.output_text.delta', 1, "
        f"convert_to('{EVENT}', 'UTF8'), $3::float8 + (g / $2::int) * 0.001 "
        "FROM generate_series(0, $4::int - 1) g, LATERAL (SELECT (g % $2::int)::int AS s) x",
        prefix,
        per,
        at,
        count * per,
    )


class Load:
    """Readers and writers, each latency stamped with when it ended."""

    def __init__(self, url: str, recent: list[str], per: int) -> None:
        self.url, self.recent, self.per = url, recent, per
        self.reads: list[tuple[float, float]] = []
        self.writes: list[tuple[float, float]] = []
        self.stop = asyncio.Event()

    async def _loop(
        self,
        step: Callable[[asyncpg.Connection], Coroutine[Any, Any, None]],
        into: list[tuple[float, float]],
    ) -> None:
        con = await asyncpg.connect(self.url)
        try:
            while not self.stop.is_set():
                began = time.perf_counter()
                await step(con)
                ended = time.perf_counter()
                into.append((ended, ended - began))
        finally:
            await con.close()

    async def read(self, con: asyncpg.Connection) -> None:
        rows = await con.fetch(pg_sql.READ, random.choice(self.recent), -1)
        assert len(rows) == self.per

    async def write(self, con: asyncpg.Connection) -> None:
        rid = f"live_{uuid.uuid4().hex[:8]}"
        await con.execute(
            "INSERT INTO events (response_id, first_seq, last_seq, types, tokens, data, "
            "created_at) VALUES ($1, 0, 0, 'response.output_text.delta', 1, $2, $3)",
            rid,
            b'{"type":"response.output_text.delta"}',
            time.time(),
        )

    def tasks(self, tg: asyncio.TaskGroup, readers: int, writers: int) -> None:
        for _ in range(readers):
            tg.create_task(self._loop(self.read, self.reads))
        for _ in range(writers):
            tg.create_task(self._loop(self.write, self.writes))


def rows_for(
    name: str, samples: list[tuple[float, float]], spans: dict[str, tuple[float, float]]
) -> list[list[object]]:
    out: list[list[object]] = []
    for phase, (lo, hi) in spans.items():
        # A call that was in flight at any time in the span counts for it.
        lats = [lat for end, lat in samples if end >= lo and end - lat < hi]
        ms = [x * 1000 for x in lats]
        out.append(
            [
                name,
                phase,
                len(ms),
                percentile(ms, 50),
                percentile(ms, 99),
                max(ms, default=float("nan")),
            ]
        )
    return out


async def measure(
    url: str,
    args: argparse.Namespace,
    recent: list[str],
    remove: Callable[[asyncpg.Connection], Coroutine[Any, Any, object]],
) -> tuple[float, list[list[object]]]:
    load = Load(url, recent, args.per_log)
    async with asyncio.TaskGroup() as tg:
        load.tasks(tg, args.readers, args.writers)
        await asyncio.sleep(args.settle)  # connections made, plans cached
        load.reads.clear()
        load.writes.clear()
        t0 = time.perf_counter()
        await asyncio.sleep(args.window)
        con = await asyncpg.connect(url)
        try:
            began = time.perf_counter()
            await remove(con)
            ended = time.perf_counter()
        finally:
            await con.close()
        await asyncio.sleep(args.window)
        load.stop.set()
    spans = {"before": (t0, began), "during": (began, ended), "after": (ended, ended + args.window)}
    return ended - began, rows_for("read", load.reads, spans) + rows_for(
        "append", load.writes, spans
    )


def holding(
    url: str, seconds: float, remove: Callable[[asyncpg.Connection], Coroutine[Any, Any, object]]
) -> Callable[[asyncpg.Connection], Coroutine[Any, Any, object]]:
    """`remove`, begun while another connection holds a transaction that read `events`
    (a long report, a slow client) and keeps it open `seconds`."""

    async def hold(ready: asyncio.Event) -> None:
        con = await asyncpg.connect(url)
        try:
            async with con.transaction():
                await con.fetchval("SELECT count(*) FROM events WHERE response_id = 'nobody'")
                ready.set()
                await asyncio.sleep(seconds)
        finally:
            await con.close()

    async def run(c: asyncpg.Connection) -> object:
        ready = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(hold(ready))
            await ready.wait()
            done = await remove(c)
        return done

    return run


Removal = tuple[str, float, list[list[object]]]  # what, seconds, latency rows


def charts(removals: list[Removal]) -> list[Chart]:
    """Readers' and writers' p99 / max by phase for each removal, and how long each took."""
    out = []
    for what, _, rows in removals[:2]:
        phases = list(dict.fromkeys(str(r[1]) for r in rows))
        series: dict[str, list[float]] = {}
        for op in ("read", "append"):
            for stat, col in (("p99", 4), ("max", 5)):
                by = {r[1]: r[col] for r in rows if r[0] == op}
                series[f"{op} {stat}"] = [float(by[p]) for p in phases]  # type: ignore[arg-type]
        out.append(Chart(f"latency around the {what} (ms)", "ms", phases, series))
    took = [t * 1000 for _, t, _ in removals]
    wide = min(took) > 0 and max(took) / min(took) > 20  # a log axis only for a wide spread
    out.append(
        Chart("removal took (ms)", "ms", [what for what, _, _ in removals], {"ms": took}, log=wide)
    )
    return out


def stages(args: argparse.Namespace) -> int:
    """Fills and measured removals of a run, for the progress bar."""
    return 3 + 2 * bool(args.delete) + 4 * bool(args.hold)


async def main(args: argparse.Namespace) -> list[Removal]:
    removals: list[Removal] = []
    bar = progress(total=stages(args), desc="fill / measure", unit="stage")
    name = f"tether_retention_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.admin)
    await admin.execute(f"CREATE DATABASE {name}")
    url = args.admin.rpartition("/")[0] + "/" + name
    print(machine())
    try:
        con = await asyncpg.connect(url)
        await pg_sql.migrate(con)
        now = time.time()
        await pg_partitions.ahead(con, now)
        # A new database's empty `events_legacy` covers all past times: gone, as it
        # goes after the rolling upgrade's grace.
        assert await pg_partitions.drop(con, now + 2 * pg_partitions.WIDTH, 0) == ["events_legacy"]
        old = now - 2 * DAY
        await pg_partitions.cover(con, old, old + 1)
        began = time.perf_counter()
        bar.set_postfix_str("fill the old partition")
        await fill(con, "resp_old_", old, args.events, args.per_old)
        bar.update(1)
        filled = time.perf_counter() - began
        bar.set_postfix_str("fill the current one")
        await fill(con, "resp_recent_", now, args.recent * args.per_log, args.per_log)
        await con.execute("VACUUM ANALYZE")
        bar.update(1)
        part = pg_partitions.name_of(pg_partitions.WIDTH * (old // pg_partitions.WIDTH))
        size = await con.fetchval(f"SELECT pg_total_relation_size('{part}')")
        rows = await con.fetchval(f"SELECT count(*) FROM {part}")
        print(
            f"filled {part}: {rows} events in {filled:.1f} s, {size / 2**20:.0f} MiB with its index"
        )
        recent = [f"resp_recent_{i}" for i in range(args.recent)]

        t = time.time()
        began = time.perf_counter()
        assert [p.name for p in await pg_partitions.expired(con, t, t - DAY)] == [part]
        print(
            f"finding it past the retention (read-only, in the drop): "
            f"{(time.perf_counter() - began) * 1000:.1f} ms"
        )

        async def drop(c: asyncpg.Connection) -> object:
            t = time.time()
            dropped = await pg_partitions.drop(c, t, t - DAY)
            assert dropped == [part], dropped
            return dropped

        bar.set_postfix_str("drop, under load")
        took, table_rows = await measure(url, args, recent, drop)
        bar.update(1)
        removals.append(("partition drop", took, table_rows))
        assert not await con.fetchval("SELECT to_regclass($1) IS NOT NULL", part)
        print(
            f"\nDROP of a partition of {rows} events: {took * 1000:.1f} ms "
            f"(DETACH CONCURRENTLY + DROP TABLE)\n"
        )
        print(table(["op", "phase", "n", "p50 ms", "p99 ms", "max ms"], table_rows))

        if args.delete:
            await pg_partitions.cover(con, old, old + 1)
            bar.set_postfix_str("fill for the DELETE")
            await fill(con, "resp_older_", old, args.events, args.per_old)
            await con.execute("VACUUM ANALYZE")
            bar.update(1)

            async def delete(c: asyncpg.Connection) -> object:
                return await c.execute(
                    "DELETE FROM events WHERE response_id IN "
                    "(SELECT id FROM responses WHERE finished_at < $1)",
                    time.time() - DAY,
                )

            bar.set_postfix_str("DELETE, under load")
            took, table_rows = await measure(url, args, recent, delete)
            bar.update(1)
            removals.append(("DELETE", took, table_rows))
            print(
                f"\nDELETE of the same {rows} events (the retention before): {took * 1000:.1f} ms\n"
            )
            print(table(["op", "phase", "n", "p50 ms", "p99 ms", "max ms"], table_rows))
        if args.hold:
            for how in ("concurrent", "plain"):
                await pg_partitions.cover(con, old, old + 1)
                bar.set_postfix_str(f"fill for the {how} drop")
                await fill(con, f"resp_{how}_", old, args.events, args.per_old)
                await con.execute("VACUUM ANALYZE")
                bar.update(1)

                async def removal(c: asyncpg.Connection, how: str = how) -> object:
                    if how == "plain":  # what dropping a partition takes without a detach
                        return await c.execute(f"DROP TABLE {part}")
                    t = time.time()
                    return await pg_partitions.drop(c, t, t - DAY)

                bar.set_postfix_str(f"{how} drop, a reader holding")
                took, table_rows = await measure(
                    url, args, recent, holding(url, args.hold, removal)
                )
                bar.update(1)
                removals.append((f"{how} drop, held", took, table_rows))
                what = {
                    "concurrent": "DETACH CONCURRENTLY + DROP TABLE (the store's)",
                    "plain": "a plain DROP TABLE of the partition",
                }[how]
                print(
                    f"\n{what}, while a transaction that read `events` stays open "
                    f"{args.hold:.0f} s: {took * 1000:.1f} ms\n"
                )
                print(table(["op", "phase", "n", "p50 ms", "p99 ms", "max ms"], table_rows))
        await con.close()
    finally:
        bar.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    return removals


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--admin", default=ADMIN, help="a PostgreSQL URL that may create databases")
    parser.add_argument(
        "--events", type=int, default=1_000_000, help="events in the dropped partition"
    )
    parser.add_argument("--per-old", type=int, default=100, help="events per old response")
    parser.add_argument(
        "--recent", type=int, default=2000, help="current responses the readers replay"
    )
    parser.add_argument("--per-log", type=int, default=50, help="events per current response")
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument(
        "--window", type=float, default=3.0, help="seconds measured before and after"
    )
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument(
        "--hold",
        type=float,
        default=0,
        help="also drop while a transaction that read events stays open this long "
        "(the store's detach, then a plain DROP TABLE)",
    )
    parser.add_argument("--delete", action="store_true", help="also measure the DELETE it replaced")
    with Transcript() as printed:
        removals = asyncio.run(main(parser.parse_args()))
    save("retention", printed.text, *charts(removals))
