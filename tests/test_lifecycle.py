"""The life of a response, end to end: cancel, fencing, exact usage, restarts.

Every test drives a real `tether serve` process with the real `openai` client.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx
import openai
import pytest

from conftest import raw_events, read_deltas, wait_for

DONE_TYPES = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def test_motivating_scenario_background_stream_cancel(server, client) -> None:  # type: ignore[no-untyped-def]
    # contract §3.2, §3.3, §3.4, §3.5, §3.9 — openai-python#2643
    stream = client.responses.create(
        model="scripted", input="tell me a story", background=True, stream=True
    )
    rid, events = read_deltas(stream, 5)
    reply = client.responses.cancel(rid)
    replied_at = time.time()
    assert reply.status == "cancelled"
    assert reply.usage is not None and reply.usage.output_tokens >= 5
    rest = list(stream)  # the same stream goes on to its end
    events += rest
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    # Every delta the stream carries was produced before the reply; after the last one
    # come only the `.done` events that close the open message, then the terminal event.
    tail = [e.type for e in events[events.index(deltas[-1]) + 1 :]]
    assert tail == [*DONE_TYPES, "response.failed"]
    terminal = events[-1]
    assert terminal.response.status == "cancelled"
    assert terminal.response.error is None
    assert terminal.response.output[0].status == "incomplete"
    # Exact usage: the reply, the terminal event, the deltas and the engine all agree.
    assert terminal.response.usage == reply.usage
    assert reply.usage.output_tokens == len(deltas)
    text = "".join(d.delta for d in deltas)
    assert reply.output[0].content[0].text == text
    trace = server.trace(rid)
    assert trace["produced"] == len(deltas)
    assert all(t <= replied_at for t in trace["token_times"])
    # Nothing moves afterwards: the engine's counter and the stored usage stay put.
    time.sleep(1.0)  # observing that nothing changes for a second
    assert server.trace(rid)["produced"] == len(deltas)
    again = client.responses.retrieve(rid)
    assert again.status == "cancelled" and again.usage == reply.usage
    # contract §3.5: cancel again → 200, same object
    assert client.responses.cancel(rid).model_dump() == reply.model_dump()


def test_cancel_completed_is_400_without_retry(server, client) -> None:  # type: ignore[no-untyped-def]
    # contract §3.6
    done = client.responses.create(model="scripted", input="x", max_output_tokens=3)
    assert done.status == "incomplete"
    finished = client.responses.create(
        model="scripted", input="x", extra_body={"max_output_tokens": 1000}
    )
    # `max_output_tokens` above the scripted length: the run ends naturally.
    for response, word in ((done, "an incomplete"), (finished, "a completed")):
        raw = httpx.post(f"{server.base_url}/responses/{response.id}/cancel")
        assert raw.status_code == 400
        assert raw.headers["x-should-retry"] == "false"
        assert raw.json()["error"]["message"] == f"Cannot cancel {word} response."
        assert raw.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(finished.id)


def test_cancel_unknown_is_404(client) -> None:  # type: ignore[no-untyped-def]
    # contract §3.1
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.cancel("resp_nope")
    assert exc.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_every_reader_gets_the_terminal_event(server, client) -> None:  # type: ignore[no-untyped-def]
    # contract §2.4, §3.4: the POST stream and two resumes all end the same way
    stream = client.responses.create(model="scripted", input="x", background=True, stream=True)
    rid, first = read_deltas(stream, 2)
    readers = [client.responses.retrieve(rid, stream=True, starting_after=s) for s in (0, 3)]
    client.responses.cancel(rid)
    logs = [first + list(stream)] + [list(r) for r in readers]
    for log in logs:
        assert log[-1].type == "response.failed"
        assert log[-1].response.status == "cancelled"
    full = [e.sequence_number for e in logs[0]]
    assert full == list(range(len(full)))
    assert [e.sequence_number for e in logs[1]] == full[1:]
    assert [e.sequence_number for e in logs[2]] == full[4:]


def test_closing_a_background_reader_does_not_stop_the_run(make_server) -> None:  # type: ignore[no-untyped-def]
    # contract §4.6
    server = make_server("--scripted-length", "40")
    client = server.client()
    stream = client.responses.create(model="scripted", input="x", background=True, stream=True)
    rid, _ = read_deltas(stream, 2)
    stream.close()
    final = list(client.responses.retrieve(rid, stream=True))[-1]
    assert final.type == "response.completed"
    assert final.response.usage.output_tokens == 40
    assert server.trace(rid)["produced"] == 40


def test_disconnected_foreground_stream_is_cancelled(server, client) -> None:  # type: ignore[no-untyped-def]
    # contract §4.7: a non-background stream whose client goes away is cancelled
    stream = client.responses.create(model="scripted", input="x", stream=True)
    rid, events = read_deltas(stream, 3)
    stream.close()
    final = wait_for(
        lambda: (r := client.responses.retrieve(rid)).status != "in_progress" and r,
        what="the cancel after disconnect",
    )
    assert final.status == "cancelled"
    assert final.usage.output_tokens == server.trace(rid)["produced"] >= 3
    text = final.output[0].content[0].text
    assert text.startswith(
        "".join(e.delta for e in events if e.type == "response.output_text.delta")
    )


def test_cancel_foreground_by_id_from_another_client(server, client) -> None:  # type: ignore[no-untyped-def]
    # contract §3.8: beyond OpenAI, a stored in-flight foreground response is cancellable
    stream = client.responses.create(model="scripted", input="x", stream=True)
    rid, _ = read_deltas(stream, 2)
    with server.client() as other:
        reply = other.responses.cancel(rid)
    assert reply.status == "cancelled"
    events = list(stream)
    assert events[-1].type == "response.failed"
    assert events[-1].response.usage == reply.usage


def test_cancel_while_queued_never_runs(make_server) -> None:  # type: ignore[no-untyped-def]
    # contract §1 (queued → cancelled): the run never starts, usage is zero
    server = make_server()
    client = server.client()
    response = client.responses.create(model="scripted", input="x", background=True)
    reply = client.responses.cancel(response.id)
    assert reply.status == "cancelled"
    assert reply.usage is not None
    assert reply.usage.output_tokens == 0
    assert client.responses.retrieve(response.id).status == "cancelled"


def test_max_output_tokens_ends_incomplete(client) -> None:  # type: ignore[no-untyped-def]
    # contract §1.3
    response = client.responses.create(model="scripted", input="x", max_output_tokens=7)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 7
    assert len(response.output_text.split()) == 7


def test_engine_failure_ends_failed_with_error_event(server) -> None:  # type: ignore[no-untyped-def]
    # contract §6.1: an `error` event with flat and nested fields, then response.failed
    with httpx.stream(
        "POST",
        f"{server.base_url}/responses",
        timeout=10,
        json={"model": "scripted", "input": "FAIL_AT=3", "stream": True},
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    import json

    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    error, failed = events[-2], events[-1]
    assert error["type"] == "error" and error["code"] == "server_error"
    assert error["error"]["message"] == error["message"]
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "server_error"
    assert failed["response"]["usage"]["output_tokens"] == 3


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
def test_restart_keeps_responses_and_ends_lost_runs(make_server, how: str) -> None:  # type: ignore[no-untyped-def]
    # contract §6.2, §4.5: logs survive; a run lost with its process ends `failed`
    server = make_server("--lease-timeout", "1.5")
    client = server.client()
    done = client.responses.create(model="scripted", input="x", max_output_tokens=3)
    done_log = list(client.responses.retrieve(done.id, stream=True))
    stream = client.responses.create(model="scripted", input="x", background=True, stream=True)
    rid, _ = read_deltas(stream, 3)
    server.stop(signal.SIGTERM if how == "graceful" else signal.SIGKILL)
    server.start()
    client = server.client()
    assert client.responses.retrieve(done.id).model_dump() == done.model_dump()
    assert [e.model_dump() for e in client.responses.retrieve(done.id, stream=True)] == [
        e.model_dump() for e in done_log
    ]
    # The lost run ends within the lease timeout; a resumed stream ends properly.
    resumed = raw_events(server, rid, starting_after=2)
    error, terminal = resumed[-2], resumed[-1]
    assert error["type"] == "error" and error["code"] == "server_error"
    assert terminal["type"] == "response.failed"
    assert terminal["response"]["status"] == "failed"
    assert terminal["response"]["error"]["code"] == "server_error"
    full = raw_events(server, rid)
    assert [e["sequence_number"] for e in full] == list(range(len(full)))
    assert full[3:] == resumed
    deltas = sum(e["type"] == "response.output_text.delta" for e in full)
    assert terminal["response"]["usage"]["output_tokens"] == deltas >= 3
    assert client.responses.retrieve(rid).status == "failed"


@pytest.mark.anyio
async def test_cancel_racing_completion(make_server) -> None:  # type: ignore[no-untyped-def]
    # contract §1.1, §3.7, §3.9: randomized cancel times around the natural end
    import asyncio
    import os
    import random

    seed = int(os.environ.get("TETHER_SEED", random.randrange(2**32)))
    print(f"seed={seed} (rerun with TETHER_SEED={seed})")
    rng = random.Random(seed)
    server = make_server("--scripted-length", "10", "--scripted-rate", "100")

    async def one(client: openai.AsyncOpenAI, delay: float) -> None:
        stream = await client.responses.create(
            model="scripted", input="x", background=True, stream=True
        )
        events = []
        cancel: Any = None
        async for event in stream:
            events.append(event)
            if event.type == "response.created":
                await asyncio.sleep(delay)  # the random moment of the cancel
                try:
                    cancel = await client.responses.cancel(event.response.id)
                except openai.BadRequestError as exc:
                    cancel = exc
        rid = events[0].response.id
        terminal = events[-1]
        assert sum(e.type in ("response.completed", "response.failed") for e in events) == 1
        final = await client.responses.retrieve(rid)
        if isinstance(cancel, openai.BadRequestError):  # completion won
            assert final.status == "completed" and terminal.type == "response.completed"
        else:  # the cancel won, whatever the engine had produced by then
            assert cancel.status == final.status == terminal.response.status == "cancelled"
            assert cancel.usage == final.usage == terminal.response.usage
        deltas = sum(e.type == "response.output_text.delta" for e in events)
        assert final.usage.output_tokens == deltas == produced(rid)

    def produced(rid: str) -> object:
        try:
            return server.trace(rid)["produced"]
        except httpx.HTTPStatusError as exc:  # the cancel came before a run claimed it:
            assert exc.response.status_code == 404  # the engine never saw it
            return 0

    async with server.async_client() as client:
        await asyncio.gather(*(one(client, rng.uniform(0, 0.15)) for _ in range(30)))
