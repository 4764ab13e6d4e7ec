"""The Conversations API (issue 18, docs/contract.md §9) through the real `openai` SDK,
sync and async, every reply checked against OpenAI's schemas (tests/spec.py): the eight
operations, tenants, pages, and turns — `responses.create(conversation=...)` starts from
the conversation's items and adds its input and output when it ends (a cancelled turn
what its streams and its cancel reply showed; a failed turn nothing)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import Server, read_deltas, served, wait_for
from test_auth import client_for, create_key

MODEL = "scripted"


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Short scripted answers (8 words at 400 tokens/s)."""
    args = ("--engine", MODEL, "--debug-routes", "--scripted-rate", "400", "--scripted-length", "8")
    with served(tmp_path_factory.mktemp("conv"), *args) as server:
        yield server


@pytest.fixture
def client(fast: Server) -> Iterator[openai.OpenAI]:
    with fast.client() as c:
        yield c


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def texts(items: list[Any]) -> list[str]:
    """Each item's text (messages), or its type."""
    out = []
    for item in items:
        item = item if isinstance(item, dict) else item.model_dump()
        if item["type"] == "message":
            out.append("".join(p.get("text", "") for p in item["content"]))
        else:
            out.append(item["type"])
    return out


def all_items(client: openai.OpenAI, cid: str) -> list[Any]:
    return list(client.conversations.items.list(cid, order="asc", limit=100))


def started(server: Server, rid: str) -> bool:
    """The scripted engine has begun this response's run."""
    try:
        server.trace(rid)
    except httpx.HTTPStatusError:
        return False
    return True


def prompt(server: Server, rid: str) -> list[str]:
    """The turns the engine was given (scripted engine trace)."""
    trace = server.trace(rid)
    return [m["text"] for m in trace["messages"]]  # type: ignore[index, union-attr]


# --- the eight operations ---------------------------------------------------------------


