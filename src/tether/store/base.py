"""The store's interface: what it keeps (`Record`, `LogEntry`), what it raises, and its
protocols, split by what their callers need (`Transitions`, `EventLog`, `Leases`,
`Maintenance`, `Conversations`; `Store` is all of them). Implementations: `sqlite.py`,
`postgres.py`; what they share: `common.py` (conversations: `conversations.py`).

Two operations decide every race (docs/contract.md §1.1, §2.3):
- `append` adds events unless the response is terminal or the caller's run token is stale;
- `finish` sets a terminal state and appends the closing events, only if the response is
  not terminal yet (and, for a run, only if its token is current).
The store assigns `sequence_number`s, and readers only ever see committed events.

Errors: each method says what its caller sees while the database is out or full
(`StoreUnavailable`, `StoreFull`, `WriteLost`, ...). Anything else is a bug, raised as is.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

from tether.store.hooks import Webhooks
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


def framed(seq: int, type: str, data: bytes) -> LogEntry:
    """`LogEntry(seq, type, data)` without a call of `__init__` (the per-event path of
    an append)."""
    entry = _new_entry(LogEntry)
    entry.seq = seq
    entry.type = type
    prefix = _PREFIXES.get(type)
    if prefix is None:
        prefix = _PREFIXES[type] = b"event: " + type.encode() + b"\ndata: "
    entry.frame = b"".join((prefix, data, b"\n\n"))
    return entry


_new_entry = object.__new__


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


def ledger_values(snapshot: dict[str, Any]) -> tuple[str, int, int, int]:
    """What a terminal response adds to the usage ledger: model, input, output and
    reasoning tokens (as its final snapshot reports them, which is what its client was
    told; reasoning tokens are a part of the output tokens)."""
    usage = snapshot.get("usage") or {}
    details = usage.get("output_tokens_details") or {}
    return (
        str(snapshot.get("model", "")),
        int(usage.get("input_tokens", 0)),
        int(usage.get("output_tokens", 0)),
        int(details.get("reasoning_tokens", 0)),
    )


def ledger_row(row: Any) -> dict[str, Any]:
    """A usage-ledger row (tenant, key_id, model, status, responses, input, output,
    reasoning), as `common.USAGE` selects it."""
    return {
        "tenant": row[0],
        "key_id": row[1] or None,
        "model": row[2],
        "status": row[3],
        "responses": int(row[4]),
        "input_tokens": int(row[5]),
        "output_tokens": int(row[6]),
        "reasoning_tokens": int(row[7]),
    }


LEDGER_UPSERT = (
    "ON CONFLICT (tenant, key_id, model, status) DO UPDATE SET "
    "responses = usage_ledger.responses + 1, "
    "input_tokens = usage_ledger.input_tokens + excluded.input_tokens, "
    "output_tokens = usage_ledger.output_tokens + excluded.output_tokens, "
    "reasoning_tokens = usage_ledger.reasoning_tokens + excluded.reasoning_tokens"
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


# --- the protocols ---------------------------------------------------------------------
# Grouped by what their callers need: the run and the request handlers change states
# (`Transitions`; a run needs only `append`), readers follow logs (`EventLog`), the lease
# reaper takes over the responses of processes gone (`Leases`), operators and the reaper
# keep the database (`Maintenance`), conversations keep their items (`Conversations`), and
# the server opens and closes it (`Lifespan`).
# `Store` is all of them (`make_store` checks both implementations against it).


class Lifespan(Protocol):
    """Opening and closing a store."""

    async def open(self) -> None:
        """Migrate the schema and connect; start the store's background work.

        :raises StoreUnavailable: PostgreSQL cannot be reached (a Redis that cannot is
            no error: readers use PostgreSQL until it is back). The embedded store
            raises SQLite's own error for a file it cannot open or migrate."""
        ...

    async def close(self) -> None:
        """Commit the appends still pending, stop the background work and disconnect. A
        batch that cannot be written by then is given up: its responses, still live, end
        from the log later (lease reaper, next start). May be called from another task
        than `open`. Raises nothing for an outage."""
        ...


