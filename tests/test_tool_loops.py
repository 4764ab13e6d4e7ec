"""Cancel still means stop in tool loops (issue 13): a cancel by id (the openai SDK's
`responses.cancel`) while the model is producing a function call's arguments, and
between the two steps of a tool loop (the second step created, its prompt not yet read).

Every stream of the response (the one that created it and a reader that joined) ends
with `response.failed` (status `cancelled`), the usage counts exactly what the engine
produced and the log holds, and nothing is generated after the cancel's reply.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from upstreams import FakeUpstream, fake_upstream

from conftest import Server, raw_events
from test_codex import call_directive

TOOLS: Any = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Look a word up.",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string"}},
            "required": ["word"],
            "additionalProperties": False,
        },
    }
]
DELTAS = {"response.output_text.delta", "response.function_call_arguments.delta"}
LONG_WORD = "-".join(["supercalifragilistic"] * 20)  # arguments of many token steps


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


class Reader(threading.Thread):
    """A second reader of the response's stream (`GET ?stream=true`), from the start."""

    def __init__(self, server: Server, rid: str) -> None:
        super().__init__(daemon=True)
        self.server, self.rid = server, rid
        self.events: list[dict[str, Any]] = []

    def run(self) -> None:
        self.events = raw_events(self.server, self.rid)


@dataclass
class Cancelled:
    """A response cancelled by id mid-stream: the cancel's reply, when it was sent and
    when it came back, the creating stream's events and a second reader's."""

    rid: str
    reply: Any
    called: float
    replied: float
    events: list[Any]
    reader: Reader

    def check_stopped(self) -> int:
        """Both streams end `response.failed` (cancelled); the reply's usage and the
        terminal events' are the log's count of output deltas: that count."""
        assert self.reply.status == "cancelled"
        last, read = self.events[-1], self.reader.events[-1]
        assert last.type == "response.failed" and read["type"] == "response.failed"
        assert last.response.status == read["response"]["status"] == "cancelled"
        assert last.response.error is None
        deltas = sum(e["type"] in DELTAS for e in self.reader.events)
        assert self.reply.usage.output_tokens == deltas
        assert last.response.usage.output_tokens == deltas
        assert read["response"]["usage"]["output_tokens"] == deltas
        return deltas


def cancel_at(server: Server, stream: Any, ready: str) -> Cancelled:
    """Read `stream` until an event of type `ready`, cancel the response by id (another
    reader follows it from its creation on), read the rest."""
    rid, events = "", []
    reader: Reader | None = None
    for event in stream:
        events.append(event)
        if event.type == "response.created":
            rid = event.response.id
            reader = Reader(server, rid)
            reader.start()
        if event.type == ready:
            break
    assert rid and reader is not None and events[-1].type == ready, [e.type for e in events]
    with server.client() as client:
        called = time.time()
        reply = client.responses.cancel(rid)
        replied = time.time()
    events += list(stream)
    reader.join(30)
    assert not reader.is_alive(), "the second reader's stream did not end"
    return Cancelled(rid, reply, called, replied, events, reader)


def check_call_closed_incomplete(cancelled: Cancelled) -> None:
    """contract §3.4 for a function_call item: its `.done` events, status incomplete."""
    events = cancelled.events
    [item] = [i for i in cancelled.reply.output if i.type == "function_call"]
    assert item.status == "incomplete" and item.name == "lookup"
    assert [e.type for e in events[-3:]] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.failed",
    ]
    assert events[-3].name == "lookup"


def check_trace(trace: dict[str, Any], produced: int, replied: float) -> None:
    """The engine produced exactly what was counted, nothing after the cancel's reply,
    and saw the abort before replying."""
    assert trace["produced"] == produced
    assert not any(t > replied for t in trace["token_times"])
    assert trace["aborted_at"] is not None and trace["aborted_at"] <= replied


# --- while the model produces a function call's arguments --------------------------------------


