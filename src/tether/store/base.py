"""The `Store` protocol: the few operations that must be atomic, and nothing more.

Two of them decide every race (docs/contract.md §1.1, §2.3):
- `append` adds events unless the response is terminal or the caller's run token is stale;
- `finish` sets a terminal state and appends the closing events, only if the response is
  not terminal yet (and, for a run, only if its token is current).
The store assigns `sequence_number`s, and readers only ever see committed events.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

from tether.store.owners import OwnerLocks


class LogEntry:
    """One logged event, as readers need it: its SSE frame (docs/contract.md §4.1), built
    once when the event is logged and shared by every reader of the log.

    Only the frame is kept: the event's JSON is a slice of it (`data`, for the few readers
    that want JSON). A cached event costs its frame plus ~100 bytes; keeping `orjson.dumps`
    output instead would cost ~1 KiB more, since orjson returns its bytes in a buffer of
    at least 1 KiB whatever the length."""

    __slots__ = ("frame", "seq", "type")

    def __init__(self, seq: int, type: str, data: bytes) -> None:
        self.seq = seq
        self.type = type
        prefix = _PREFIXES.get(type)
        if prefix is None:
            prefix = _PREFIXES[type] = b"event: " + type.encode() + b"\ndata: "
        self.frame = b"".join((prefix, data, b"\n\n"))  # a new bytes, exactly its size

    @property
    def data(self) -> bytes:
        """The event's JSON, `sequence_number` included."""
        return self.frame[len(self.type) + 14 : -2]  # after `event: TYPE\ndata: `


_PREFIXES: dict[str, bytes] = {}  # `event: TYPE\ndata: ` by type: a few dozen types


@dataclass(slots=True)
class Record:
    """A stored response: its current snapshot plus what the lifecycle needs to run it."""

    id: str
    tenant: str
    status: str
    snapshot: dict[str, Any]  # the Response object as of the last state change
    run: dict[str, Any]  # what the engine needs: messages, budget, sampling
    input_items: list[dict[str, Any]]
    run_token: str | None
    owner: str | None
    lease_until: float
    last_seq: int
    input_tokens: int
    finished_at: float | None
    key_id: str | None = None  # the API key that created it (the usage ledger's key)


def ledger_values(snapshot: dict[str, Any]) -> tuple[str, int, int]:
    """What a terminal response adds to the usage ledger: model, input and output tokens
    (as its final snapshot reports them, which is what its client was told)."""
    usage = snapshot.get("usage") or {}
    return (str(snapshot.get("model", "")), int(usage.get("input_tokens", 0)),
            int(usage.get("output_tokens", 0)))


def ledger_row(row: Any) -> dict[str, Any]:
    """A usage-ledger row (tenant, key_id, model, status, responses, input, output)."""
    return {"tenant": row[0], "key_id": row[1] or None, "model": row[2], "status": row[3],
            "responses": int(row[4]), "input_tokens": int(row[5]),
            "output_tokens": int(row[6])}


LEDGER_UPSERT = (
    "ON CONFLICT (tenant, key_id, model, status) DO UPDATE SET "
    "responses = usage_ledger.responses + 1, "
    "input_tokens = usage_ledger.input_tokens + excluded.input_tokens, "
    "output_tokens = usage_ledger.output_tokens + excluded.output_tokens"
)


class IdempotencyConflict(Exception):
    """The key was used before with a different body (409)."""


class StoreUnavailable(Exception):
    """The store's database or cache cannot be reached now (503; the request can be
    retried). Raised instead of hanging: every call gives up within a few seconds."""


class StoreFull(StoreUnavailable):
    """The store cannot write now: its disk is full (507 with `Retry-After`). Reads
    still work; writes work again once space comes back."""


