"""The `responses` engine: tether in front of a Responses API upstream.

The real upstream is another tether (scripted engine, 100 tokens/s), so both ends of a
cancel can be checked: the outer reply, the inner response's state and the inner
engine's own trace. The fault-injecting fake covers an upstream that ignores cancels,
a broken stream that must be resumed, and an upstream failure. The engine is tested by
itself too (its steps through `emit`, cancelled by a scope) against the fake.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from engine_steps import after_tokens, collect, tokens
from tether.config import UpstreamConfig
from tether.engines.base import (
    Delta,
    EngineError,
    Finished,
    Generation,
    Message,
    PromptRead,
    Report,
)
from tether.engines.responses import ResponsesEngine
from tether.engines.scripted import scripted_text
from upstreams import FakeUpstream, fake_upstream

from conftest import Server, raw_events, read_deltas

DONE_TYPES = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """(outer, inner): the outer tether's model `relay` is the inner's `scripted`."""
    tmp = tmp_path_factory.mktemp("pair")
    inner = Server(tmp / "inner.db", ["--engine", "scripted", "--debug-routes"])
    inner.start()
    outer = Server(
        tmp / "outer.db",
        [
            "--engine",
            "none",
            "--upstream",
            f"relay=responses+{inner.base_url},upstream_model=scripted",
        ],
    )
    try:
        outer.start()
        yield outer, inner
    finally:
        outer.stop()
        inner.stop()


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


@pytest.fixture
def via_fake(make_server: Any, fake: FakeUpstream) -> Server:
    server: Server = make_server(
        "--upstream", f"fake=responses+{fake.url},retries=2", engine="none"
    )
    return server


def tether_notes(response: Any) -> dict[str, Any]:
    assert response.usage is not None and response.usage.model_extra is not None
    notes: dict[str, Any] = response.usage.model_extra["tether"]
    return notes


def check_cancelled_stream(events: list[Any]) -> None:
    # contract §3.4
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    tail = [e.type for e in events[events.index(deltas[-1]) + 1 :]]
    assert tail == [*DONE_TYPES, "response.failed"], tail
    assert events[-1].response.status == "cancelled" and events[-1].response.error is None


# --- the engine by itself, against the fake upstream --------------------------------


@contextlib.asynccontextmanager
async def responses_engine(fake: FakeUpstream) -> AsyncIterator[ResponsesEngine]:
    engine = ResponsesEngine(UpstreamConfig(model="fake", url=fake.url, kind="responses"))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def ask(text: str, background: bool = True) -> Generation:
    return Generation("resp_1", "fake", [Message("user", text)], background=background)


async def post_gone(fake: FakeUpstream) -> bool:
    return await anyio.to_thread.run_sync(fake.calls[0].gone.wait, 5)


@pytest.mark.anyio
async def test_engine_steps_end_with_the_upstream_usage(fake: FakeUpstream) -> None:
    async with responses_engine(fake) as engine:
        got = await collect(engine, ask("LENGTH=3 go"))
    assert isinstance(got.steps[0], PromptRead)
    assert got.steps[1:] == [
        Delta("alpha"),
        Delta(" bravo"),
        Delta(" charlie"),
        Report(
            7,
            3,
            {
                "upstream_response_id": fake.calls[0].id,
                "input_tokens": "upstream",
                "output_tokens": "upstream",
            },
        ),
        Finished("stop"),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("background", [True, False], ids=["background", "foreground"])
async def test_engine_cancel_closes_the_stream_and_cancels_upstream(
    fake: FakeUpstream, background: bool
) -> None:
    async with responses_engine(fake) as engine:
        got = await collect(
            engine, ask("RATE=50 LENGTH=300 go", background), after_tokens(4), "task"
        )
        assert await post_gone(fake)
    post = fake.calls[0]
    assert fake.cancels == [post.id]
    assert got.cancel_caught and got.finished is None and got.stop_seconds < 1.0
    assert tokens(got.after_cancel) <= 1
    report = got.steps[-1]
    assert isinstance(report, Report) and report.input_tokens == 7
    assert report.output_tokens is None  # the usage stays what was relayed
    assert report.notes["upstream_stop"] == "confirmed"
    assert report.notes["upstream_output_tokens"] >= tokens(got.steps)


@pytest.mark.anyio
async def test_engine_cancel_of_an_upstream_ignoring_it(fake: FakeUpstream) -> None:
    async with responses_engine(fake) as engine:
        got = await collect(
            engine, ask("IGNORE_CANCEL RATE=100 LENGTH=300 go"), after_tokens(4), "inside"
        )
        assert await post_gone(fake)
    assert fake.cancels == [fake.calls[0].id] and got.stop_seconds < 2.0
    assert got.text == "alpha bravo charlie delta"  # the step `emit` did not take, too
    report = got.steps[-1]
    assert isinstance(report, Report) and report.notes["upstream_stop"] == "unconfirmed"
    assert [type(s) for s in got.after_cancel] == [Delta, Report]


@pytest.mark.anyio
async def test_engine_resumes_a_broken_background_stream(fake: FakeUpstream) -> None:
    async with responses_engine(fake) as engine:
        got = await collect(engine, ask("BREAK_AT=3 LENGTH=8 go"))
    assert got.text == "alpha bravo charlie delta echo foxtrot golf hotel"
    assert got.finished == Finished("stop")
    assert len([c for c in fake.calls if c.body == {}]) == 1  # one GET ?stream=true


@pytest.mark.anyio
async def test_engine_upstream_failure(fake: FakeUpstream) -> None:
    async with responses_engine(fake) as engine:
        with pytest.raises(EngineError, match="injected failure"):
            await collect(engine, ask("FAIL_AT=2 go"))
        with pytest.raises(EngineError) as refused:
            await collect(engine, ask("STATUS=400 go"))
    assert refused.value.code == "invalid_prompt" and fake.cancels == []


# --- through a whole server -----------------------------------------------------------


def test_create_through_tether_of_tether(pair: tuple[Server, Server]) -> None:
    outer, inner = pair
    with outer.client() as client, inner.client() as upstream:
        reply = client.responses.create(model="relay", input="hello there", max_output_tokens=5)
        assert reply.status == "incomplete" and reply.output_text == scripted_text(5)
        notes = tether_notes(reply)
        assert notes["output_tokens"] == notes["input_tokens"] == "upstream"
        inner_reply = upstream.responses.retrieve(notes["upstream_response_id"])
    assert inner_reply.usage is not None and reply.usage is not None
    assert reply.usage.input_tokens == inner_reply.usage.input_tokens
    assert reply.usage.output_tokens == inner_reply.usage.output_tokens == 5


def test_background_stream_and_resume_across_two(pair: tuple[Server, Server]) -> None:
    outer, inner = pair
    with outer.client() as client:
        stream = client.responses.create(
            model="relay", input="go", background=True, stream=True, max_output_tokens=40
        )
        rid, events = read_deltas(stream, 5)
        seq = events[-1].sequence_number
        # Resume the outer log mid-run (contract §4.4), and read both to the end.
        with client.responses.retrieve(rid, stream=True, starting_after=seq) as resumed:
            rest = list(resumed)
        events += list(stream)
        final = client.responses.retrieve(rid)
    assert rest[0].sequence_number == seq + 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in rest] == [e.type for e in events[seq + 1 :]]
    assert final.status == "incomplete" and final.output_text == scripted_text(40)
    # The upstream response was a background one too, and it ended the same way.
    notes = tether_notes(final)
    with inner.client() as upstream:
        inner_final = upstream.responses.retrieve(notes["upstream_response_id"])
    assert inner_final.background is True and inner_final.output_text == final.output_text


@pytest.mark.parametrize("background", [True, False], ids=["background", "foreground"])
def test_cancel_across_two_stops_the_inner_engine(
    pair: tuple[Server, Server], background: bool
) -> None:
    outer, inner = pair
    with outer.client() as client, outer.client() as other:
        stream = client.responses.create(
            model="relay", input="tell me a story", background=background, stream=True
        )
        rid, events = read_deltas(stream, 5)
        reply = other.responses.cancel(rid)  # contract §3.8: by id, from another client
        replied = time.time()
        events += list(stream)
    assert reply.status == "cancelled"
    check_cancelled_stream(events)
    deltas = sum(e.type == "response.output_text.delta" for e in events)
    assert reply.usage is not None and reply.usage.output_tokens == deltas
    notes = tether_notes(reply)
    assert notes["upstream_stop"] == "confirmed"
    # The inner tether cancelled its response, and its engine stopped before the outer
    # reply: no token was generated after it (contract §3.3, across the two).
    inner_id = notes["upstream_response_id"]
    with inner.client() as upstream:
        inner_reply = upstream.responses.retrieve(inner_id)
    assert inner_reply.status == "cancelled"
    trace: Any = inner.trace(inner_id)
    assert trace["aborted_at"] is not None and not trace["finished"]
    assert all(t <= replied for t in trace["token_times"])
    assert inner_reply.usage is not None
    assert inner_reply.usage.output_tokens == trace["produced"]
    # Tokens the inner made but never relayed (one step in flight at most) are noted.
    assert notes["upstream_output_tokens"] == trace["produced"]
    assert deltas <= trace["produced"] <= deltas + 1


def test_upstream_ignoring_cancel_still_gives_the_contract(
    via_fake: Server, fake: FakeUpstream
) -> None:
    with via_fake.client() as client:
        stream = client.responses.create(
            model="fake", input="IGNORE_CANCEL RATE=100 LENGTH=300 go", background=True, stream=True
        )
        rid, events = read_deltas(stream, 4)
        started = time.monotonic()
        reply = client.responses.cancel(rid)
        took = time.monotonic() - started
        events += list(stream)
        again = client.responses.retrieve(rid)
    post = fake.calls[0]
    assert fake.cancels == [post.id]  # the upstream was asked...
    assert post.gone.wait(5)  # ...and its stream closed anyway
    assert took < 2.0
    assert reply.status == again.status == "cancelled"
    check_cancelled_stream(events)
    notes = tether_notes(reply)
    assert notes["upstream_stop"] == "unconfirmed"
    deltas = sum(e.type == "response.output_text.delta" for e in events)
    assert reply.usage is not None and again.usage is not None
    assert reply.usage.output_tokens == again.usage.output_tokens == deltas


def test_broken_background_stream_is_resumed_upstream(via_fake: Server, fake: FakeUpstream) -> None:
    with via_fake.client() as client:
        reply = client.responses.create(
            model="fake", input="BREAK_AT=3 LENGTH=8 go", background=True
        )
        rid = reply.id
    events = raw_events(via_fake, rid)
    final: Any = events[-1]["response"]
    assert final["status"] == "completed", final
    text = "".join(str(e["delta"]) for e in events if e["type"] == "response.output_text.delta")
    assert text == "alpha bravo charlie delta echo foxtrot golf hotel"
    resumes = [c for c in fake.calls if c.body == {}]  # the GET ?stream=true resumes
    assert len(resumes) == 1, "the engine did not resume the upstream stream"


def test_upstream_failure_and_errors(via_fake: Server, fake: FakeUpstream) -> None:
    with via_fake.client() as client:
        failed = client.responses.create(model="fake", input="FAIL_AT=2 go")
        refused = client.responses.create(model="fake", input="STATUS=400 go")
    assert failed.status == "failed" and failed.error is not None
    assert "injected failure" in failed.error.message and failed.output_text == "alpha bravo"
    assert refused.status == "failed" and refused.error is not None
    assert refused.error.code == "invalid_prompt"


def test_forwarded_request_shape(via_fake: Server, fake: FakeUpstream) -> None:
    tools: Any = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    with via_fake.client() as client:
        first = client.responses.create(model="fake", input="LENGTH=2 hi", instructions="terse")
        client.responses.create(
            model="fake",
            input="LENGTH=1 more",
            tools=tools,
            previous_response_id=first.id,
            max_output_tokens=30,
            text={"format": {"type": "json_object"}},
        )
    body = fake.last().body
    # The whole history goes upstream as items; never the upstream's own ids.
    assert body["input"] == [
        {"type": "message", "role": "user", "content": "LENGTH=2 hi"},
        {"type": "message", "role": "assistant", "content": "alpha bravo"},
        {"type": "message", "role": "user", "content": "LENGTH=1 more"},
    ]
    assert "previous_response_id" not in body
    assert body["tools"] == [
        {
            "type": "function",
            "name": "f",
            "description": None,
            "parameters": {"type": "object"},
            "strict": True,
        }
    ]
    assert body["text"] == {"format": {"type": "json_object"}}
    assert body["max_output_tokens"] == 30 and body["stream"] is True
    assert fake.calls[0].body["input"][0] == {
        "type": "message",
        "role": "system",
        "content": "terse",
    }


def test_function_call_round_trip_through_a_responses_upstream(
    via_fake: Server, fake: FakeUpstream
) -> None:
    tools: Any = [
        {
            "type": "function",
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {}},
        }
    ]
    with via_fake.client() as client:
        first = client.responses.create(model="fake", input="CALL=get_weather go", tools=tools)
        call = first.output[0]
        assert call.type == "function_call" and call.name == "get_weather"
        assert call.arguments == '{"city": "Paris"}' and call.call_id == "call_fake1"
        client.responses.create(
            model="fake",
            previous_response_id=first.id,
            tools=tools,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        )
    assert fake.last().body["input"][-2:] == [
        {
            "type": "function_call",
            "call_id": "call_fake1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_fake1", "output": "sunny"},
    ]
