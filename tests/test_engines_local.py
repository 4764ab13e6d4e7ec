"""LocalEngine against the real embedded model (llama-cpp + SmolLM2-135M), no server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any, cast

import anyio
import httpx
import jsonschema
import llama_cpp  # imported on purpose: a missing runtime must fail, never skip
import openai
import pytest

from engine_steps import Collected, Mode, after_tokens, tokens
from engine_steps import collect as drive
from tether.engines.base import (
    Delta,
    Engine,
    EngineError,
    Finished,
    Generation,
    Message,
    ModelInfo,
    PromptRead,
    Step,
    ToolCall,
    ToolCallDelta,
)
from tether.engines.local import LocalEngine, find_model_file

from conftest import Server, served, wait_for

STORY = [Message("user", "Write a long story about a robot who learns to paint.")]
# Bounds every generation in these tests; SmolLM2 runs at ~50 tokens/s on 2 cores.
TIMEOUT = 30.0


def request(
    messages: list[Message],
    *,
    max_output_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> Generation:
    return Generation("resp_test", "smollm2-135m", messages, max_output_tokens, temperature, top_p)


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalEngine]:
    # The engine is not tied to an event loop, so one loaded model serves every test.
    eng = LocalEngine()
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="module")
def plain() -> Iterator[LocalEngine]:
    """The engine without its default repetition penalty: sampling as llama-cpp's own."""
    eng = LocalEngine(repeat_penalty=1.0)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="module")
def reference() -> Iterator[llama_cpp.Llama]:
    """A plain llama-cpp model, to check the engine against llama-cpp's own chat path."""
    llm = llama_cpp.Llama(str(find_model_file()), n_ctx=2048, n_threads=2, verbose=False)
    yield llm
    llm.close()


