"""The scripted engine: deterministic text, natural end, budget, abort within one step."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jsonschema
import pytest

from tether.engines.base import (
    Abort,
    Delta,
    EngineError,
    Finished,
    Generation,
    Message,
    PromptRead,
    ToolCall,
    ToolCallDelta,
    ToolCallSpec,
)
from tether.engines.scripted import ScriptedEngine, scripted_text

pytestmark = pytest.mark.anyio


def gen(text: str = "hello there", budget: int | None = None) -> Generation:
    return Generation("resp_1", "scripted", [Message("user", text)], budget)


async def test_natural_end_and_exact_counts() -> None:
    engine = ScriptedEngine(rate=0, length=30)
    steps = [s async for s in engine.generate(gen(), Abort())]
    assert steps[0] == PromptRead(2)
    deltas = [s for s in steps if isinstance(s, Delta)]
    assert len(deltas) == 30 and all(d.tokens == 1 for d in deltas)
    assert "".join(d.text for d in deltas) == scripted_text(30)
    assert steps[-1] == Finished("stop")
    assert engine.traces["resp_1"].produced == 30


async def test_budget_ends_with_length() -> None:
    engine = ScriptedEngine(rate=0, length=30)
    steps = [s async for s in engine.generate(gen(budget=4), Abort())]
    assert steps[-1] == Finished("length") and len(steps) == 6


async def test_abort_stops_within_one_step() -> None:
    engine = ScriptedEngine(rate=50, length=1000)
    abort = Abort()
    seen = 0
    async for step in engine.generate(gen(), abort):
        if isinstance(step, Delta):
            seen += 1
            if seen == 3:
                abort.set()
                aborted = time.time()
        assert not isinstance(step, Finished)
    trace = engine.traces["resp_1"]
    assert trace.produced == seen == 3
    assert trace.aborted_at is not None and trace.aborted_at - aborted < 0.02 + 0.5


async def test_abort_interrupts_the_wait_for_the_next_token() -> None:
    engine = ScriptedEngine(rate=0.5, length=10)  # two seconds per token
    abort = Abort()
    steps = engine.generate(gen(), abort)
    assert isinstance(await anext(steps), PromptRead)
    asyncio.get_running_loop().call_later(0.05, abort.set)
    started = time.monotonic()
    rest = [s async for s in steps]
    assert rest == [] and time.monotonic() - started < 1.0


async def test_failure_marker_raises() -> None:
    engine = ScriptedEngine(rate=0, length=10)
    with pytest.raises(EngineError):
        _ = [s async for s in engine.generate(gen("FAIL_AT=2"), Abort())]
    assert engine.traces["resp_1"].produced == 2


SHELL = {"type": "function", "name": "exec_command", "description": "Run a command.",
         "parameters": {"type": "object", "properties": {"cmd": {"type": "array"}}}}
DIRECTIVE = 'Run it. CALL=exec_command:{"cmd":["echo","hi"]}'


def tool_gen(messages: list[Message], choice: object = "auto") -> Generation:
    return Generation("resp_1", "scripted", messages, None, tools=[SHELL], tool_choice=choice)


async def test_call_directive_streams_the_call() -> None:
    engine = ScriptedEngine(rate=0, length=30)
    steps = [s async for s in engine.generate(tool_gen([Message("user", DIRECTIVE)]), Abort())]
    assert isinstance(steps[0], PromptRead)
    assert steps[1] == ToolCall(0, steps[1].call_id, "exec_command")  # type: ignore[union-attr]
    pieces = [s for s in steps if isinstance(s, ToolCallDelta)]
    assert "".join(p.arguments for p in pieces) == '{"cmd":["echo","hi"]}'
    assert all(p.tokens == 1 for p in pieces) and len(pieces) > 1
    assert steps[-1] == Finished("stop")
    assert engine.traces["resp_1"].produced == len(pieces)


async def test_after_a_tool_output_it_answers_with_text() -> None:
    engine = ScriptedEngine(rate=0, length=5)
    turns = [Message("user", DIRECTIVE),
             Message("assistant", "", [ToolCallSpec("call_1", "exec_command", "{}")]),
             Message("tool", "hi", call_id="call_1")]
    steps = [s async for s in engine.generate(tool_gen(turns), Abort())]
    assert [type(s) for s in steps] == [PromptRead] + [Delta] * 5 + [Finished]


@pytest.mark.parametrize("choice", ["none", {"type": "allowed_tools", "mode": "auto",
                                             "tools": [{"type": "function", "name": "x"}]}])
async def test_no_call_when_the_tool_is_not_allowed(choice: object) -> None:
    engine = ScriptedEngine(rate=0, length=3)
    steps = [s async for s in engine.generate(tool_gen([Message("user", DIRECTIVE)], choice),
                                              Abort())]
    assert not any(isinstance(s, ToolCall) for s in steps)


async def test_forced_choice_calls_without_a_directive() -> None:
    engine = ScriptedEngine(rate=0, length=3)
    named = {"type": "function", "name": "exec_command"}
    for choice in ("required", named):
        steps = [s async for s in engine.generate(tool_gen([Message("user", "hi")], choice),
                                                  Abort())]
        calls = [s for s in steps if isinstance(s, ToolCall)]
        args = "".join(s.arguments for s in steps if isinstance(s, ToolCallDelta))
        assert [c.name for c in calls] == ["exec_command"] and args == "{}"


async def test_json_formats_give_valid_json() -> None:
    engine = ScriptedEngine(rate=0, length=200)
    schema = {"type": "object", "required": ["name", "age", "tags", "kind"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                             "tags": {"type": "array", "items": {"type": "string"}},
                             "kind": {"enum": ["a", "b"]}}, "additionalProperties": False}
    for fmt in ({"type": "json_schema", "name": "x", "schema": schema},
                {"type": "json_object"}):
        req = Generation("resp_1", "scripted", [Message("user", "hi")], None, text_format=fmt)
        steps = [s async for s in engine.generate(req, Abort())]
        value = json.loads("".join(s.text for s in steps if isinstance(s, Delta)))
        jsonschema.validate(value, fmt.get("schema", {"type": "object"}))
        assert steps[-1] == Finished("stop")


def test_multi_step_tool_loop_through_the_sdk(make_server) -> None:  # type: ignore[no-untyped-def]
    """An agent loop: the model calls, the client runs the tool and sends its output,
    the model answers; twice, then the turn ends with text."""
    server = make_server("--scripted-rate", "0", "--scripted-length", "6")
    tools: list[Any] = [SHELL | {"strict": False}]
    with server.client() as client:
        first = client.responses.create(model="scripted", input=DIRECTIVE, tools=tools)
        assert first.status == "completed"
        [call] = first.output
        assert call.type == "function_call" and call.name == "exec_command"
        assert json.loads(call.arguments) == {"cmd": ["echo", "hi"]}
        assert first.usage.output_tokens == len(call.arguments) // 4 + 1
        answer = client.responses.create(
            model="scripted", previous_response_id=first.id, tools=tools,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "hi"}])
        assert answer.status == "completed" and answer.output_text == scripted_text(6)
        # The user asks again (the directive is still in the conversation): a new call,
        # streamed with its events, then the loop ends the same way.
        with client.responses.stream(model="scripted", previous_response_id=answer.id,
                                     tools=tools, input="Once more.") as stream:
            kinds = [e.type for e in stream]
            second = stream.get_final_response()
        assert "response.function_call_arguments.delta" in kinds
        [call2] = second.output
        assert call2.type == "function_call" and call2.call_id != call.call_id
        last = client.responses.create(
            model="scripted", previous_response_id=second.id, tools=tools,
            input=[{"type": "function_call_output", "call_id": call2.call_id,
                    "output": "hi"}])
        assert last.output_text == scripted_text(6)


def test_input_tokens_without_an_engine_tokenizer(make_server) -> None:  # type: ignore[no-untyped-def]
    """An engine that cannot count gets tether's estimate (about 4 characters a token)."""
    server = make_server()
    with server.client() as client:
        short = client.responses.input_tokens.count(model="scripted", input="x" * 40)
        long = client.responses.input_tokens.count(model="scripted", input="x" * 400,
                                                   instructions="y" * 40)
    assert short.object == "response.input_tokens" and short.input_tokens == 11
    assert long.input_tokens == 112
