"""LocalEngine against the real embedded model (llama-cpp + SmolLM2-135M), no server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator
from typing import cast

import llama_cpp  # imported on purpose: a missing runtime must fail, never skip
import pytest

from tether.engines.base import (
    Abort,
    Delta,
    Engine,
    EngineError,
    Finished,
    Generation,
    Message,
    ModelInfo,
    PromptRead,
    Step,
)
from tether.engines.local import LocalEngine, find_model_file

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


async def collect(engine: LocalEngine, gen: Generation, abort: Abort | None = None) -> list[Step]:
    async def run() -> list[Step]:
        return [step async for step in engine.generate(gen, abort or Abort())]

    return await asyncio.wait_for(run(), TIMEOUT)


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
    assert eng.concurrency == 1
    assert eng.models() == [ModelInfo(id="smollm2-135m", owned_by="tether")]


def test_short_generation_matches_llama_cpp(
    engine: LocalEngine, reference: llama_cpp.Llama
) -> None:
    """Greedy output, prompt and token counts agree with llama-cpp's own chat completion."""
    prompt = "What is the capital of France? Answer in one sentence."
    gen = request([Message("user", prompt)], temperature=0.0, max_output_tokens=60)
    steps = asyncio.run(collect(engine, gen))
    deltas, end = check_shape(steps)
    assert end == Finished("stop")
    text = "".join(d.text for d in deltas)
    assert "Paris" in text
    assert (text, steps[0], len(deltas)) == _as_steps(chat(reference, prompt, 60))


def test_characters_split_across_tokens(engine: LocalEngine, reference: llama_cpp.Llama) -> None:
    """An emoji spans several tokens: its bytes wait for the last one, each token still counts."""
    prompt = "Reply with three emojis."  # greedy SmolLM2 answers with a run of 🌟
    steps = asyncio.run(
        collect(engine, request([Message("user", prompt)], temperature=0.0, max_output_tokens=20))
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


def test_abort_stops_at_the_next_token_and_engine_recovers(engine: LocalEngine) -> None:
    async def scenario() -> tuple[list[Step], float]:
        abort = Abort()
        steps: list[Step] = []
        started = 0.0

        async def consume() -> None:
            nonlocal started
            async for step in engine.generate(request(STORY, max_output_tokens=500), abort):
                steps.append(step)
                if sum(isinstance(s, Delta) for s in steps) == 3:
                    abort.set()
                    started = time.monotonic()

        await asyncio.wait_for(consume(), TIMEOUT)
        return steps, time.monotonic() - started

    steps, stop_seconds = asyncio.run(scenario())
    deltas, end = check_shape(steps)
    assert end is None, "an aborted generation must not report Finished"
    # Abort came after the 3rd token: at most the one token step in flight follows it.
    assert 3 <= len(deltas) <= 4
    assert stop_seconds < 2.0

    # The same engine (and model) serves the next generation normally.
    again = asyncio.run(collect(engine, request(STORY, max_output_tokens=8)))
    deltas, end = check_shape(again)
    assert len(deltas) == 8 and end == Finished("length")


def test_closing_the_generator_stops_the_worker(engine: LocalEngine) -> None:
    """A consumer that walks away frees the engine: the next generation is not stuck."""

    async def scenario() -> None:
        gen = cast(
            AsyncGenerator[Step, None],
            engine.generate(request(STORY, max_output_tokens=500), Abort()),
        )
        async for step in gen:
            if isinstance(step, Delta):
                break
        await asyncio.wait_for(gen.aclose(), 2.0)
        steps = await collect(engine, request(STORY, max_output_tokens=3))
        assert len(check_shape(steps)[0]) == 3

    asyncio.run(scenario())


def test_cancelled_task_stops_the_worker(engine: LocalEngine) -> None:
    async def scenario() -> None:
        first = asyncio.Event()

        async def consume() -> None:
            async for step in engine.generate(request(STORY, max_output_tokens=500), Abort()):
                if isinstance(step, Delta):
                    first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), TIMEOUT)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        assert done, "cancelled generation did not end within 2 s"
        steps = await collect(engine, request(STORY, max_output_tokens=3))
        assert len(check_shape(steps)[0]) == 3

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

        async def consume() -> None:
            async for step in eng.generate(request(STORY, max_output_tokens=500), Abort()):
                steps.append(step)
                if isinstance(step, Delta):
                    await eng.close()

        with pytest.raises(EngineError, match="closed"):
            await asyncio.wait_for(consume(), TIMEOUT)
        assert not any(isinstance(s, Finished) for s in steps)
        with pytest.raises(EngineError, match="not started"):
            await collect(eng, request(STORY))

    asyncio.run(scenario())


def test_smoke_through_the_server(make_server) -> None:  # type: ignore[no-untyped-def]
    # The embedded default end to end: a short generation, then a cancel mid-stream.
    server = make_server(engine="local")
    with server.client() as client:
        assert [m.id for m in client.models.list()] == ["smollm2-135m"]
        short = client.responses.create(model="smollm2-135m", input="Say hello.",
                                        max_output_tokens=8, temperature=0)
        assert short.status in ("completed", "incomplete")
        assert 0 < short.usage.output_tokens <= 8 and short.usage.input_tokens > 0
        assert short.output_text.strip()
        stream = client.responses.create(model="smollm2-135m", input="Write a long story.",
                                         background=True, stream=True, temperature=0)
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