def chat(llm: llama_cpp.Llama, text: str, max_tokens: int) -> tuple[str, int, int]:
    """Greedy chat completion: (text, prompt tokens, completion tokens)."""
    out = llm.create_chat_completion(
        [{"role": "user", "content": text}], temperature=0.0, max_tokens=max_tokens
    )
    assert isinstance(out, dict)
    usage = out["usage"]
    return (
        out["choices"][0]["message"]["content"] or "",
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


async def collect(engine: LocalEngine, gen: Generation) -> list[Step]:
    return (await drive(engine, gen, timeout=TIMEOUT)).steps


def cancelled(engine: LocalEngine, gen: Generation, after: int, mode: Mode) -> Collected:
    """A generation cancelled once `after` tokens were taken."""
    return asyncio.run(drive(engine, gen, after_tokens(after), mode, TIMEOUT))


def check_shape(steps: list[Step]) -> tuple[list[Delta], Finished | None]:
    """PromptRead first, then only one-token Deltas, then at most one Finished at the end."""
    assert isinstance(steps[0], PromptRead) and steps[0].input_tokens > 0
    end = steps[-1] if isinstance(steps[-1], Finished) else None
    deltas = steps[1 : len(steps) - (end is not None)]
    assert all(isinstance(d, Delta) and d.tokens == 1 for d in deltas), steps
    return cast(list[Delta], deltas), end


def test_is_an_engine() -> None:
    eng = LocalEngine()
    assert isinstance(eng, Engine)
    assert eng.concurrency == 8
    assert eng.models() == [ModelInfo(id="smollm2-135m", owned_by="tether", context=8192)]


def test_short_generation_matches_llama_cpp(plain: LocalEngine, reference: llama_cpp.Llama) -> None:
    """Greedy output, prompt and token counts agree with llama-cpp's own chat completion."""
    prompt = "What is the capital of France? Answer in one sentence."
    gen = request([Message("user", prompt)], temperature=0.0, max_output_tokens=60)
    steps = asyncio.run(collect(plain, gen))
    deltas, end = check_shape(steps)
    assert end == Finished("stop")
    text = "".join(d.text for d in deltas)
    assert "Paris" in text
    assert (text, steps[0], len(deltas)) == _as_steps(chat(reference, prompt, 60))


def test_characters_split_across_tokens(plain: LocalEngine, reference: llama_cpp.Llama) -> None:
    """An emoji spans several tokens: its bytes wait for the last one, each token still counts."""
    prompt = "Reply with three emojis."  # greedy SmolLM2 answers with a run of 🌟
    steps = asyncio.run(
        collect(plain, request([Message("user", prompt)], temperature=0.0, max_output_tokens=20))
    )
    deltas, end = check_shape(steps)
    assert end == Finished("length") and len(deltas) == 20
    assert any(d.text == "" for d in deltas), "expected a token that ends mid-character"
    # 20 tokens = six whole stars (3 tokens each) + 2 tokens of a 7th, whose bytes are dropped.
    text = "".join(d.text for d in deltas)
    assert text == "\N{GLOWING STAR}" * 6
    # (llama-cpp itself overruns max_tokens to finish the character, so compare prefixes.)
    ref_text, prompt_tokens, _ = chat(reference, prompt, 40)
    assert ref_text.startswith(text) and steps[0] == PromptRead(input_tokens=prompt_tokens)


def _as_steps(result: tuple[str, int, int]) -> tuple[str, PromptRead, int]:
    text, prompt_tokens, completion_tokens = result
    return text, PromptRead(input_tokens=prompt_tokens), completion_tokens


def test_max_output_tokens_gives_exactly_that_many(engine: LocalEngine) -> None:
    steps = asyncio.run(collect(engine, request(STORY, max_output_tokens=5)))
    deltas, end = check_shape(steps)
    assert len(deltas) == 5
    assert end == Finished("length")


def test_zero_budget_reads_the_prompt_only(engine: LocalEngine) -> None:
    steps = asyncio.run(collect(engine, request(STORY, max_output_tokens=0)))
    assert isinstance(steps[0], PromptRead)
    assert steps[1:] == [Finished("length")]


@pytest.mark.parametrize("mode", ["emit", "task", "inside"])
def test_cancel_stops_at_the_next_token_and_engine_recovers(
    engine: LocalEngine, mode: Mode
) -> None:
    got = cancelled(engine, request(STORY, max_output_tokens=500), 3, mode)
    deltas, end = check_shape(got.steps)
    assert end is None, "a cancelled generation must not report Finished"
    assert got.cancel_caught
    # The cancel came at the 3rd token: at most the one token step in flight follows it
    # (with "inside", that is the 3rd itself, which `emit` did not take).
    assert 3 <= len(deltas) <= 4 and tokens(got.after_cancel) <= 1
    assert got.stop_seconds < 2.0
    trace = engine.traces["resp_test"]
    assert trace.produced == len(deltas) and trace.aborted_at is not None
    assert len(trace.token_times) <= len(deltas) + 1  # sampled, never delivered: one
    # The same engine (and model) serves the next generation normally.
    again = asyncio.run(collect(engine, request(STORY, max_output_tokens=8)))
    deltas, end = check_shape(again)
    assert len(deltas) == 8 and end == Finished("length")


def test_cancel_from_outside_frees_the_worker_at_once(engine: LocalEngine) -> None:
    """A cancel from outside the generation (a timer here) stops the worker: the next
    generation is not stuck behind it, and starts after the worker has stopped."""

    async def scenario() -> None:
        with anyio.move_on_after(0.5):
            await collect(engine, request(STORY, max_output_tokens=500))
        first = engine.traces["resp_test"]
        assert first.aborted_at is not None and not first.finished
        steps = await collect(engine, request(STORY, max_output_tokens=3))
        assert len(check_shape(steps)[0]) == 3
        assert engine.traces["resp_test"].started_at >= first.aborted_at

    asyncio.run(scenario())


def test_sampled_generation_counts_every_token(engine: LocalEngine) -> None:
    """With sampling, text is still cut only at token boundaries and every token counted."""
    gen = request(
        [Message("developer", "Reply in French."), Message("user", "Tell me about cats.")],
        temperature=1.0,
        top_p=0.9,
        max_output_tokens=40,
    )
    steps = asyncio.run(collect(engine, gen))
    deltas, end = check_shape(steps)
    assert end == Finished("length" if len(deltas) == 40 else "stop")
    assert sum(d.tokens for d in deltas) == len(deltas) > 0


def test_generate_before_start_fails() -> None:
    async def scenario() -> None:
        with pytest.raises(EngineError):
            await collect(LocalEngine(), request(STORY))

    asyncio.run(scenario())


def test_close_during_generation_fails_the_run_and_frees_the_model() -> None:
    async def scenario() -> None:
        eng = LocalEngine()
        await eng.start()
        steps: list[Step] = []

        async def emit(step: Step) -> None:
            steps.append(step)
            if isinstance(step, Delta):
                await eng.close()

        with pytest.raises(EngineError, match="closed"), anyio.fail_after(TIMEOUT):
            await eng.generate(request(STORY, max_output_tokens=500), emit)
        assert not any(isinstance(s, Finished) for s in steps)
        with pytest.raises(EngineError, match="not started"):
            await collect(eng, request(STORY))

    asyncio.run(scenario())


def test_smoke_through_the_server(make_server) -> None:  # type: ignore[no-untyped-def]
    # The embedded default end to end: a short generation, then a cancel mid-stream.
    server = make_server(engine="local")
    with server.client() as client:
        assert [m.id for m in client.models.list()] == ["smollm2-135m"]
        short = client.responses.create(
            model="smollm2-135m", input="Say hello.", max_output_tokens=8, temperature=0
        )
        assert short.status in ("completed", "incomplete")
        assert 0 < short.usage.output_tokens <= 8 and short.usage.input_tokens > 0
        assert short.output_text.strip()
        stream = client.responses.create(
            model="smollm2-135m",
            input="Write a long story.",
            background=True,
            stream=True,
            temperature=0,
        )
        deltas = 0
        rid = ""
        for event in stream:
            if event.type == "response.created":
                rid = event.response.id
            if event.type == "response.output_text.delta":
                deltas += 1
                if deltas == 3:
                    break
        reply = client.responses.cancel(rid)
        assert reply.status == "cancelled"
        events = list(stream)
        assert events[-1].type == "response.failed"
        assert events[-1].response.status == "cancelled"
        total = deltas + sum(e.type == "response.output_text.delta" for e in events)
        assert reply.usage.output_tokens == total == events[-1].response.usage.output_tokens
        assert client.responses.retrieve(rid).usage == reply.usage


# --- tools, structured output, context, prefill (issue 13, issue 14 item 5) -----------------


def _fn(name: str, description: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": name,
        "description": description,
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        },
    }


