"""The scripted engine: deterministic text, natural end, budget, abort within one step."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import jsonschema
import pytest

from engine_steps import after_tokens, collect, tokens
from tether.engines.base import (
    Delta,
    EngineError,
    Finished,
    Generation,
    Message,
    PromptRead,
    ReasoningDelta,
    Step,
    ToolCall,
    ToolCallDelta,
    ToolCallSpec,
    Traced,
)
from tether.engines.router import Router
from tether.engines.scripted import ScriptedEngine, scripted_text

pytestmark = pytest.mark.anyio


def gen(text: str = "hello there", budget: int | None = None, rid: str = "resp_1") -> Generation:
    return Generation(rid, "scripted", [Message("user", text)], budget)


async def steps_of(engine: ScriptedEngine, request: Generation) -> list[Step]:
    return (await collect(engine, request)).steps


async def test_natural_end_and_exact_counts() -> None:
    engine = ScriptedEngine(rate=0, length=30)
    steps = await steps_of(engine, gen())
    assert steps[0] == PromptRead(2)
    deltas = [s for s in steps if isinstance(s, Delta)]
    assert len(deltas) == 30 and all(d.tokens == 1 for d in deltas)
    assert "".join(d.text for d in deltas) == scripted_text(30)
    assert steps[-1] == Finished("stop")
    assert engine.traces["resp_1"].produced == 30


async def test_budget_ends_with_length() -> None:
    engine = ScriptedEngine(rate=0, length=30)
    steps = await steps_of(engine, gen(budget=4))
    assert steps[-1] == Finished("length") and len(steps) == 6


async def test_cancel_stops_at_the_next_token_boundary() -> None:
    engine = ScriptedEngine(rate=50, length=1000)
    got = await collect(engine, gen(), after_tokens(3))
    assert got.cancel_caught and got.after_cancel == [] and got.finished is None
    trace = engine.traces["resp_1"]
    assert trace.produced == tokens(got.steps) == 3 and not trace.finished
    assert trace.aborted_at is not None and got.stop_seconds < 0.5


async def test_full_speed_cancel_lands_where_the_engine_let_others_run() -> None:
    # At full speed the engine pays no per-token check: another task can cancel it only
    # while it is suspended (every 64 tokens), and the cancel lands right there.
    engine = ScriptedEngine(rate=0, length=1000)
    got = await collect(engine, gen(), after_tokens(3), mode="task")
    assert got.cancel_caught and got.after_cancel == [] and got.finished is None
    trace = engine.traces["resp_1"]
    assert trace.produced == tokens(got.steps) == 63 and not trace.finished
    assert trace.aborted_at is not None


async def test_cancel_from_another_task_stops_within_one_step() -> None:
    engine = ScriptedEngine(rate=50, length=1000)
    got = await collect(engine, gen(), after_tokens(3), mode="task")
    assert got.cancel_caught and got.finished is None
    assert tokens(got.after_cancel) <= 1  # the one step in flight when the cancel came
    assert engine.traces["resp_1"].produced == tokens(got.steps)


async def test_cancel_interrupts_the_wait_for_the_next_token() -> None:
    engine = ScriptedEngine(rate=0.5, length=10)  # two seconds per token
    got = await collect(engine, gen(), lambda s: isinstance(s[-1], PromptRead), mode="task")
    assert got.steps == [PromptRead(2)] and got.stop_seconds < 1.0


async def test_cancel_landing_in_emit_still_delivers_that_token() -> None:
    """The cancel lands in `emit`, which did not take the step: the engine emits it in its
    shielded cleanup, once; never a Finished after it."""
    engine = ScriptedEngine(rate=0, length=10)
    got = await collect(engine, gen(), after_tokens(3), mode="inside")
    assert got.cancel_caught and got.text == scripted_text(3)
    assert tokens(got.after_cancel) == 1 and got.finished is None
    assert engine.traces["resp_1"].produced == 3


async def test_cancel_while_reading_the_prompt() -> None:
    engine = ScriptedEngine(rate=0, length=3)
    begun = time.monotonic()
    with anyio.move_on_after(0.1) as scope:  # nothing is emitted before the prompt is read
        await collect(engine, gen("PREFILL=5"))
    assert scope.cancelled_caught and time.monotonic() - begun < 1.0
    trace = engine.traces["resp_1"]
    assert trace.prompt_read_at is None and trace.aborted_at is not None


async def test_cancel_after_the_last_token_ends_without_finished() -> None:
    engine = ScriptedEngine(rate=0, length=3)
    got = await collect(engine, gen("LINGER=5"), after_tokens(3), mode="task")
    assert got.finished is None and tokens(got.steps) == 3 and got.stop_seconds < 1.0
    trace = engine.traces["resp_1"]
    assert trace.aborted_at is not None and not trace.finished


async def test_failure_marker_raises() -> None:
    engine = ScriptedEngine(rate=0, length=10)
    with pytest.raises(EngineError):
        await collect(engine, gen("FAIL_AT=2"))
    assert engine.traces["resp_1"].produced == 2


async def test_think_directive_reasons_before_answering() -> None:
    engine = ScriptedEngine(rate=0, length=5)
    steps = await steps_of(engine, gen("THINK=4 go"))
    assert [type(s) for s in steps] == [PromptRead] + [ReasoningDelta] * 4 + [Delta] * 5 + [
        Finished
    ]
    thoughts = [s for s in steps if isinstance(s, ReasoningDelta)]
    assert "".join(t.text for t in thoughts) == scripted_text(4)
    assert all(t.tokens == 1 for t in thoughts)
    assert "".join(s.text for s in steps if isinstance(s, Delta)) == scripted_text(5)
    assert steps[-1] == Finished("stop") and engine.traces["resp_1"].produced == 9


@pytest.mark.parametrize(
    ("budget", "thoughts", "answer"), [(3, 3, 0), (4, 4, 0), (6, 4, 2), (9, 4, 5)]
)
async def test_thinking_spends_the_output_budget(budget: int, thoughts: int, answer: int) -> None:
    engine = ScriptedEngine(rate=0, length=5)
    steps = await steps_of(engine, gen("THINK=4 go", budget=budget))
    assert sum(isinstance(s, ReasoningDelta) for s in steps) == thoughts
    assert sum(isinstance(s, Delta) for s in steps) == answer
    assert steps[-1] == Finished("stop" if budget == 9 else "length")


async def test_cancel_while_thinking_stops_at_the_next_token_boundary() -> None:
    engine = ScriptedEngine(rate=50, length=1000)
    got = await collect(
        engine,
        gen("THINK=500 go"),
        lambda steps: sum(isinstance(s, ReasoningDelta) for s in steps) >= 3,
    )
    assert got.cancel_caught and got.after_cancel == [] and got.finished is None
    assert [type(s) for s in got.steps] == [PromptRead] + [ReasoningDelta] * 3
    assert engine.traces["resp_1"].produced == 3 and got.stop_seconds < 0.5


async def test_thinking_then_a_call() -> None:
    engine = ScriptedEngine(rate=0, length=30)
    steps = await steps_of(engine, tool_gen([Message("user", "THINK=2 " + DIRECTIVE)]))
    kinds = [type(s) for s in steps]
    assert kinds[:4] == [PromptRead, ReasoningDelta, ReasoningDelta, ToolCall]
    assert kinds[-1] is Finished and ToolCallDelta in kinds


async def test_router_waits_for_a_slot_under_the_scope() -> None:
    """A run waiting for its engine's slot is cancelled at once, having produced nothing;
    the router shows its engines' traces."""
    engine = ScriptedEngine(rate=0, length=2)
    engine.concurrency = 1
    router = Router([engine])
    assert isinstance(router, Traced) and isinstance(engine, Traced)
    started = anyio.Event()
    first: list[Step] = []

    async def hold() -> None:
        async def emit(step: Step) -> None:
            first.append(step)
            started.set()

        await router.generate(gen("LINGER=0.5", rid="resp_first"), emit)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await started.wait()
        begun = time.monotonic()
        with anyio.move_on_after(0.05) as waiting:
            await collect(router, gen(rid="resp_second"))
        assert waiting.cancelled_caught and time.monotonic() - begun < 0.4
    assert first[-1] == Finished("stop")
    assert "resp_second" not in router.traces and "resp_first" in router.traces