class WriteLost(Exception):
    """Events a run appended could not be made durable (docs/contract.md §8.7). The run
    must neither go on nor end from its own memory: its response ends `failed` from what
    the log holds. Not a `StoreUnavailable`: retrying the run's own call cannot help."""


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(
        self,
        record: Record,
        events: list[dict[str, Any]],
        idempotency: tuple[str, str] | None = None,
    ) -> tuple[Record, bool]:
        """Insert a response with its first events. With `(key, body_hash)`, a second
        create with the same key returns the first record and False, or raises
        `IdempotencyConflict` when the body differs."""
        ...

    async def get(self, response_id: str, tenant: str) -> Record | None: ...

    async def claim(
        self,
        response_id: str,
        run_token: str,
        owner: str,
        lease_until: float,
        snapshot: dict[str, Any],
        events: list[dict[str, Any]],
    ) -> bool:
        """Start a run: set `in_progress` and the run token, if live and unclaimed."""
        ...

    async def append(
        self,
        response_id: str,
        run_token: str,
        events: list[dict[str, Any]],
        tokens: int = 0,
        input_tokens: int | None = None,
    ) -> bool:
        """Append a run's events (carrying `tokens` output tokens). False: fenced out.
        May return before the events are durable; `finish` and readers see them in order.
        Raises `WriteLost` once an earlier append of this run could not be written."""
        ...

    async def fence(self, response_id: str, run_token: str) -> bool:
        """Give a live response a new run token, so its current run can write no more."""
        ...

    async def finish(
        self,
        response_id: str,
        run_token: str | None,
        status: str,
        snapshot: dict[str, Any],
        events: list[dict[str, Any]],
        tokens: int = 0,
    ) -> bool:
        """The one terminal transition: True if this call won it. `run_token=None`
        ends the response whoever runs it (fencing the run out). Raises `WriteLost` for
        a run some of whose appends were not written."""
        ...

    async def read(self, response_id: str, after: int, upto: int | None = None) -> list[LogEntry]:
        """Committed events with `seq > after`, in order. A store that serves live logs
        from a cache may return fewer while the cache lags; with `upto` (a `last_seq`
        read from the record) it returns at least the events up to `upto`."""
        ...

    async def wait(self, response_id: str, after: int, timeout: float) -> None:
        """Return when events past `after` are committed, or after `timeout`."""
        ...

    async def output_tokens(self, response_id: str) -> int:
        """Output tokens that reached the log."""
        ...

    async def delete(self, response_id: str, tenant: str) -> bool: ...

    async def usage(self, tenant: str | None) -> list[dict[str, Any]]:
        """The usage ledger: one row per (tenant, key_id, model, status) of terminal
        responses, with `responses`, `input_tokens` and `output_tokens`; `key_id` is None
        for responses made without a key. `tenant=None`: every tenant's rows."""
        ...

    async def renew(self, owner: str, lease_until: float, held: Collection[str]) -> None:
        """Extend the leases of the live responses among `held` (what `owner` is running
        or keeps queued) that `owner` holds. A response `owner` holds but no longer
        runs (its run ended without its terminal transition) is left to expire."""
        ...

    async def expired(self, now: float, gone: Collection[str] = ()) -> list[Record]:
        """Live responses whose lease ran out, or whose owner is among `gone` (owners
        proven gone: `owner_locks`)."""
        ...

    async def adopt(self, response_id: str, old_owner: str | None, owner: str | None,
                    lease_until: float, old_owner_gone: bool = False) -> bool:
        """Take over an expired, never-started response (to run it again): set its
        owner and lease if it is still `queued`, unclaimed, owned by `old_owner` and
        expired (or `old_owner_gone`: proven gone, its lease need not have run out).
        `owner=None`: nobody renews it (scaled out, where any worker may run it)."""
        ...

    def owner_locks(self) -> OwnerLocks | None:
        """Where a gone owner can be proven gone by the lock it held (the embedded
        store: every process on one machine, `tether.store.owners`); None where only
        the lease clock can tell (scaled out)."""
        ...

    async def purge(self, before: float) -> int:
        """Drop logs of responses finished before `before`, and unstored responses."""
        ...
