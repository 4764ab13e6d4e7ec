"""Streams are readers of a response's event log (docs/contract.md §4).

A stream — a POST with `stream: true`, a `GET ?stream=true` resume, a WebSocket, the
playground — never talks to the engine: it reads the log after its cursor, then waits for
the log to grow, until the terminal event. So every reader of a response sees the same
events, and closing one never affects the run.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio

from tether import metrics, wire
from tether.store.base import LogEntry, Store, StoreUnavailable

T = TypeVar("T")
RETRY_EVERY = 0.25  # seconds between tries while the store is unreachable


async def patiently(call: Callable[..., Awaitable[T]], *args: Any, within: float) -> T:
    """`call(*args)`, riding out a short outage of the store: retried for `within`
    seconds (a lease: after it, another process takes over anyway), then the
    `StoreUnavailable` goes up."""
    try:
        return await call(*args)  # the common case: no clock, no loop
    except StoreUnavailable:
        deadline = time.monotonic() + within
    while True:
        await anyio.sleep(RETRY_EVERY)
        try:
            return await call(*args)
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise


@metrics.reader
async def follow(
    store: Store, rid: str, tenant: str, after: int, keepalive: float, within: float
) -> AsyncIterator[list[LogEntry]]:
    """The log of `rid` after `after`, then live events, until the terminal one, in
    batches. Waits at most `keepalive` seconds at a time (the caller's keep-alive), and
    rides out a store outage of up to `within` seconds rather than end without the
    terminal event."""
    read, wait, get = store.read, store.wait, store.get
    entries = await patiently(read, rid, after, within=within)
    check = True  # look at the status when the log is idle: a replay may be past the end
    while True:
        if entries:
            yield entries
            after = entries[-1].seq
            if entries[-1].type in wire.TERMINAL_EVENTS:
                return
            entries = await patiently(read, rid, after, within=within)
            continue
        if check:
            # The log is idle: the record says whether it is complete (a cache-served
            # read may lag; `upto` makes the store fetch what the record says exists).
            rec = await patiently(get, rid, tenant, within=within)
            if rec is None:
                return
            if rec.last_seq > after:
                entries = await patiently(read, rid, after, rec.last_seq, within=within)
                check = False
                continue
            if rec.status not in wire.LIVE_STATES:
                return
        await patiently(wait, rid, after, keepalive, within=within)
        entries = await patiently(read, rid, after, within=within)
        check = not entries