WEATHER = _fn("get_weather", "Get the current weather in a city.", {"city": {"type": "string"}})
TIMER = _fn("set_timer", "Set a timer for some minutes.", {"minutes": {"type": "integer"}})
STORY_TOOL = _fn(
    "save_story", "Save a long story.", {"title": {"type": "string"}, "text": {"type": "string"}}
)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def tool_request(
    text: str, tools: list[dict[str, Any]], choice: Any = "auto", **kwargs: Any
) -> Generation:
    return Generation(
        "resp_test",
        "smollm2-135m",
        [Message("user", text)],
        80,
        tools=tools,
        tool_choice=choice,
        **kwargs,
    )


def split(steps: list[Step]) -> tuple[list[ToolCall], str, str]:
    calls = [s for s in steps if isinstance(s, ToolCall)]
    args = "".join(s.arguments for s in steps if isinstance(s, ToolCallDelta))
    text = "".join(s.text for s in steps if isinstance(s, Delta))
    return calls, args, text


@pytest.mark.parametrize(
    "prompt", ["What's the weather in Rome?", "Hello there!", "Set a timer for 5 minutes."]
)
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_are_valid_json_of_the_schema(
    engine: LocalEngine, prompt: str, choice: str
) -> None:
    tools = [WEATHER, TIMER]
    chosen: Any = "required" if choice == "required" else {"type": "function", "name": "set_timer"}
    steps = asyncio.run(collect(engine, tool_request(prompt, tools, chosen)))
    calls, args, text = split(steps)
    assert len(calls) == 1 and text == "" and steps[-1] == Finished("stop")
    tool = {t["name"]: t for t in tools}[calls[0].name]
    if choice == "named":
        assert calls[0].name == "set_timer"
    jsonschema.validate(json.loads(args), tool["parameters"])
    # One output token a step, all of them in the arguments.
    assert all(s.tokens == 1 for s in steps if isinstance(s, ToolCallDelta))


