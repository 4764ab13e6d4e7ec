"""The SQLite store's atomic operations: the two that decide every race
(docs/contract.md §1.1, §2.3)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from tether.store.base import IdempotencyConflict, Record
from tether.store.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio


def record(rid: str = "resp_1", status: str = "queued") -> Record:
    return Record(id=rid, tenant="t", status=status, snapshot={"id": rid}, run={},
                  input_items=[], run_token=None, owner="me", lease_until=0.0, last_seq=-1,
                  input_tokens=0, finished_at=None)


def ev(kind: str = "response.output_text.delta", **extra: Any) -> dict[str, Any]:
    return {"type": kind, **extra}


async def opened(tmp_path: Path) -> SQLiteStore:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.open()
    return store


async def test_sequence_numbers_are_assigned_by_the_store(tmp_path: Path) -> None:
    # contract §2.1
    store = await opened(tmp_path)
    await store.create(record(), [ev("response.created"), ev("response.queued")])
    assert await store.claim("resp_1", "tok", "me", 0, {}, [ev("response.in_progress")])
    for i in range(5):
        assert await store.append("resp_1", "tok", [ev(delta=str(i))], tokens=1)
    await asyncio.sleep(0)  # one loop turn: the group commit runs
    entries = await store.read("resp_1", -1)
    assert [e.seq for e in entries] == list(range(8))
    assert [orjson.loads(e.data)["sequence_number"] for e in entries] == list(range(8))
    assert [e.seq for e in await store.read("resp_1", 4)] == [5, 6, 7]
    assert await store.output_tokens("resp_1") == 5
    await store.close()


async def test_finish_is_a_single_compare_and_set(tmp_path: Path) -> None:
    # contract §1.1, §3.7: exactly one terminal transition; the loser learns it lost
    store = await opened(tmp_path)
    await store.create(record(), [ev("response.created")])
    assert await store.claim("resp_1", "tok", "me", 0, {}, [])
    assert await store.finish("resp_1", "tok", "completed", {"s": 1}, [ev("response.completed")])
    assert not await store.finish("resp_1", None, "cancelled", {"s": 2}, [ev("response.failed")])
    assert not await store.finish("resp_1", "tok", "failed", {"s": 3}, [ev("response.failed")])
    rec = await store.get("resp_1", "t")
    assert rec is not None and rec.status == "completed" and rec.snapshot == {"s": 1}
    assert [e.type for e in await store.read("resp_1", -1)] == [
        "response.created", "response.completed"]
    await store.close()


async def test_nothing_is_appended_after_the_terminal_event(tmp_path: Path) -> None:
    # contract §2.3: fencing — a late write can never reopen a response
    store = await opened(tmp_path)
    await store.create(record(), [ev("response.created")])
    await store.claim("resp_1", "old", "me", 0, {}, [])
    await store.append("resp_1", "old", [ev()], tokens=1)
    assert await store.fence("resp_1", "new")
    assert await store.finish("resp_1", "new", "cancelled", {}, [ev("response.failed")])
    await store.append("resp_1", "old", [ev()], tokens=1)  # accepted into the batch...
    await asyncio.sleep(0)  # ...and refused when the batch commits
    assert not await store.append("resp_1", "old", [ev()], tokens=1)
    types = [e.type for e in await store.read("resp_1", -1)]
    assert types == ["response.created", "response.output_text.delta", "response.failed"]
    assert await store.output_tokens("resp_1") == 1
    await store.close()


async def test_a_stale_run_token_is_fenced_out(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.create(record(), [ev("response.created")])
    await store.claim("resp_1", "old", "me", 0, {}, [])
    assert await store.fence("resp_1", "new")
    await store.append("resp_1", "old", [ev()], tokens=1)
    assert not await store.finish("resp_1", "old", "completed", {}, [ev("response.completed")])
    assert [e.type for e in await store.read("resp_1", -1)] == ["response.created"]
    await store.close()


async def test_claim_happens_once(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.create(record(), [ev("response.created")])
    assert await store.claim("resp_1", "a", "me", 0, {}, [ev("response.in_progress")])
    assert not await store.claim("resp_1", "b", "me", 0, {}, [ev("response.in_progress")])
    await store.close()


async def test_idempotency_keys(tmp_path: Path) -> None:
    # contract §5.3
    store = await opened(tmp_path)
    _, created = await store.create(record("resp_a"), [ev("response.created")], ("k", "h1"))
    assert created
    again, created = await store.create(record("resp_b"), [ev("response.created")], ("k", "h1"))
    assert not created and again.id == "resp_a"
    assert await store.get("resp_b", "t") is None
    with pytest.raises(IdempotencyConflict):
        await store.create(record("resp_c"), [ev("response.created")], ("k", "h2"))
    assert await store.get("resp_c", "t") is None
    await store.close()


async def test_readers_wake_only_after_commit(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.create(record(), [ev("response.created")])
    await store.claim("resp_1", "tok", "me", 0, {}, [])
    waiter = asyncio.ensure_future(store.wait("resp_1", 0, 5))
    await store.append("resp_1", "tok", [ev()], tokens=1)
    assert await store.read("resp_1", 0) == []  # not committed yet: invisible
    await asyncio.wait_for(waiter, 1)
    assert [e.seq for e in await store.read("resp_1", 0)] == [1]
    await store.close()


async def test_everything_survives_reopening(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.create(record(), [ev("response.created")])
    await store.claim("resp_1", "tok", "me", 0, {}, [])
    await store.append("resp_1", "tok", [ev(), ev()], tokens=2, input_tokens=9)
    await store.close()
    store = await opened(tmp_path)
    rec = await store.get("resp_1", "t")
    assert rec is not None and rec.input_tokens == 9 and rec.last_seq == 2
    assert len(await store.read("resp_1", -1)) == 3
    assert await store.output_tokens("resp_1") == 2
    assert [r.id for r in await store.expired(1.0)] == ["resp_1"]
    await store.close()


async def test_tenants_are_separate(tmp_path: Path) -> None:
    # contract §7.1
    store = await opened(tmp_path)
    await store.create(record(), [ev("response.created")])
    assert await store.get("resp_1", "other") is None
    assert not await store.delete("resp_1", "other")
    await store.close()