class Transitions(Protocol):
    """A response's state changes and its run's appends; each change is one atomic
    compare-and-set, and the store numbers the events it adds."""

    async def create(
        self,
        record: Record,
        events: list[dict[str, Any]],
        idempotency: tuple[str, str] | None = None,
        turn: tuple[str, int] | None = None,
    ) -> tuple[Record, bool]:
        """Insert a response with its first events; True with it. With `(key,
        body_hash)`, a second create with the same key returns the first record and
        False instead. With `turn` (a conversation of the record's tenant and the version
        its items were read at: `Conversations.conversation_state`), the response becomes
        that conversation's turn in progress, in the same commit.

        :raises IdempotencyConflict: the key was used before with a different body.
        :raises ConversationLocked: (`turn`) another turn of it is in progress.
        :raises ConversationChanged: (`turn`) its items changed since that version, or it
            is gone (nothing was written: read them again).
        :raises StoreFull: the embedded store's disk is full (nothing was written).
        :raises StoreUnavailable: the database cannot be written now."""
        ...

    async def get(self, response_id: str, tenant: str) -> Record | None:
        """The response as last committed; None if unknown (or another tenant's).

        :raises StoreUnavailable: PostgreSQL cannot be reached. (The embedded store's
            reads still work on a full disk.)"""
        ...

    async def claim(
        self,
        response_id: str,
        run_token: str,
        owner: str,
        lease_until: float,
        snapshot: dict[str, Any],
        events: list[dict[str, Any]],
    ) -> bool:
        """Start a run: set `in_progress`, the run token, `owner` and its lease, and
        append `events`, if the response is live and unclaimed. False: it was not.

        :raises StoreFull: the embedded store's disk is full (nothing was written).
        :raises StoreUnavailable: the database cannot be written now."""
        ...

    async def append(
        self,
        response_id: str,
        run_token: str,
        events: list[dict[str, Any]],
        tokens: int = 0,
        input_tokens: int | None = None,
    ) -> bool:
        """Append a run's events (carrying `tokens` output tokens; `input_tokens`, when
        given, replaces the prompt's count). False: fenced out (the response ended, or
        another run holds it); the events then never reach the log.

        Group-committed: may return before the events are durable; `finish`, `fence`
        and readers see them in order, and readers only once committed. A write that
        then fails is not lost silently: the run's next `append` or `finish` raises.

        Cancel-atomic: a cancellation while it waits (back-pressure, an earlier run's
        batch) means the events were not appended; once it returns True they were.

        :raises WriteLost: (embedded store) an earlier append of this run could not be
            written; the run must stop, its response ends from the log.
        :raises StoreUnavailable: (PostgreSQL) an earlier append of this run could not
            be written within the outage it rode out, likewise; an earlier run's pending
            appends to this response could not be flushed within `OP_TIMEOUT`; or the
            store is closed. Never `StoreFull`: the write itself comes later."""
        ...

    async def fence(self, response_id: str, run_token: str) -> bool:
        """Give a live response a new run token, so its current run can write no more
        (this process's pending appends are committed first). False: not live.

        :raises StoreFull: the embedded store's disk is full.
        :raises StoreUnavailable: the database cannot be written now."""
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
        """The one terminal transition: set `status` and `snapshot`, append the closing
        `events`, count the response in the usage ledger and, for a turn of a
        conversation (`snapshot["conversation"]`), add its input and output items to that
        conversation (`Conversations`), in one commit, after the run's pending appends.
        True if this call won it; False if the response was
        already terminal, or `run_token` is not its current token. `run_token=None`: a
        response no run has claimed (to end one a run holds, `fence` it first and pass
        the new token: its run can then write no more).

        :raises WriteLost: (embedded store) some of this run's appends were not written:
            it must not end as if they had been; whoever ends it next (cancel, lease
            reaper) ends it from the log.
        :raises StoreFull: the embedded store's disk is full (nothing was written).
        :raises StoreUnavailable: the database cannot be written now; for PostgreSQL
            also: some of this run's appends were not written (as `WriteLost`)."""
        ...

    async def delete(self, response_id: str, tenant: str) -> bool:
        """Delete a response, its log and its idempotency keys (its usage stays in the
        ledger). False: unknown, or another tenant's.

        :raises StoreFull: the embedded store's disk is full.
        :raises StoreUnavailable: the database cannot be written now."""
        ...