SHELL = {
    "type": "function",
    "name": "exec_command",
    "description": "Run a command.",
    "parameters": {"type": "object", "properties": {"cmd": {"type": "array"}}},
}
DIRECTIVE = 'Run it. CALL=exec_command:{"cmd":["echo","hi"]}'


def tool_gen(messages: list[Message], choice: object = "auto") -> Generation:
    return Generation("resp_1", "scripted", messages, None, tools=[SHELL], tool_choice=choice)


async def test_call_directive_streams_the_call() -> None:
    engine = ScriptedEngine(rate=0, length=30)
    steps = await steps_of(engine, tool_gen([Message("user", DIRECTIVE)]))
    assert isinstance(steps[0], PromptRead)
    assert steps[1] == ToolCall(0, steps[1].call_id, "exec_command")  # type: ignore[union-attr]
    pieces = [s for s in steps if isinstance(s, ToolCallDelta)]
    assert "".join(p.arguments for p in pieces) == '{"cmd":["echo","hi"]}'
    assert all(p.tokens == 1 for p in pieces) and len(pieces) > 1
    assert steps[-1] == Finished("stop")
    assert engine.traces["resp_1"].produced == len(pieces)


async def test_after_a_tool_output_it_answers_with_text() -> None:
    engine = ScriptedEngine(rate=0, length=5)
    turns = [
        Message("user", DIRECTIVE),
        Message("assistant", "", [ToolCallSpec("call_1", "exec_command", "{}")]),
        Message("tool", "hi", call_id="call_1"),
    ]
    steps = await steps_of(engine, tool_gen(turns))
    assert [type(s) for s in steps] == [PromptRead] + [Delta] * 5 + [Finished]


