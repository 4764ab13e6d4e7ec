"""What both stores share: the record's columns and its row conversion, event numbering
and the log's packed columns, the pending-append batch, waiters on a log, and the
background tasks a store owns.

Only what is identical in both SQL dialects is here; statements with placeholders stay
with their store (`?` for SQLite, `$n` for PostgreSQL).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Collection, Coroutine, Iterable
from dataclasses import dataclass, field
from sys import intern
from typing import Any, Protocol

import orjson

from tether.store.base import LogEntry, Record, framed
from tether.wire import LIVE_STATES

log = logging.getLogger("tether.store")

# The guard of every statement that may only touch a live response (usable as `r.{LIVE}`).
LIVE = "status IN ({})".format(", ".join(f"'{state}'" for state in LIVE_STATES))

# A record's columns, in the order `to_record` reads them.
SELECT = (
    "SELECT r.id, r.tenant, r.status, b.snapshot, b.run, b.input_items, r.run_token, r.owner, "
    "r.lease_until, r.last_seq, r.input_tokens, r.finished_at "
    "FROM responses r JOIN response_bodies b ON b.id = r.id"
)

# The usage ledger's rows as `base.ledger_row` reads them (`WHERE` goes between the two).
USAGE = (
    "SELECT tenant, key_id, model, status, responses, input_tokens, output_tokens, "
    "reasoning_tokens FROM usage_ledger"
)
USAGE_ORDER = " ORDER BY tenant, key_id, model, status"


class Row(Protocol):
    """A database row: a SQLite tuple or an asyncpg record."""

    def __getitem__(self, index: int, /) -> Any: ...


def to_record(row: Row) -> Record:
    """The `Record` of a row selected with `SELECT`."""
    return Record(
        id=row[0],
        tenant=row[1],
        status=row[2],
        snapshot=orjson.loads(row[3]),
        run=orjson.loads(row[4]),
        input_items=orjson.loads(row[5]),
        run_token=row[6],
        owner=row[7],
        lease_until=row[8],
        last_seq=row[9],
        input_tokens=row[10],
        finished_at=row[11],
    )


@dataclass(slots=True)
class Pending:
    """A run's appends waiting for the next flush (group commit)."""

    run_token: str
    events: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    input_tokens: int | None = None

    def add(self, events: list[dict[str, Any]], tokens: int, input_tokens: int | None) -> None:
        self.events.extend(events)
        self.tokens += tokens
        if input_tokens is not None:
            self.input_tokens = input_tokens


# --- the event log's rows ------------------------------------------------------------------
# A batch of events is one row of `events`: `first_seq`, `last_seq`, its types joined by
# "\n" and its JSON joined by "\n" (JSON never holds a raw newline).


def numbered(first: int, events: list[dict[str, Any]]) -> list[LogEntry]:
    """Number `events` from `first` (the store assigns sequence numbers) and serialize."""
    dumps = orjson.dumps
    out = []
    for seq, event in enumerate(events, first):
        event["sequence_number"] = seq
        out.append(framed(seq, event["type"], dumps(event)))
    return out


def pack(batch: list[LogEntry]) -> tuple[str, bytes]:
    """A batch's `types` and `data` columns."""
    return "\n".join(e.type for e in batch), b"\n".join(e.data for e in batch)


def packed(first: int, events: list[dict[str, Any]]) -> tuple[list[LogEntry], str, bytes]:
    """`numbered`, and `pack` of its entries, in one pass (the data is not sliced back
    out of the frames)."""
    dumps = orjson.dumps
    out, kinds, blobs = [], [], []
    for seq, event in enumerate(events, first):
        event["sequence_number"] = seq
        kind, data = event["type"], dumps(event)
        out.append(framed(seq, kind, data))
        kinds.append(kind)
        blobs.append(data)
    return out, "\n".join(kinds), b"\n".join(blobs)


def unpack(rows: Iterable[tuple[int, str, bytes]], after: int) -> list[LogEntry]:
    """The events (as `pack`ed) with `seq > after` of rows `(first_seq, types, data)`, in order."""
    return [
        LogEntry(seq, intern(kind), data)  # interned: cached entries share it
        for first, types, blob in rows
        for seq, kind, data in zip(
            range(first, first + blob.count(b"\n") + 1),
            types.split("\n"),
            blob.split(b"\n"),
            strict=True,
        )
        if seq > after
    ]


# --- runs that can write no more -----------------------------------------------------------


class Recent(OrderedDict[tuple[str, str], BaseException | None]):
    """(response, run token) pairs that can write no more (fenced out, or lost a write:
    why); the oldest are forgotten. Forgetting is safe: an append of a forgotten pair is
    refused by the database again when its batch is committed."""

    def __init__(self, size: int = 10_000) -> None:
        super().__init__()
        self.size = size

    def add(self, key: tuple[str, str], exc: BaseException | None = None) -> None:
        self[key] = exc
        while len(self) > self.size:
            self.popitem(last=False)


# --- waiting for a log to grow -------------------------------------------------------------


class Waiters:
    """Readers waiting for events past their cursor (`Store.wait`), woken by a commit."""

    def __init__(self) -> None:
        self._by_id: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}

    async def wait(self, response_id: str, after: int, timeout: float) -> None:
        """Return when `wake` says events past `after` were committed, or after `timeout`."""
        loop = asyncio.get_running_loop()
        entry = (after, loop.create_future())
        self._by_id.setdefault(response_id, []).append(entry)
        # A timer on the future itself, not `asyncio.wait_for` (a second future and a
        # callback more, for each wait of each reader, i.e. for every commit it sees).
        timer = loop.call_later(timeout, _release, entry[1])
        try:
            await entry[1]
        finally:
            timer.cancel()
            waiters = self._by_id.get(response_id)
            if waiters is not None and entry in waiters:
                waiters.remove(entry)
                if not waiters:
                    del self._by_id[response_id]

    def waiting(self, response_id: str) -> int:
        """How many readers wait on `response_id` now."""
        return len(self._by_id.get(response_id, ()))

    def wake(self, response_id: str, last: int | None = None) -> None:
        """Wake the waiters of `response_id` whose cursor is before `last` (all: None)."""
        for after, waiter in self._by_id.get(response_id, ()):
            if (last is None or after < last) and not waiter.done():
                waiter.set_result(None)

    def wake_all(self) -> None:
        for response_id in list(self._by_id):
            self.wake(response_id)


def _release(waiter: asyncio.Future[None]) -> None:
    """A wait's timeout: the waiter returns as if woken."""
    if not waiter.done():
        waiter.set_result(None)


# --- background tasks ----------------------------------------------------------------------
# A store's background tasks are started by its `open` and stopped by its `close`. Not an
# anyio task group: `open` and `close` may run in different tasks (a server's start and
# its shutdown, a test), and a task group must be left by the task that entered it.


def start(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Run `coro` as a background task the caller keeps and passes to `stop`. An
    exception that ends it is logged when it happens, not when (or if) it is collected."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(_report)
    return task


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s failed: %r", task.get_name(), exc, exc_info=exc)


async def stop(tasks: Collection[asyncio.Task[None]], grace: float) -> None:
    """Cancel `tasks` and wait until they end, for at most `grace` seconds: closing must
    not hang on a task whose library swallowed the cancel (each loop also checks a
    closing flag, so it ends soon after). One still running then is logged."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, running = await asyncio.wait(tasks, timeout=grace)
    for task in running:
        log.error("%s did not stop within %.1f s of its cancel", task.get_name(), grace)
