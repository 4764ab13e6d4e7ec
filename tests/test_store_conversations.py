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
from tether.store.base import ConversationChanged, ConversationLocked, Record

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


async def begin(store: Store, rid: str, inputs: list[dict[str, Any]], tenant: str = "t") -> None:
    """Create a turn of conv_1 from its current version."""
    state = await store.conversation_state("conv_1", tenant)
    assert state is not None
    await store.create(turn(rid, "conv_1", inputs, tenant), [], None, ("conv_1", state.version))


def out(oid: str, status: str = "completed") -> dict[str, Any]:
    return {"id": oid, "type": "message", "role": "assistant", "status": status, "content": []}


def final(rid: str, *output: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "conversation": {"id": "conv_1"}, "output": list(output)}


async def test_a_turn_is_added_by_its_terminal_transition_once(open_store: Open) -> None:
    store = await open_store()
    await store.conversation_create(conv(), "t", [msg("m0")])
    await begin(store, "resp_1", [msg("in1")])
    state = await store.conversation_state("conv_1", "t")
    assert state is not None and state.turn == "resp_1" and ids(state.items) == ["m0"]
    assert await store.finish("resp_1", None, "cancelled", final("resp_1", out("o", "x")), [])
    # Lost: adds nothing.
    assert not await store.finish("resp_1", None, "completed", final("resp_1", out("o")), [])
    state = await store.conversation_state("conv_1", "t")
    assert state is not None and state.turn is None
    assert state.items == [msg("m0"), msg("in1"), out("o", "x")]
    assert await store.conversation_items("conv_1", "t") == state.items


async def test_one_turn_at_a_time(open_store: Open) -> None:
    store = await open_store()
    await store.conversation_create(conv(), "t", [])
    await begin(store, "resp_1", [msg("in1")])
    with pytest.raises(ConversationLocked):
        await begin(store, "resp_2", [msg("in2")])
    assert await store.get("resp_2", "t") is None  # nothing written
    with pytest.raises(ConversationLocked):
        await store.conversation_add("conv_1", "t", [msg("x")])
    with pytest.raises(ConversationLocked):
        await store.conversation_remove("conv_1", "t", "x")
    assert await store.conversation_update("conv_1", "t", {"a": "b"})  # metadata: free
    # A failed turn adds nothing and ends the turn.
    assert await store.finish("resp_1", None, "failed", final("resp_1", out("o")), [])
    assert await store.conversation_items("conv_1", "t") == []
    # A turn read before a change of the items is refused (read again).
    state = await store.conversation_state("conv_1", "t")
    assert state is not None
    assert await store.conversation_add("conv_1", "t", [msg("x")])
    with pytest.raises(ConversationChanged):
        await store.create(turn("resp_3", "conv_1", []), [], None, ("conv_1", state.version))
    state = await store.conversation_state("conv_1", "t")
    assert state is not None
    assert await store.conversation_remove("conv_1", "t", "x")
    with pytest.raises(ConversationChanged):
        await store.create(turn("resp_3", "conv_1", []), [], None, ("conv_1", state.version))
    # Another tenant's (or a gone) conversation: "changed" (the lifecycle's read then
    # says 404).
    with pytest.raises(ConversationChanged):
        await store.create(turn("resp_4", "conv_1", [], "other"), [], None, ("conv_1", 0))
    await begin(store, "resp_5", [msg("in5")])
    assert await store.finish("resp_5", None, "completed", final("resp_5"), [])
    assert ids(await store.conversation_items("conv_1", "t")) == ["in5"]


async def test_a_deleted_conversation_takes_no_turn(open_store: Open) -> None:
    store = await open_store()
    await store.conversation_create(conv(), "t", [])
    await begin(store, "resp_d", [msg("in_d")])
    assert await store.conversation_delete("conv_1", "t")
    assert await store.finish("resp_d", None, "completed", final("resp_d"), [])
    assert await store.conversation_items("conv_1", "t") is None


async def test_racing_turns_one_wins_and_every_turn_is_whole(open_store: Open) -> None:
    # Two "processes" start and end turns of one conversation at once, and add items:
    # one turn at a time, each turn's items contiguous and right after the items it
    # started from; nothing lost or doubled.
    a, b = await open_store(), await open_store()
    await a.conversation_create(conv(), "t", [])
    started: dict[str, list[str]] = {}  # turn -> the item ids it started from
    added: list[str] = []

    async def one(store: Store, k: int) -> None:
        rid = f"resp_{k}"
        for _ in range(200):
            state = await store.conversation_state("conv_1", "t")
            assert state is not None
            try:
                await store.create(
                    turn(rid, "conv_1", [msg(f"in{k}")]), [], None, ("conv_1", state.version)
                )
            except (ConversationLocked, ConversationChanged):
                try:
                    if await store.conversation_add("conv_1", "t", [msg(f"x{k}_{_}")]):
                        added.append(f"x{k}_{_}")
                except ConversationLocked:
                    pass
                await asyncio.sleep(0.001 * (k % 3))
                continue
            started[rid] = ids(state.items)
            assert await store.finish(rid, None, "completed", final(rid, out(f"out{k}")), [])
            return
        raise AssertionError(f"{rid} never got its turn")

    await asyncio.gather(*(one(a if k % 2 else b, k) for k in range(8)))
    got = ids(await a.conversation_items("conv_1", "t"))
    assert sorted(got) == sorted(
        [f"in{k}" for k in range(8)] + [f"out{k}" for k in range(8)] + added
    )
    for rid, before in started.items():
        k = rid.removeprefix("resp_")
        at = got.index(f"in{k}")
        assert got[:at] == before and got[at + 1] == f"out{k}"