@pytest.mark.parametrize(
    "choice",
    [
        "none",
        {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "x"}]},
    ],
)
async def test_no_call_when_the_tool_is_not_allowed(choice: object) -> None:
    engine = ScriptedEngine(rate=0, length=3)
    steps = await steps_of(engine, tool_gen([Message("user", DIRECTIVE)], choice))
    assert not any(isinstance(s, ToolCall) for s in steps)


async def test_forced_choice_calls_without_a_directive() -> None:
    engine = ScriptedEngine(rate=0, length=3)
    named = {"type": "function", "name": "exec_command"}
    for choice in ("required", named):
        steps = await steps_of(engine, tool_gen([Message("user", "hi")], choice))
        calls = [s for s in steps if isinstance(s, ToolCall)]
        args = "".join(s.arguments for s in steps if isinstance(s, ToolCallDelta))
        assert [c.name for c in calls] == ["exec_command"] and args == "{}"


async def test_json_formats_give_valid_json() -> None:
    engine = ScriptedEngine(rate=0, length=200)
    schema = {
        "type": "object",
        "required": ["name", "age", "tags", "kind"],
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "kind": {"enum": ["a", "b"]},
        },
        "additionalProperties": False,
    }
    for fmt in ({"type": "json_schema", "name": "x", "schema": schema}, {"type": "json_object"}):
        req = Generation("resp_1", "scripted", [Message("user", "hi")], None, text_format=fmt)
        steps = await steps_of(engine, req)
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
            model="scripted",
            previous_response_id=first.id,
            tools=tools,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "hi"}],
        )
        assert answer.status == "completed" and answer.output_text == scripted_text(6)
        # The user asks again (the directive is still in the conversation): a new call,
        # streamed with its events, then the loop ends the same way.
        with client.responses.stream(
            model="scripted", previous_response_id=answer.id, tools=tools, input="Once more."
        ) as stream:
            kinds = [e.type for e in stream]
            second = stream.get_final_response()
        assert "response.function_call_arguments.delta" in kinds
        [call2] = second.output
        assert call2.type == "function_call" and call2.call_id != call.call_id
        last = client.responses.create(
            model="scripted",
            previous_response_id=second.id,
            tools=tools,
            input=[{"type": "function_call_output", "call_id": call2.call_id, "output": "hi"}],
        )
        assert last.output_text == scripted_text(6)


def test_input_tokens_without_an_engine_tokenizer(make_server) -> None:  # type: ignore[no-untyped-def]
    """An engine that cannot count gets tether's estimate (about 4 characters a token)."""
    server = make_server()
    with server.client() as client:
        short = client.responses.input_tokens.count(model="scripted", input="x" * 40)
        long = client.responses.input_tokens.count(
            model="scripted", input="x" * 400, instructions="y" * 40
        )
    assert short.object == "response.input_tokens" and short.input_tokens == 11
    assert long.input_tokens == 112
