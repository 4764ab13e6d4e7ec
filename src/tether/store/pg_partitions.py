"""The time partitions of the PostgreSQL event log: created ahead, dropped whole.

`events` is partitioned by RANGE on `created_at`, a copy of its response's creation time
(migration 0006): every event of a response lands in one partition, whenever it is
appended, so
- replay by `(response_id, seq)` is one range scan of one partition's primary key
  (`pg_sql.READ` prunes the others at run time), and
- a partition can go when every response created in its range is past the retention: none
  is live, none finished less than `retention` ago. Then it is detached CONCURRENTLY (a
  lock that blocks neither reads nor writes of `events`; the detach waits for queries
  that still see the partition) and dropped: its space is back at once, with no DELETE,
  no dead rows and no vacuum. (The price: a response's log outlives its retention until
  its whole partition does, at most one partition width plus the longest run; the API
  stops serving it at the retention regardless: docs/contract.md §4.5.)

Partitions are an hour wide (`WIDTH`), or wider for a long retention (`width_for`: about
24 partitions per retention, since every replay opens each partition, pruned or not),
aligned to UTC hours, `AHEAD` of them created ahead of the clock at open and by the
maintenance loop. There is no DEFAULT partition: one would forbid
the concurrent detach, and each new partition would have to scan it. Instead a response
created where no partition exists yet (a clock far ahead) has its partition created on the
spot (`cover`), and the store's create is tried again.

Several processes run this: creating is serialized by a transaction-level advisory lock
(each re-reads the partitions under it), dropping by a session-level one that a process
that finds it taken skips.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import asyncpg

from tether.store.common import LIVE

WIDTH = 3600.0  # seconds of creation time a partition holds (at least)
HOURS = (1, 2, 3, 4, 6, 8, 12, 24, 48, 72, 168)  # the widths `width_for` picks from
AHEAD = 3  # partitions kept ahead of the clock
LEGACY = "events_legacy"  # the table before 0006: rows with created_at = 0
# A process of the previous version writes into `events_legacy` during a rolling upgrade
# (created_at defaults to 0) whatever its response's creation time: the legacy partition
# is treated as holding responses created until its bound plus this.
LEGACY_GRACE = 3600.0
CREATE_LOCK = 0x7E7E_0002  # advisory lock keys: only tether's partition maintenance
DROP_LOCK = 0x7E7E_0003

LIST = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), i.inhdetachpending
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'events'::regclass
"""
BOUND = re.compile(r"FROM \((.+)\) TO \((.+)\)")
# Partitions detached whose drop did not follow (the process stopped in between): only
# `cover` makes tables by this name, and attaches each in the transaction that makes it.
DETACHED = r"""
SELECT relname FROM pg_class
WHERE relname ~ '^events_[0-9]{8}_[0-9]{6}$' AND relkind = 'r' AND NOT relispartition
  AND relnamespace = current_schema()::regnamespace
"""
# Any live response created before $1?
LIVE_BEFORE = f"SELECT EXISTS (SELECT 1 FROM responses WHERE {LIVE} AND created_at < $1)"
# Any response created in [$1, $2) that is live, or finished at or after $3?
IN_USE = """
SELECT EXISTS (SELECT 1 FROM responses WHERE created_at >= $1 AND created_at < $2
               AND (finished_at IS NULL OR finished_at >= $3))
"""


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    lo: float
    hi: float
    detaching: bool = False  # a concurrent detach began and did not finish


def _value(text: str) -> float:
    text = text.strip("'")
    return {"MINVALUE": -math.inf, "MAXVALUE": math.inf}.get(text) or float(text)


async def partitions(con: asyncpg.Connection) -> list[Partition]:
    """The partitions of `events`, by their range."""
    found = []
    for name, bound, detaching in await con.fetch(LIST):
        match = BOUND.search(bound)
        assert match is not None, bound
        found.append(Partition(name, _value(match[1]), _value(match[2]), detaching))
    return sorted(found, key=lambda p: p.lo)


def width_for(retention: float) -> float:
    """The partition width for a retention: the widest that keeps ~24 of them."""
    return 3600.0 * max(h for h in HOURS if h == 1 or h * 3600.0 * 24 <= retention)


