"""The HTTP API through the official SDK: every create mode, resume, and the side routes."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tether.engines.scripted import scripted_text

MODES = [(False, False), (True, False), (False, True), (True, True)]  # (stream, background)


def check_events(events: list[Any], background: bool, n_tokens: int) -> None:
    """docs/contract.md §2.1-2.2: order, contiguous sequence numbers, one terminal event, last."""
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    head = (
        ["response.created", "response.queued", "response.in_progress"]
        if background
        else ["response.created", "response.in_progress"]
    )
    assert types[: len(head)] == head
    assert events[0].response.status == ("queued" if background else "in_progress")
    body = types[len(head) :]
    assert body == [
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n_tokens,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == scripted_text(n_tokens) == events[-1].response.output[0].content[0].text


@pytest.mark.parametrize(("stream", "background"), MODES)
def test_create_modes_sync_client(server, client, stream: bool, background: bool) -> None:  # type: ignore[no-untyped-def]
    # contract §5.1
    result = client.responses.create(
        model="scripted",
        input="hi",
        max_output_tokens=5,
        stream=stream,
        background=background,
        metadata={"k": "v"},
    )
    if stream:
        events = list(result)
        check_events(events, background, 5)
        rid = events[0].response.id
    elif background:
        assert result.status == "queued" and result.background is True
        rid = result.id
        events = list(client.responses.retrieve(rid, stream=True))
        check_events(events, background, 5)
    else:
        assert result.status == "incomplete"
        assert result.output_text == scripted_text(5)
        rid = result.id
    final = client.responses.retrieve(rid)
    assert final.status == "incomplete"
    assert final.metadata == {"k": "v"}
    assert final.usage.output_tokens == 5
    assert final.background is background


@pytest.mark.anyio
@pytest.mark.parametrize(("stream", "background"), MODES)
async def test_create_modes_async_client(server, stream: bool, background: bool) -> None:  # type: ignore[no-untyped-def]
    # contract §5.1
    async with server.async_client() as client:
        result = await client.responses.create(
            model="scripted", input="hi", stream=stream, background=background, max_output_tokens=4
        )
        if stream:
            events = [e async for e in result]
            check_events(events, background, 4)
            rid = events[0].response.id
        else:
            rid = result.id
            events = [e async for e in await client.responses.retrieve(rid, stream=True)]
            check_events(events, background, 4)
        final = await client.responses.retrieve(rid)
        assert final.status == "incomplete" and final.usage.output_tokens == 4


@pytest.mark.parametrize("background", [False, True])
def test_stream_helper(client, background: bool) -> None:  # type: ignore[no-untyped-def]
    with client.responses.stream(
        model="scripted", input="hi", max_output_tokens=1000, background=background
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == text == scripted_text(200)


@pytest.mark.anyio
async def test_stream_helper_async(server) -> None:  # type: ignore[no-untyped-def]
    async with (
        server.async_client() as client,
        client.responses.stream(
            model="scripted", input="hi", background=True, max_output_tokens=1000
        ) as stream,
    ):
        count = sum([e.type == "response.output_text.delta" async for e in stream])
        final = await stream.get_final_response()
    assert final.status == "completed" and count == final.usage.output_tokens == 200


def test_resume_starting_after_yields_exactly_the_rest(client) -> None:  # type: ignore[no-untyped-def]
    # contract §4.4: live resume, then replay after the run ended
    stream = client.responses.create(
        model="scripted", input="x", background=True, stream=True, max_output_tokens=20
    )
    first = next(iter(stream))
    rid = first.response.id
    live = list(client.responses.retrieve(rid, stream=True, starting_after=5))
    full = [first, *stream]
    assert [e.model_dump() for e in live] == [e.model_dump() for e in full[6:]]
    for n in (0, 7, len(full) - 2, len(full) - 1, len(full) + 5):
        replay = list(client.responses.retrieve(rid, stream=True, starting_after=n))
        assert [e.model_dump() for e in replay] == [e.model_dump() for e in full[n + 1 :]]


def test_resume_with_stream_helper(make_server) -> None:  # type: ignore[no-untyped-def]
    # The SDK's helper sends no starting_after: a full replay from `response.created`,
    # which it filters itself (notes/openai-sdk-behaviour.md §1).
    server = make_server("--scripted-length", "20")
    client = server.client()
    created = client.responses.create(model="scripted", input="x", background=True)
    with client.responses.stream(response_id=created.id, starting_after=4) as stream:
        seqs = [e.sequence_number for e in stream]
        final = stream.get_final_response()
    assert seqs[0] == 5 and seqs == list(range(5, seqs[-1] + 1))
    assert final.status == "completed" and final.output_text == scripted_text(20)


def test_previous_response_id_chains_context(server, client) -> None:  # type: ignore[no-untyped-def]
    # contract §5.4: the scripted engine counts prompt words as input tokens
    first = client.responses.create(model="scripted", input="one two three", max_output_tokens=4)
    second = client.responses.create(
        model="scripted", input="four", previous_response_id=first.id, max_output_tokens=2
    )
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == 3 + 4 + 1
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="scripted", input="x", previous_response_id="resp_no")


def test_input_items(client) -> None:  # type: ignore[no-untyped-def]
    response = client.responses.create(
        model="scripted",
        max_output_tokens=1,
        instructions="be brief",
        input=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "c"}]},
        ],
    )
    assert response.instructions == "be brief"
    page = client.responses.input_items.list(response.id)
    texts = [item.content[0].text for item in page.data]
    assert texts == ["c", "b", "a"]  # newest first by default
    asc = client.responses.input_items.list(response.id, order="asc", limit=2)
    assert [i.content[0].text for i in asc.data] == ["a", "b"] and asc.has_more
    rest = client.responses.input_items.list(response.id, order="asc", after=asc.last_id)
    assert [i.content[0].text for i in rest.data] == ["c"] and not rest.has_more


def test_models_and_health(server, client) -> None:  # type: ignore[no-untyped-def]
    assert [m.id for m in client.models.list()] == ["scripted"]
    assert client.models.retrieve("scripted").id == "scripted"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_delete(client) -> None:  # type: ignore[no-untyped-def]
    response = client.responses.create(model="scripted", input="x", max_output_tokens=1)
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_sse_framing(server) -> None:  # type: ignore[no-untyped-def]
    # contract §4.1, §4.3: `event:` + one-line `data:`, `\n` ends, no `id:`/`retry:`, [DONE]
    body = {"model": "scripted", "input": "x", "stream": True, "max_output_tokens": 3}
    with httpx.stream("POST", f"{server.base_url}/responses", json=body, timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    assert b"\r" not in raw
    frames = raw.decode().split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    import json

    for frame in frames[:-2]:
        if frame.startswith(":"):
            continue
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert json.loads(data_line[6:])["type"] == event_line[7:]


def test_keepalive_comments_while_idle(make_server) -> None:  # type: ignore[no-untyped-def]
    # contract §4.2: a comment line while nothing happens, which the SDK ignores
    server = make_server("--scripted-rate", "2", "--keepalive", "0.2")
    with server.client() as client:
        stream = client.responses.create(
            model="scripted", input="x", stream=True, max_output_tokens=2
        )
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    body = {"model": "scripted", "input": "x", "stream": True, "max_output_tokens": 2}
    with httpx.stream("POST", f"{server.base_url}/responses", json=body, timeout=10) as r:
        raw = b"".join(r.iter_raw())
    assert b": keepalive\n\n" in raw


def test_a_synchronous_client_that_hangs_up_cancels_its_response(server) -> None:  # type: ignore[no-untyped-def]
    # contract §4.7: a non-background JSON create whose client leaves mid-run is cancelled
    import json
    import socket

    from conftest import wait_for

    def live_runs() -> int:
        stats: dict[str, int] = httpx.get(f"{server.url}/debug/process", timeout=5).json()
        return stats["runs"]

    body = json.dumps({"model": "scripted", "input": "x"}).encode()  # 200 tokens, 2 s
    head = (
        f"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: hang-up\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        wait_for(lambda: live_runs() == 1, what="the run to start")
    wait_for(lambda: live_runs() == 0, what="the run to stop after the hang-up")
    # The same key gives the same response (its id), now terminal.
    replay = httpx.post(
        f"{server.base_url}/responses",
        content=body,
        timeout=10,
        headers={"Idempotency-Key": "hang-up", "Content-Type": "application/json"},
    ).json()
    assert replay["status"] == "cancelled"
    produced = server.trace(replay["id"])["produced"]
    assert replay["usage"]["output_tokens"] == produced < 200