class EventLog(Protocol):
    """The committed event logs, as readers follow them (SSE, WebSocket, cancel)."""

    async def read(self, response_id: str, after: int, upto: int | None = None) -> list[LogEntry]:
        """Committed events with `seq > after`, in order. A store that serves live logs
        from a cache may return fewer while the cache lags; with `upto` (a `last_seq`
        read from the record) it returns at least the events up to `upto`.

        :raises StoreUnavailable: PostgreSQL cannot be reached and neither the cache nor
            Redis holds the events."""
        ...

    async def wait(self, response_id: str, after: int, timeout: float) -> None:
        """Return when events past `after` are committed, or after `timeout` (sooner
        while the scaled-out store cannot trust its wake-ups: then it polls). Raises
        nothing for an outage: a reader then finds nothing new, and waits again."""
        ...

    async def output_tokens(self, response_id: str) -> int:
        """Output tokens that reached the log (this process's pending appends are
        committed first).

        :raises StoreUnavailable: (PostgreSQL) it cannot be reached, or the pending
            appends are not committed within `OP_TIMEOUT`."""
        ...


class Leases(Protocol):
    """Who runs what: leases renewed by their owner, and taken over once it is gone."""

    async def renew(self, owner: str, lease_until: float, held: Collection[str]) -> None:
        """Extend the leases of the live responses among `held` (what `owner` is running
        or keeps queued) that `owner` holds. A response `owner` holds but no longer
        runs (its run ended without its terminal transition) is left to expire.

        :raises StoreFull: the embedded store's disk is full.
        :raises StoreUnavailable: the database cannot be written now."""
        ...

    async def expired(self, now: float, gone: Collection[str] = ()) -> list[Record]:
        """Live responses whose lease ran out, or whose owner is among `gone` (owners
        proven gone: `owner_locks`).

        :raises StoreUnavailable: PostgreSQL cannot be reached."""
        ...

    async def adopt(
        self,
        response_id: str,
        old_owner: str | None,
        owner: str | None,
        lease_until: float,
        old_owner_gone: bool = False,
    ) -> bool:
        """Take over an expired, never-started response (to run it again): set its
        owner and lease if it is still `queued`, unclaimed, owned by `old_owner` and
        expired (or `old_owner_gone`: proven gone, its lease need not have run out).
        `owner=None`: nobody renews it (scaled out, where any worker may run it).
        False: another process adopted or claimed it first.

        :raises StoreFull: the embedded store's disk is full.
        :raises StoreUnavailable: the database cannot be written now."""
        ...

    def owner_locks(self) -> OwnerLocks | None:
        """Where a gone owner can be proven gone by the lock it held (the embedded
        store: every process on one machine, `tether.store.owners`); None where only
        the lease clock can tell (scaled out). Does no I/O."""
        ...


class Maintenance(Protocol):
    """What outlives responses: the usage ledger (kept for good) and the logs (purged)."""

    async def usage(self, tenant: str | None) -> list[dict[str, Any]]:
        """The usage ledger: one row per (tenant, key_id, model, status) of terminal
        responses, with `responses`, `input_tokens` and `output_tokens`; `key_id` is None
        for responses made without a key. `tenant=None`: every tenant's rows.

        :raises StoreUnavailable: PostgreSQL cannot be reached."""
        ...

    async def purge(self, before: float) -> int:
        """Drop the logs of responses finished before `before` (at once, or on PostgreSQL
        with the time partition holding them, once all of it is that old), and those
        responses entirely if they were not stored (`store: false`): how many of those went.

        :raises StoreFull: the embedded store's disk is full.
        :raises StoreUnavailable: the database cannot be written now."""
        ...


