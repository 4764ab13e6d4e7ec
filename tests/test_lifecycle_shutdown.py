"""Shutdown and lost cancels, in one process (issue 14, item 6).

These drive a real `Lifecycle` on a real SQLite store and the scripted engine, in the
test's own event loop: what they check (which tasks are awaited, what `stop()` closes,
what a spawned task does with a store error) cannot be seen over HTTP. Faults are
injected by small subclasses: an engine that ignores its stop signal (a stuck upstream),
a store whose reads fail for a while (an unreachable database).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from tether.config import Settings
from tether.engines.base import Delta, Emit, Generation, PromptRead
from tether.engines.scripted import ScriptedEngine
from tether.lifecycle import Lifecycle
from tether.store.base import Record, StoreUnavailable
from tether.store.sqlite import SQLiteStore
from tether.wire import CreateRequest

pytestmark = pytest.mark.anyio


class Unreachable(SQLiteStore):
    """A SQLite store whose reads fail until `down_until` (time.monotonic())."""

    down_until = 0.0
    closed = False

    async def get(self, response_id: str, tenant: str) -> Record | None:
        if time.monotonic() < self.down_until:
            raise StoreUnavailable("injected: the database cannot be reached")
        return await super().get(response_id, tenant)

    async def close(self) -> None:
        await super().close()
        self.closed = True


class Stubborn(ScriptedEngine):
    """Generates until the end of time, deaf to cancels (a bug: a shielded loop), until
    `release` is set."""

    closed = False

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.ended = anyio.Event()

    async def generate(self, request: Generation, emit: Emit) -> None:
        await emit(PromptRead(input_tokens=1))
        try:
            with anyio.CancelScope(shield=True):
                while not self.release.is_set():
                    await anyio.sleep(0.01)
                    await emit(Delta(" on"))
        finally:
            self.ended.set()

    async def close(self) -> None:
        self.closed = True


async def until(predicate: Callable[[], Awaitable[object]], timeout: float = 10.0) -> None:
    """Poll an async condition with a deadline."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.01)  # poll interval of a wait with a deadline


async def started(store: SQLiteStore, rid: str, deltas: int = 3) -> bool:
    return len(await store.read(rid, -1)) >= 4 + deltas  # created, in_progress, item, part


def quiet(lc: Lifecycle) -> Callable[[], Awaitable[bool]]:
    """The condition: no run or spawned task of `lc` is still going."""

    async def check() -> bool:
        return not lc.runner.busy

    return check


async def make(
    tmp_path: Path, engine: ScriptedEngine, **settings: float
) -> tuple[Lifecycle, Unreachable]:
    store = Unreachable(str(tmp_path / "tether.db"))
    lc = Lifecycle(store, engine, Settings(db=store.path, **settings))  # type: ignore[arg-type]
    await lc.start()
    return lc, store


async def test_stop_closes_everything_when_a_run_will_not_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: `stop()`'s bounded wait raised TimeoutError and the store, engine and
    # dispatch were never closed. Now a run deaf to its cancel is cut after the grace,
    # left after a bounded wait (logged), its response ended from its log (the run is
    # fenced out), and everything closed.
    engine = Stubborn()
    lc, store = await make(tmp_path, engine, cancel_timeout=0.2)
    rec = await lc.create(CreateRequest(model="scripted", input="x", background=True), "t")
    await until(lambda: started(store, rec.id))
    with caplog.at_level(logging.ERROR, "tether.runner"):
        await asyncio.wait_for(lc.stop(), 15)
    assert store.closed and engine.closed
    assert any("did not end when cancelled" in r.getMessage() for r in caplog.records)
    engine.release.set()
    with anyio.fail_after(5):
        await engine.ended.wait()
    reopened = SQLiteStore(store.path)
    await reopened.open()
    try:
        final = await reopened.get(rec.id, "t")
        assert final is not None and final.status == "failed"
        assert final.snapshot["error"]["code"] == "server_error"
        assert final.snapshot["usage"]["output_tokens"] == await reopened.output_tokens(rec.id)
    finally:
        await reopened.close()


async def test_a_cancelled_stop_still_closes_everything(tmp_path: Path) -> None:
    # A stop that is itself cancelled (a second signal, a lifespan timeout) closes the
    # store, engine and dispatch and cancels the runs on its way out, and the
    # cancellation goes on up: nothing swallows it.
    engine = Stubborn()
    lc, store = await make(tmp_path, engine, cancel_timeout=30)
    rec = await lc.create(CreateRequest(model="scripted", input="x", background=True), "t")
    await until(lambda: started(store, rec.id))
    run = lc.runs[rec.id]
    stopping = asyncio.create_task(lc.stop())

    async def stop_signalled() -> bool:
        return run.reason is not None

    await until(stop_signalled)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert store.closed and engine.closed
    engine.release.set()
    with anyio.fail_after(5):
        await engine.ended.wait()


async def test_a_disconnect_cancel_rides_out_a_store_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: `cancel_quietly` in a spawned task raised StoreUnavailable into the void,
    # and the response its reader had left ran to its end. Now the run stops at once and
    # the cancel goes through when the store is back.
    lc, store = await make(
        tmp_path, ScriptedEngine(rate=100, length=300), lease_timeout=5, cancel_timeout=0.5
    )
    try:
        rec = await lc.create(CreateRequest(model="scripted", input="x"), "t")
        await until(lambda: started(store, rec.id))
        store.down_until = time.monotonic() + 0.5
        with caplog.at_level(logging.WARNING, "tether.lifecycle"):
            lc.spawn(lc.cancel_quietly, rec.id, "t")

            async def ended() -> bool:
                r = await SQLiteStore.get(store, rec.id, "t")
                return r is not None and r.status not in ("queued", "in_progress")

            await until(ended)
            await until(quiet(lc))
        final = await SQLiteStore.get(store, rec.id, "t")
        assert final is not None and final.status == "cancelled"
        assert final.snapshot["usage"]["output_tokens"] < 300
        assert any("waits for the store" in r.getMessage() for r in caplog.records)
    finally:
        await lc.stop()


async def test_a_cancel_given_up_is_logged_and_the_run_still_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The store stays unreachable past the lease: the cancel gives up with an error log
    # line (no exception lost in a task), and the run, told to stop without the store,
    # has ended the response `cancelled` by itself.
    lc, store = await make(
        tmp_path, ScriptedEngine(rate=100, length=300), lease_timeout=0.5, cancel_timeout=0.5
    )
    try:
        rec = await lc.create(CreateRequest(model="scripted", input="x"), "t")
        await until(lambda: started(store, rec.id))
        store.down_until = time.monotonic() + 60
        with caplog.at_level(logging.WARNING, "tether"):
            lc.spawn(lc.cancel_quietly, rec.id, "t")
            await until(quiet(lc))
        assert any("given up" in r.getMessage() for r in caplog.records)
        assert not any("background task" in r.getMessage() for r in caplog.records)
        final = await SQLiteStore.get(store, rec.id, "t")
        assert final is not None and final.status == "cancelled"
    finally:
        store.down_until = 0.0
        await lc.stop()