def test_conversation_crud(client: openai.OpenAI) -> None:
    conv = client.conversations.create(
        items=[user("one"), {"role": "assistant", "content": "two"}], metadata={"topic": "t"}
    )
    assert conv.id.startswith("conv_") and conv.object == "conversation"
    assert conv.metadata == {"topic": "t"}
    assert client.conversations.retrieve(conv.id).model_dump() == conv.model_dump()
    updated = client.conversations.update(conv.id, metadata={"topic": "u"})
    assert updated.metadata == {"topic": "u"}
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "u"}

    added = client.conversations.items.create(conv.id, items=[user("three")])
    assert texts(added.data) == ["three"] and added.has_more is False
    items = all_items(client, conv.id)
    assert texts(items) == ["one", "two", "three"]
    assert [i.role for i in items] == ["user", "assistant", "user"]  # type: ignore[union-attr]
    one = client.conversations.items.retrieve(items[0].id, conversation_id=conv.id)
    assert one.model_dump() == items[0].model_dump()
    after = client.conversations.items.delete(items[1].id, conversation_id=conv.id)
    assert after.id == conv.id
    assert texts(all_items(client, conv.id)) == ["one", "three"]
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(items[1].id, conversation_id=conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.delete(items[1].id, conversation_id=conv.id)

    deleted = client.conversations.delete(conv.id)
    assert deleted.deleted and deleted.id == conv.id
    for call in (
        lambda: client.conversations.retrieve(conv.id),
        lambda: client.conversations.update(conv.id, metadata={}),
        lambda: client.conversations.delete(conv.id),
        lambda: client.conversations.items.list(conv.id),
        lambda: client.conversations.items.create(conv.id, items=[user("x")]),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.status_code == 404


def test_item_pages(client: openai.OpenAI) -> None:
    conv = client.conversations.create(items=[user(str(n)) for n in range(20)])
    client.conversations.items.create(conv.id, items=[user(str(n)) for n in range(20, 25)])
    # The SDK's auto-paging follows `after` with `has_more`.
    assert texts(client.conversations.items.list(conv.id, order="asc", limit=3)) == [
        str(n) for n in range(25)
    ]
    newest = client.conversations.items.list(conv.id, limit=4)  # default order: desc
    assert texts(newest.data) == ["24", "23", "22", "21"] and newest.has_more
    assert newest.first_id == newest.data[0].id and newest.last_id == newest.data[-1].id
    rest = client.conversations.items.list(conv.id, limit=100, after=newest.last_id)
    assert texts(rest.data) == [str(n) for n in range(20, -1, -1)] and not rest.has_more
    last = client.conversations.items.list(conv.id, order="asc", after=newest.data[0].id)
    assert last.data == [] and not last.has_more
    assert texts(client.conversations.items.list(conv.id, include=["message.output_text.logprobs"]))


def test_bad_bodies_name_the_parameter(fast: Server, client: openai.OpenAI) -> None:
    base = f"{fast.base_url}/conversations"
    conv = client.conversations.create()
    assert client.conversations.retrieve(conv.id).metadata == {}
    cases = [
        (base, {"items": [user(str(n)) for n in range(21)]}, "items"),
        (base, {"items": [{"role": "robot", "content": "x"}]}, "items[0].role"),
        (base, {"metadata": {"k": 1}}, "metadata"),
        (base, {"metadata": {str(n): "v" for n in range(17)}}, "metadata"),
        (base, {"nope": 1}, "nope"),
        (f"{base}/{conv.id}", {}, "metadata"),
        (f"{base}/{conv.id}/items", {}, "items"),
        (f"{base}/{conv.id}/items", {"items": [{"type": "item_reference", "id": "x"}]}, None),
    ]
    for url, body, param in cases:
        reply = httpx.post(url, json=body, timeout=10)
        assert reply.status_code == 400, (body, reply.text)
        if param is not None:
            assert reply.json()["error"]["param"] == param, reply.text
    # A create needs no body at all.
    bare = httpx.post(base, timeout=10)
    assert bare.status_code == 200 and bare.json()["metadata"] == {}
    bad_after = httpx.get(f"{base}/{conv.id}/items", params={"after": "msg_x"}, timeout=10)
    assert bad_after.status_code == 400 and bad_after.json()["error"]["param"] == "after"
    bad_order = httpx.get(f"{base}/{conv.id}/items", params={"order": "up"}, timeout=10)
    assert bad_order.status_code == 400 and bad_order.json()["error"]["param"] == "order"


def test_another_tenants_conversation_is_404(make_server: Any, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    a_secret = create_key(keys_file, "a")[1]
    b_secret = create_key(keys_file, "b")[1]
    server = make_server("--keys-file", str(keys_file), "--scripted-length", "4")
    a, b = client_for(server, a_secret), client_for(server, b_secret)
    conv = a.conversations.create(items=[user("secret")])
    item = all_items(a, conv.id)[0]
    for call in (
        lambda: b.conversations.retrieve(conv.id),
        lambda: b.conversations.update(conv.id, metadata={}),
        lambda: b.conversations.items.list(conv.id),
        lambda: b.conversations.items.create(conv.id, items=[user("x")]),
        lambda: b.conversations.items.retrieve(item.id, conversation_id=conv.id),
        lambda: b.conversations.items.delete(item.id, conversation_id=conv.id),
        lambda: b.conversations.delete(conv.id),
        lambda: b.responses.create(model=MODEL, input="x", conversation=conv.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert texts(all_items(a, conv.id)) == ["secret"]


# --- turns ----------------------------------------------------------------------------------


def test_turns_start_from_the_conversation_and_add_to_it(
    fast: Server, client: openai.OpenAI
) -> None:
    conv = client.conversations.create(items=[user("hello")])
    first = client.responses.create(model=MODEL, input="first", conversation=conv.id)
    assert first.status == "completed" and first.conversation is not None
    assert first.conversation.id == conv.id
    assert prompt(fast, first.id) == ["hello", "first"]
    assert texts(all_items(client, conv.id)) == ["hello", "first", first.output_text]
    # The items are the response's own: its input item and its output item, same ids.
    items = all_items(client, conv.id)
    assert items[2].id == first.output[0].id
    assert items[1].id == client.responses.input_items.list(first.id).data[0].id

    second = client.responses.create(
        model=MODEL, input=[user("second")], conversation={"id": conv.id}, stream=True
    )
    events = list(second)
    done = events[-1].response  # type: ignore[union-attr]
    assert done.conversation.id == conv.id
    assert prompt(fast, done.id) == ["hello", "first", first.output_text, "second"]
    assert texts(all_items(client, conv.id)) == [
        "hello",
        "first",
        first.output_text,
        "second",
        done.output_text,
    ]
    assert client.responses.retrieve(done.id).conversation.id == conv.id  # type: ignore[union-attr]


def test_item_references_copy_the_conversations_item(fast: Server, client: openai.OpenAI) -> None:
    conv = client.conversations.create(items=[user("remember me")])
    ref = all_items(client, conv.id)[0].id
    reply = client.responses.create(
        model=MODEL, input=[{"type": "item_reference", "id": ref}], conversation=conv.id
    )
    assert prompt(fast, reply.id) == ["remember me", "remember me"]
    items = all_items(client, conv.id)
    assert texts(items)[:2] == ["remember me", "remember me"]
    assert len({i.id for i in items}) == len(items)  # ids stay unique
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(
            model=MODEL, input=[{"type": "item_reference", "id": "msg_nope"}], conversation=conv.id
        )
    assert err.value.body["param"] == "input[0].id"  # type: ignore[index]


def test_conversation_with_previous_response_id_is_400(client: openai.OpenAI) -> None:
    conv = client.conversations.create()
    first = client.responses.create(model=MODEL, input="x")
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(
            model=MODEL, input="y", conversation=conv.id, previous_response_id=first.id
        )
    assert err.value.body["param"] == "conversation"  # type: ignore[index]
    assert err.value.code == "mutually_exclusive_parameters"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="y", conversation="conv_nope")
    assert all_items(client, conv.id) == []


def test_a_store_false_turn_is_still_added(client: openai.OpenAI) -> None:
    # OpenAI: the response's items are added to its conversation; `store` is about the
    # Response object.
    conv = client.conversations.create()
    reply = client.responses.create(model=MODEL, input="x", conversation=conv.id, store=False)
    assert reply.store is False
    assert texts(all_items(client, conv.id)) == ["x", reply.output_text]


def test_a_failed_turn_adds_nothing(fast: Server, client: openai.OpenAI) -> None:
    conv = client.conversations.create(items=[user("before")])
    reply = client.responses.create(model=MODEL, input="FAIL_AT=2", conversation=conv.id)
    assert reply.status == "failed"
    assert texts(all_items(client, conv.id)) == ["before"]
    again = client.responses.create(model=MODEL, input="retry", conversation=conv.id)
    assert prompt(fast, again.id) == ["before", "retry"]


def test_a_cancelled_turn_adds_what_was_shown(make_server: Any) -> None:
    server = make_server("--scripted-rate", "50", "--scripted-length", "400")
    with server.client() as client:
        conv = client.conversations.create(items=[user("hello")])
        stream = client.responses.create(
            model=MODEL, input="tell me", conversation=conv.id, background=True, stream=True
        )
        rid, _ = read_deltas(stream, 3)
        cancelled = client.responses.cancel(rid)
        stream.close()
        assert cancelled.status == "cancelled"
        shown = cancelled.output
        assert shown and shown[0].status == "incomplete"  # type: ignore[union-attr]
        items = all_items(client, conv.id)
        assert texts(items) == ["hello", "tell me", cancelled.output_text]
        assert items[2].model_dump() == shown[0].model_dump()
        # Every reader agrees: a stream of the ended response ends with the same output.
        replay = list(client.responses.retrieve(rid, stream=True))
        assert replay[-1].response.output_text == cancelled.output_text  # type: ignore[union-attr]
        # The next turn continues from what the user saw.
        nxt = client.responses.create(
            model=MODEL, input="go on", conversation=conv.id, background=True
        )
        # Its prompt, once its run started (a cancel before that would leave no trace).
        wait_for(lambda: started(server, nxt.id), 30, "the next turn's run")
        client.responses.cancel(nxt.id)
        assert prompt(server, nxt.id)[:3] == ["hello", "tell me", cancelled.output_text]


def test_one_turn_at_a_time(make_server: Any) -> None:
    # OpenAI's answer to a second turn while one is in progress, and to a change of the
    # items meanwhile: 400 `conversation_locked`. Metadata and reads are free.
    server = make_server("--scripted-rate", "50", "--scripted-length", "400")
    with server.client() as client:
        conv = client.conversations.create(items=[user("hello")])
        first = client.responses.create(
            model=MODEL, input="long", conversation=conv.id, background=True
        )
        for call in (
            lambda: client.responses.create(model=MODEL, input="x", conversation=conv.id),
            lambda: client.conversations.items.create(conv.id, items=[user("x")]),
            lambda: client.conversations.items.delete(
                all_items(client, conv.id)[0].id, conversation_id=conv.id
            ),
        ):
            with pytest.raises(openai.BadRequestError) as err:
                call()
            assert err.value.code == "conversation_locked"
        client.conversations.update(conv.id, metadata={"k": "v"})
        assert texts(all_items(client, conv.id)) == ["hello"]
        client.responses.cancel(first.id)  # the turn ends: the next may begin
        second = client.responses.create(
            model=MODEL, input="next", conversation=conv.id, background=True
        )
        client.responses.cancel(second.id)
        assert prompt(server, second.id)[:2] == ["hello", "long"]


def test_a_retried_turn_with_its_idempotency_key_is_the_same_turn(make_server: Any) -> None:
    # A retry of a turn in progress is not a second turn: the first response, no 400.
    server = make_server("--scripted-rate", "50", "--scripted-length", "400")
    with server.client() as client:
        conv = client.conversations.create()
        headers = {"Idempotency-Key": "turn-1"}
        body: dict[str, Any] = {"input": "x", "conversation": conv.id, "background": True}
        first = client.responses.create(model=MODEL, extra_headers=headers, **body)
        again = client.responses.create(model=MODEL, extra_headers=headers, **body)
        assert again.id == first.id
        client.responses.cancel(first.id)
        assert texts(all_items(client, conv.id))[0] == "x"


def test_turns_racing_for_a_conversation_each_follow_what_they_were_given(
    fast: Server, client: openai.OpenAI
) -> None:
    # Clients that retry `conversation_locked` (as OpenAI asks) take turns: every turn's
    # prompt is exactly the conversation's items before its own, nothing lost or doubled.
    conv = client.conversations.create(items=[user("start")])
    replies: dict[int, Any] = {}

    def turn(n: int) -> None:
        with fast.client() as own:
            for _ in range(500):
                try:
                    replies[n] = own.responses.create(
                        model=MODEL, input=f"turn {n}", conversation=conv.id
                    )
                    return
                except openai.BadRequestError as exc:
                    assert exc.code == "conversation_locked"

    threads = [threading.Thread(target=turn, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(replies) == 6 and all(r.status == "completed" for r in replies.values())
    items = texts(all_items(client, conv.id))
    assert items[0] == "start" and len(items) == 13
    for n, reply in replies.items():
        at = items.index(f"turn {n}")
        assert items[at + 1] == reply.output_text
        assert prompt(fast, reply.id) == items[: at + 1]


@pytest.mark.anyio
async def test_async_client(fast: Server) -> None:
    async with fast.async_client() as client:
        conv = await client.conversations.create(metadata={"k": "v"})
        await client.conversations.items.create(conv.id, items=[user("hi")])
        reply = await client.responses.create(model=MODEL, input="there", conversation=conv.id)
        assert reply.conversation is not None and reply.conversation.id == conv.id
        page = await client.conversations.items.list(conv.id, order="asc")
        assert texts(page.data) == ["hi", "there", reply.output_text]
        item = await client.conversations.items.retrieve(page.data[2].id, conversation_id=conv.id)
        assert item.id == reply.output[0].id
        assert (await client.conversations.retrieve(conv.id)).metadata == {"k": "v"}
        stream = await client.responses.create(
            model=MODEL, input="again", conversation={"id": conv.id}, stream=True
        )
        events = [e async for e in stream]
        assert events[-1].response.conversation.id == conv.id  # type: ignore[union-attr]
        assert len((await client.conversations.items.list(conv.id)).data) == 5
        # Counted as the turn would be: the conversation's items, then the input.
        counted = await client.responses.input_tokens.count(
            model=MODEL, input="x", conversation=conv.id
        )
        alone = await client.responses.input_tokens.count(model=MODEL, input="x")
        assert counted.input_tokens > alone.input_tokens
        assert (await client.conversations.delete(conv.id)).deleted


def test_websocket_turns(fast: Server, client: openai.OpenAI) -> None:
    # WebSocket mode shares create's path: the same turns, over one connection.
    from test_websocket import Socket

    conv = client.conversations.create(items=[user("hello")])
    with Socket(fast) as ws:
        ws.send({"type": "response.create", "model": MODEL, "input": "a", "conversation": conv.id})
        first = ws.turn()[-1]["response"]
        assert first["status"] == "completed" and first["conversation"] == {"id": conv.id}
        ws.send(
            {
                "type": "response.create",
                "model": MODEL,
                "input": "b",
                "conversation": {"id": conv.id},
            }
        )
        second = ws.turn()[-1]["response"]
        ws.send(
            {
                "type": "response.create",
                "model": MODEL,
                "input": "c",
                "conversation": conv.id,
                "previous_response_id": second["id"],
            }
        )
        assert ws.error()["error"]["param"] == "conversation"
        # A warm-up (`generate: false`) completes at once with no output: its input is
        # added, as any completed turn's.
        ws.send(
            {
                "type": "response.create",
                "model": MODEL,
                "input": "warm",
                "conversation": conv.id,
                "generate": False,
            }
        )
        warm = ws.turn()[-1]["response"]
        assert warm["status"] == "completed" and warm["output"] == []
    first_text = first["output"][0]["content"][0]["text"]
    assert prompt(fast, second["id"]) == ["hello", "a", first_text, "b"]
    assert texts(all_items(client, conv.id))[-1] == "warm"
    assert len(all_items(client, conv.id)) == 6


def test_a_turn_cut_by_a_crash_adds_nothing_and_frees_the_conversation(make_server: Any) -> None:
    # SIGKILL mid-turn: after the restart the turn ends `failed` (docs/contract.md §8.7),
    # which adds nothing and ends the turn: the next one is taken.
    server = make_server("--scripted-rate", "50", "--scripted-length", "400")
    with server.client() as client:
        conv = client.conversations.create(items=[user("hello")])
        stream = client.responses.create(
            model=MODEL, input="doomed", conversation=conv.id, background=True, stream=True
        )
        rid, _ = read_deltas(stream, 2)
        server.kill()
    server.start()
    with server.client() as client:
        wait_for(lambda: client.responses.retrieve(rid).status == "failed", 10, "the turn ends")
        assert texts(all_items(client, conv.id)) == ["hello"]
        nxt = client.responses.create(
            model=MODEL, input="again", conversation=conv.id, max_output_tokens=2
        )
        assert nxt.status == "incomplete"
        assert prompt(server, nxt.id) == ["hello", "again"]
        assert texts(all_items(client, conv.id)) == ["hello", "again", nxt.output_text]