class UnknownItem(LookupError):
    """A conversation item named as a cursor (`after`) is not in the conversation."""


class ConversationLocked(Exception):
    """A turn of the conversation is in progress (OpenAI's 400 `conversation_locked`)."""


class ConversationChanged(Exception):
    """The conversation's items are not those of the version a turn was read at."""


@dataclass(slots=True)
class ConversationState:
    """A conversation's items, its version (moved by every change of its items), and its
    turn in progress (a response id) if any."""

    items: list[dict[str, Any]]
    version: int
    turn: str | None


class Conversations(Protocol):
    """Conversations (issue 18): durable threads of items, scoped to a tenant like
    responses (another tenant's id is unknown). A conversation is `{"id", "object",
    "created_at", "metadata"}`; its items are kept in the order they were added.

    The items of a *turn* (a response whose snapshot names a conversation) are not added
    here: `finish` adds them, in the commit of the response's terminal transition, so
    exactly once (`store.conversations.turn_items`: a `failed` turn adds none), and
    ends the turn. One turn at a time: `create` with `turn` refuses a second
    (`ConversationLocked`), and so do `conversation_add` and `conversation_remove`
    while one is in progress: a turn's output always follows the items it was given.

    Every method raises `StoreUnavailable` (and, for writes, the embedded store's
    `StoreFull`) as `Transitions` does."""

    async def conversation_create(
        self, conversation: dict[str, Any], tenant: str, items: list[dict[str, Any]]
    ) -> None:
        """Insert a new conversation with its first `items` (each with its `id`)."""
        ...

    async def conversation_get(self, conversation_id: str, tenant: str) -> dict[str, Any] | None:
        """The conversation object; None if unknown (or another tenant's)."""
        ...

    async def conversation_update(
        self, conversation_id: str, tenant: str, metadata: dict[str, str]
    ) -> dict[str, Any] | None:
        """Replace its metadata; the conversation as updated, or None if unknown."""
        ...

    async def conversation_delete(self, conversation_id: str, tenant: str) -> bool:
        """Delete a conversation and its items. False: unknown. A turn still running on
        it then adds nothing when it ends."""
        ...

    async def conversation_add(
        self, conversation_id: str, tenant: str, items: list[dict[str, Any]]
    ) -> bool:
        """Append `items` (each with its `id`) in one commit. False: unknown conversation.

        :raises ConversationLocked: a turn of it is in progress."""
        ...

    async def conversation_state(
        self, conversation_id: str, tenant: str
    ) -> ConversationState | None:
        """All its items (in order), its version and turn in progress, read at once.
        None: unknown conversation."""
        ...

    async def conversation_items(
        self,
        conversation_id: str,
        tenant: str,
        after: str | None = None,
        limit: int | None = None,
        descending: bool = False,
    ) -> list[dict[str, Any]] | None:
        """Its items in order (newest first if `descending`), after the item `after`
        (in that order), at most `limit`. None: unknown conversation.

        :raises UnknownItem: `after` is not one of its items."""
        ...

    async def conversation_item(
        self, conversation_id: str, tenant: str, item_id: str
    ) -> dict[str, Any] | None:
        """One item; None if it, or the conversation, is unknown."""
        ...

    async def conversation_remove(self, conversation_id: str, tenant: str, item_id: str) -> bool:
        """Delete one item. False: it, or the conversation, is unknown.

        :raises ConversationLocked: a turn of it is in progress."""
        ...


class Store(Lifespan, Transitions, EventLog, Leases, Maintenance, Conversations, Protocol):
    """A store: what a server opens, and what its lifecycle uses (every part above)."""

    webhooks: Webhooks  # endpoints and the webhook outbox (`store/hooks.py`)
