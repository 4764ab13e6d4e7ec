"""Conversations in both stores (`store.base.Conversations`): CRUD, tenant scoping,
pagination, and a turn's items added by its terminal transition, exactly once, in the
order the transitions commit (also when they race, across two PostgreSQL "processes")."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tether.store import Store, UnknownItem, make_store
from tether.store.base import Record

from services import delete_prefix, postgres_url, prefix, redis_url

pytestmark = pytest.mark.anyio

Open = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgres"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Open]:
    """Stores on one database: SQLite (one process), or PostgreSQL + Redis (each call a
    "process" of its own)."""
    opened: list[Store] = []
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            urls: tuple[str, str | None] = (str(tmp_path / "t.db"), None)
            key_prefix = "unused"
        else:
            urls = (stack.enter_context(postgres_url()), redis_url())
            key_prefix = prefix()

        async def open_one() -> Store:
            if request.param == "sqlite" and opened:
                return opened[0]  # one process owns a SQLite file
            store = make_store(urls[0], urls[1], key_prefix)
            await store.open()
            opened.append(store)
            return store

        yield open_one
        for store in opened:
            await store.close()
        if urls[1] is not None:
            await delete_prefix(urls[1], key_prefix)


def conv(cid: str = "conv_1", **metadata: str) -> dict[str, Any]:
    return {"id": cid, "object": "conversation", "created_at": 1700000000, "metadata": metadata}


def msg(iid: str, text: str = "hi") -> dict[str, Any]:
    return {"id": iid, "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": text}]}  # fmt: skip


def turn(rid: str, cid: str | None, inputs: list[dict[str, Any]], tenant: str = "t") -> Record:
    snapshot: dict[str, Any] = {"id": rid, "output": []}
    if cid is not None:
        snapshot["conversation"] = {"id": cid}
    return Record(
        id=rid,
        tenant=tenant,
        status="in_progress",
        snapshot=snapshot,
        run={},
        input_items=inputs,
        run_token=None,
        owner="me",
        lease_until=0.0,
        last_seq=-1,
        input_tokens=0,
        finished_at=None,
    )


def ids(items: list[dict[str, Any]] | None) -> list[str]:
    assert items is not None
    return [i["id"] for i in items]


async def test_crud_and_tenants(open_store: Open) -> None:
    store = await open_store()
    await store.conversation_create(conv(topic="a"), "t", [msg("m1"), msg("m2")])
    assert await store.conversation_get("conv_1", "t") == conv(topic="a")
    assert await store.conversation_get("conv_1", "other") is None
    assert await store.conversation_update("conv_1", "other", {"x": "y"}) is None
    updated = await store.conversation_update("conv_1", "t", {"x": "y"})
    assert updated == conv(x="y")
    assert not await store.conversation_add("conv_1", "other", [msg("m3")])
    assert await store.conversation_add("conv_1", "t", [msg("m3"), msg("m4")])
    assert ids(await store.conversation_items("conv_1", "t")) == ["m1", "m2", "m3", "m4"]
    assert await store.conversation_items("conv_1", "other") is None
    assert await store.conversation_item("conv_1", "t", "m3") == msg("m3")
    assert await store.conversation_item("conv_1", "other", "m3") is None
    assert not await store.conversation_remove("conv_1", "other", "m3")
    assert await store.conversation_remove("conv_1", "t", "m3")
    assert not await store.conversation_remove("conv_1", "t", "m3")
    assert await store.conversation_item("conv_1", "t", "m3") is None
    assert not await store.conversation_delete("conv_1", "other")
    assert await store.conversation_delete("conv_1", "t")
    assert await store.conversation_get("conv_1", "t") is None
    assert await store.conversation_items("conv_1", "t") is None


async def test_pages(open_store: Open) -> None:
    store = await open_store()
    await store.conversation_create(conv(), "t", [msg(f"m{n}") for n in range(7)])
    assert ids(await store.conversation_items("conv_1", "t", None, 3)) == ["m0", "m1", "m2"]
    assert ids(await store.conversation_items("conv_1", "t", "m2", 3)) == ["m3", "m4", "m5"]
    assert ids(await store.conversation_items("conv_1", "t", "m5", 3)) == ["m6"]
    page = await store.conversation_items("conv_1", "t", None, 2, descending=True)
    assert ids(page) == ["m6", "m5"]
    page = await store.conversation_items("conv_1", "t", "m5", 10, descending=True)
    assert ids(page) == ["m4", "m3", "m2", "m1", "m0"]
    with pytest.raises(UnknownItem):
        await store.conversation_items("conv_1", "t", "nope")


async def test_a_turn_is_added_by_its_terminal_transition_once(open_store: Open) -> None:
    store = await open_store()
    await store.conversation_create(conv(), "t", [msg("m0")])
    await store.create(turn("resp_1", "conv_1", [msg("in1")]), [])
    # Live: nothing yet.
    assert ids(await store.conversation_items("conv_1", "t")) == ["m0"]
    out = {"id": "out1", "type": "message", "role": "assistant", "status": "incomplete",
           "content": []}  # fmt: skip
    final = {"id": "resp_1", "conversation": {"id": "conv_1"}, "output": [out]}
    assert await store.finish("resp_1", None, "cancelled", final, [])
    assert not await store.finish("resp_1", None, "completed", final, [])  # lost: adds nothing
    items = await store.conversation_items("conv_1", "t")
    assert items == [msg("m0"), msg("in1"), out]


async def test_failed_turns_and_other_tenants_add_nothing(open_store: Open) -> None:
    store = await open_store()
    await store.conversation_create(conv(), "t", [])
    await store.create(turn("resp_f", "conv_1", [msg("in_f")]), [])
    final = {"id": "resp_f", "conversation": {"id": "conv_1"}, "output": []}
    assert await store.finish("resp_f", None, "failed", final, [])
    # A response of another tenant naming this conversation (lifecycle refuses it: this
    # is the store's own guard).
    await store.create(turn("resp_o", "conv_1", [msg("in_o")], tenant="other"), [])
    assert await store.finish("resp_o", None, "completed", {**final, "id": "resp_o"}, [])
    # A turn whose conversation was deleted meanwhile ends as any response does.
    await store.create(turn("resp_d", "conv_gone", [msg("in_d")]), [])
    gone = {"id": "resp_d", "conversation": {"id": "conv_gone"}, "output": []}
    assert await store.finish("resp_d", None, "completed", gone, [])
    assert await store.conversation_items("conv_1", "t") == []


async def test_racing_turns_are_added_whole_in_commit_order(open_store: Open) -> None:
    # Two "processes" end turns of one conversation at once: each turn's items are
    # contiguous, and nothing is lost or doubled.
    a, b = await open_store(), await open_store()
    await store_conv(a)
    n = 20
    for k in range(n):
        await a.create(turn(f"resp_{k}", "conv_1", [msg(f"in{k}a"), msg(f"in{k}b")]), [])

    async def end(store: Store, k: int) -> None:
        out = {"id": f"out{k}", "type": "message", "role": "assistant", "status": "completed",
               "content": []}  # fmt: skip
        final = {"id": f"resp_{k}", "conversation": {"id": "conv_1"}, "output": [out]}
        assert await store.finish(f"resp_{k}", None, "completed", final, [])

    await asyncio.gather(*(end(a if k % 2 else b, k) for k in range(n)))
    got = ids(await a.conversation_items("conv_1", "t"))
    assert len(got) == 3 * n
    turns = [got[i : i + 3] for i in range(0, len(got), 3)]
    assert sorted(turns) == sorted([f"in{k}a", f"in{k}b", f"out{k}"] for k in range(n))


async def store_conv(store: Store) -> None:
    await store.conversation_create(conv(), "t", [])