def gaps(
    existing: list[Partition], lo: float, hi: float, width: float = WIDTH
) -> list[tuple[float, float]]:
    """The `width`-aligned ranges in [lo, hi) no partition covers, cut where one does."""
    out = []
    start = math.floor(lo / width) * width
    while start < hi:
        pieces = [(start, start + width)]
        for p in existing:
            pieces = [
                piece
                for a, b in pieces
                for piece in ((a, min(b, p.lo)), (max(a, p.hi), b))
                if piece[0] < piece[1]
            ]
        out.extend(pieces)
        start += width
    return out


def name_of(lo: float) -> str:
    return "events_" + time.strftime("%Y%m%d_%H%M%S", time.gmtime(lo))


async def cover(con: asyncpg.Connection, lo: float, hi: float, width: float = WIDTH) -> list[str]:
    """Create the partitions missing in [lo, hi), in one transaction: their names."""
    created = []
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", CREATE_LOCK)
        for a, b in gaps(await partitions(con), lo, hi, width):
            name = name_of(a)
            # Created apart and then attached: ATTACH takes a lock on `events` that
            # blocks neither reads nor writes (CREATE ... PARTITION OF would block both).
            await con.execute(
                f"CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS, "
                "PRIMARY KEY (response_id, first_seq))"
            )
            await con.execute(
                f"ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ({a!r}) TO ({b!r})"
            )
            created.append(name)
    return created


async def ahead(con: asyncpg.Connection, now: float, width: float = WIDTH) -> list[str]:
    """Partitions from the current one to `AHEAD` past it exist, and none is missing
    since the last one (if the loop did not run for a while: up to a day back; a
    response created earlier still gets its partition, from `cover`)."""
    current = math.floor(now / width) * width
    last = max((p.hi for p in await partitions(con)), default=current)
    start = max(min(last, current), current - 24 * width)
    return await cover(con, start, current + (AHEAD + 1) * width, width)


async def expired(con: asyncpg.Connection, now: float, before: float) -> list[Partition]:
    """The partitions every response of which is past the retention (`before`)."""
    out = []
    for p in await partitions(con):
        if p.detaching:
            out.append(p)  # its detach was interrupted: finish it
        elif p.name == LEGACY:
            if await _legacy_expired(con, p.hi + LEGACY_GRACE, now, before):
                out.append(p)
        elif p.hi <= before and not await con.fetchval(IN_USE, p.lo, p.hi, before):
            out.append(p)
    return out


async def _legacy_expired(con: asyncpg.Connection, hi: float, now: float, before: float) -> bool:
    """`events_legacy` holds the responses of every time before the migration, whose rows
    are kept for good when stored: asking `IN_USE` of all of them each minute would read
    them all. Instead: no live response was created before `hi` (the live ones are few, in
    a partial index), so all of them have finished by `now`, a time noted on the table
    (a comment); the partition goes once that time is past the retention."""
    if hi > now or await con.fetchval(LIVE_BEFORE, hi):
        return False  # a live response may still append here
    if not await con.fetchval(f"SELECT EXISTS (SELECT 1 FROM {LEGACY})"):
        return True  # empty (a new database): nothing is retained in it
    done = await con.fetchval("SELECT obj_description($1::regclass, 'pg_class')", LEGACY)
    if done is None:
        await con.execute(f"COMMENT ON TABLE {LEGACY} IS '{now!r}'")
        return False
    return float(done) <= before


async def drop(con: asyncpg.Connection, now: float, before: float) -> list[str]:
    """Detach and drop the expired partitions; their names. `con` must be in no
    transaction (a concurrent detach is two). Another process dropping: nothing."""
    if not await con.fetchval("SELECT pg_try_advisory_lock($1)", DROP_LOCK):
        return []
    dropped = []
    try:
        for p in await expired(con, now, before):
            how = "FINALIZE" if p.detaching else "CONCURRENTLY"
            await con.execute(f"ALTER TABLE events DETACH PARTITION {p.name} {how}")
            await con.execute(f"DROP TABLE {p.name}")
            dropped.append(p.name)
        for (name,) in await con.fetch(DETACHED):
            await con.execute(f"DROP TABLE {name}")
            dropped.append(name)
    finally:
        await con.execute("SELECT pg_advisory_unlock($1)", DROP_LOCK)
    return dropped