def test_auto_calls_the_tool_asked_for_and_answers_chat_with_text(engine: LocalEngine) -> None:
    steps = asyncio.run(
        collect(engine, tool_request("What's the weather in Oslo?", [TIMER, WEATHER]))
    )
    calls, args, _ = split(steps)
    assert [c.name for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(args), WEATHER["parameters"])
    calls, _, text = split(asyncio.run(collect(engine, tool_request("Tell me a joke.", [WEATHER]))))
    assert calls == [] and text
    calls, _, text = split(
        asyncio.run(collect(engine, tool_request("What's the weather in Oslo?", [WEATHER], "none")))
    )
    assert calls == [] and text


@pytest.mark.parametrize(
    "fmt", [{"type": "json_schema", "name": "person", "schema": PERSON}, {"type": "json_object"}]
)
def test_structured_output_validates(engine: LocalEngine, fmt: dict[str, Any]) -> None:
    gen = Generation(
        "resp_test", "smollm2-135m", [Message("user", "Describe a person.")], 300, text_format=fmt
    )
    steps = asyncio.run(collect(engine, gen))
    deltas, end = check_shape(steps)
    assert end == Finished("stop")
    value = json.loads("".join(d.text for d in deltas))
    jsonschema.validate(value, fmt.get("schema", {"type": "object"}))


def test_count_tokens_is_the_prompt_read(engine: LocalEngine) -> None:
    gen = tool_request(
        "What's the weather in Rome?",
        [WEATHER, TIMER],
        "required",
        text_format={"type": "json_object"},
    )
    counted = asyncio.run(engine.count_tokens(gen))
    steps = asyncio.run(collect(engine, gen))
    assert steps[0] == PromptRead(input_tokens=counted) and counted is not None
    assert counted > asyncio.run(engine.count_tokens(request(STORY)))  # tools are in it


LONG = " ".join(f"Fact {i}: the river in town number {i} is called R{i}." for i in range(110))


def test_cancel_during_prefill_stops_within_a_chunk(engine: LocalEngine) -> None:
    """Reading a ~1,500-token prompt takes seconds here; a cancel is seen between chunks."""
    got = asyncio.run(
        drive(
            engine,
            request([Message("user", LONG)], max_output_tokens=5),
            lambda steps: True,
            "task",
            TIMEOUT,
        )
    )
    [first] = got.steps
    assert isinstance(first, PromptRead) and first.input_tokens > 1400
    trace = engine.traces["resp_test"]
    assert trace.aborted_in_prefill and trace.produced == 0 and not trace.token_times
    # a whole prompt takes several seconds; one chunk ~0.05 s
    assert got.stop_seconds < 1.0, got.stop_seconds
    again = asyncio.run(collect(engine, request(STORY, max_output_tokens=3)))
    assert len(check_shape(again)[0]) == 3


# --- through the server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A cancel fence far above a prompt chunk, so "replied within a chunk" is unmistakable.
    with served(
        tmp_path_factory.mktemp("local"),
        "--engine",
        "local",
        "--debug-routes",
        "--cancel-timeout",
        "5",
    ) as server:
        yield server


def test_cancel_while_generating_arguments(local_server: Server) -> None:
    with local_server.client() as client:
        stream = client.responses.create(
            model="smollm2-135m",
            input="Write a very long story about a dragon and save it.",
            tools=[STORY_TOOL],
            tool_choice={"type": "function", "name": "save_story"},
            stream=True,
            background=True,
        )
        events: list[Any] = []
        for event in stream:
            events.append(event)
            if sum(e.type == "response.function_call_arguments.delta" for e in events) == 3:
                break
        rid = events[0].response.id
        reply = client.responses.cancel(rid)
        rest = list(stream)
    assert reply.status == "cancelled"
    assert rest[-1].type == "response.failed" and rest[-1].response.status == "cancelled"
    deltas = [e for e in events + rest if e.type == "response.function_call_arguments.delta"]
    assert reply.usage is not None and reply.usage.output_tokens == len(deltas) >= 3
    [item] = reply.output
    assert item.type == "function_call" and item.name == "save_story"
    assert item.status == "incomplete" and item.arguments == "".join(d.delta for d in deltas)
    trace = local_server.trace(rid)
    assert trace["produced"] == len(deltas) and trace["aborted_at"] is not None
    # Nothing sampled after the reply: at most the one step in flight, never delivered.
    token_times = cast(list[float], trace["token_times"])
    assert len(token_times) <= len(deltas) + 1