def test_cancel_during_the_arguments_on_the_scripted_engine(make_server: Any) -> None:
    server: Server = make_server("--scripted-rate", "20")
    prompt = f"{call_directive('lookup', {'word': LONG_WORD})} look it up"
    with server.client() as client:
        stream = client.responses.create(
            model="scripted", input=prompt, tools=TOOLS, background=True, stream=True
        )
        cancelled = cancel_at(server, stream, "response.function_call_arguments.delta")
    produced = cancelled.check_stopped()
    check_call_closed_incomplete(cancelled)
    check_trace(server.trace(cancelled.rid), produced, cancelled.replied)


def test_cancel_during_the_arguments_through_a_chat_upstream(
    make_server: Any, fake: FakeUpstream
) -> None:
    server: Server = make_server("--upstream", f"fake={fake.url}", engine="none")
    with server.client() as client:
        stream = client.responses.create(
            model="fake",
            input="CALL=lookup STALL_AFTER=1 go",
            tools=TOOLS,
            background=True,
            stream=True,
        )
        cancelled = cancel_at(server, stream, "response.function_call_arguments.delta")
    assert cancelled.check_stopped() == 1
    check_call_closed_incomplete(cancelled)
    call = fake.calls[0]
    assert call.gone.wait(5), "the upstream connection was not closed"
    assert call.generated_after(cancelled.called) == 0  # it stalled after the first chunk


# --- between two steps of a tool loop ----------------------------------------------------------


def first_step(server: Server, model: str, prompt: str) -> tuple[str, Any]:
    """Step one of a tool loop: a completed function call, (response id, the call)."""
    with server.client() as client:
        first = client.responses.create(model=model, input=prompt, tools=TOOLS)
    assert first.status == "completed", first
    [call] = [i for i in first.output if i.type == "function_call"]
    assert call.name == "lookup"
    return first.id, call


def second_step(server: Server, model: str, first_id: str, call: Any, output: str) -> Cancelled:
    """Step two, given the call's output, cancelled by id as soon as it is created."""
    with server.client() as client:
        stream = client.responses.create(
            model=model,
            previous_response_id=first_id,
            tools=TOOLS,
            background=True,
            stream=True,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": output}],
        )
        return cancel_at(server, stream, "response.created")


def test_cancel_between_two_steps_on_the_scripted_engine(make_server: Any) -> None:
    server: Server = make_server("--scripted-rate", "20", "--scripted-length", "50")
    first_id, call = first_step(
        server, "scripted", f"{call_directive('lookup', {'word': 'tether'})} look it up"
    )
    # The tool's output makes the second step spend 5 s reading its prompt: the cancel
    # lands after it was created, before it produced anything.
    cancelled = second_step(server, "scripted", first_id, call, "PREFILL=5 a leash")
    assert cancelled.check_stopped() == 0
    assert cancelled.reply.output == []
    trace = server.trace(cancelled.rid)
    check_trace(trace, 0, cancelled.replied)
    assert trace["prompt_read_at"] is None
    with server.client() as client:
        assert client.responses.retrieve(first_id).status == "completed"  # step one stays


def test_cancel_between_two_steps_through_a_chat_upstream(
    make_server: Any, fake: FakeUpstream
) -> None:
    server: Server = make_server("--upstream", f"fake={fake.url}", engine="none")
    first_id, call = first_step(server, "fake", "CALL=lookup RATE=5 go")
    # The upstream answers a tool output in text, a word every 200 ms: the cancel lands
    # before the end (the call itself is streamed at once).
    cancelled = second_step(server, "fake", first_id, call, "a leash")
    produced = cancelled.check_stopped()
    second = fake.calls[-1]
    assert second.body["messages"][-1]["role"] == "tool"
    assert second.gone.wait(5), "the upstream connection was not closed"
    assert second.generated_after(cancelled.replied) == 0
    assert produced <= len(second.generated)  # a word in flight at the cancel is dropped