def test_cancel_during_prefill_replies_within_a_chunk(local_server: Server) -> None:
    with local_server.client() as client:
        stream = client.responses.create(
            model="smollm2-135m", input=LONG, stream=True, background=True, max_output_tokens=5
        )
        rid = next(iter(stream)).response.id
        # The engine has started on it (the trace exists) and is reading the prompt.
        wait_for(lambda: _trace_or_none(local_server, rid), 30, "the run to start")
        started = time.monotonic()
        reply = client.responses.cancel(rid)
        took = time.monotonic() - started
        nxt = client.responses.create(model="smollm2-135m", input="Say hi.", max_output_tokens=3)
        rest = list(stream)
    assert reply.status == "cancelled" and reply.usage is not None
    assert reply.usage.output_tokens == 0
    assert rest[-1].type == "response.failed" and rest[-1].response.status == "cancelled"
    trace = local_server.trace(rid)
    assert trace["aborted_in_prefill"] is True and trace["token_times"] == []
    # The run itself answered, not the 5 s fence; and the engine was free at once: the
    # next response started after the abort and finished without waiting for a prompt.
    assert took < 2.5, took
    following = local_server.trace(nxt.id)
    assert cast(float, following["started_at"]) >= cast(float, trace["aborted_at"])
    assert nxt.status in ("completed", "incomplete")


def _trace_or_none(server: Server, rid: str) -> dict[str, object] | None:
    try:
        return server.trace(rid)
    except httpx.HTTPStatusError:
        return None


def test_input_tokens_counts_what_a_response_reads(local_server: Server) -> None:
    with local_server.client() as client:
        kwargs: dict[str, Any] = {
            "instructions": "Be brief.",
            "tools": [WEATHER],
            "tool_choice": "required",
            "input": [{"role": "user", "content": "Weather in Rome?"}],
        }
        counted = client.responses.input_tokens.count(model="smollm2-135m", **kwargs)
        made = client.responses.create(model="smollm2-135m", max_output_tokens=30, **kwargs)
        assert counted.object == "response.input_tokens"
        assert made.usage is not None and counted.input_tokens == made.usage.input_tokens
        bare = client.responses.input_tokens.count(model="smollm2-135m", input="Hi")
        assert 0 < bare.input_tokens < counted.input_tokens
        with pytest.raises(openai.NotFoundError):
            client.responses.input_tokens.count(model="nope", input="Hi")


def test_prompt_over_the_context(make_server, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A prompt over the context: 400 before anything is stored unless `truncation` is
    `auto`, which drops the oldest turns. (A 2,048-token context keeps this quick; the
    default is 8,192.)"""
    monkeypatch.setenv("TETHER_LOCAL_CONTEXT", "2048")
    server = make_server(engine="local")
    turns: list[Any] = []
    for i in range(24):  # ~5,000 tokens of conversation
        turns.append({"role": "user", "content": f"Question {i}: " + LONG[:450]})
        turns.append({"role": "assistant", "content": f"Answer {i}: " + LONG[450:900]})
    turns.append({"role": "user", "content": "Reply with one word: yes."})
    with server.client() as client:
        size = client.responses.input_tokens.count(model="smollm2-135m", input=turns)
        assert size.input_tokens > 4500
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="smollm2-135m", input=turns, stream=True)
        assert refused.value.code == "context_length_exceeded"
        assert refused.value.param == "input"
        done = client.responses.create(
            model="smollm2-135m", input=turns, truncation="auto", temperature=0
        )
    assert done.status == "completed" and done.truncation == "auto"
    assert done.usage is not None and done.usage.input_tokens <= 2048 - 512
