"""LocalEngine's continuous batching against the real embedded model: several responses
decoded together in one llama.cpp context (issue 20)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any, cast

import anyio
import jsonschema
import pytest

from engine_steps import Collected, after_tokens, collect, tokens
from tether.engines.base import (
    Delta,
    Finished,
    Generation,
    Message,
    PromptRead,
    Step,
    ToolCall,
    ToolCallDelta,
)
from tether.engines.local import LocalEngine
from tether.engines.local_worker import Trace

TIMEOUT = 120.0  # several streams share 2 cores with other tests
PROMPTS = [
    "Write a long story about a robot who learns to paint.",
    "Explain how a bicycle works, in detail.",
    "Describe the life of a honey bee over one summer.",
    "Tell me about the history of the river Thames.",
]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalEngine]:
    eng = LocalEngine(n_ctx=2048)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


def gen(rid: str, text: str, n: int, temperature: float = 0.0, **kw: Any) -> Generation:
    return Generation(rid, "smollm2-135m", [Message("user", text)], n, temperature, **kw)


def output(steps: list[Step]) -> str:
    return "".join(s.text for s in steps if isinstance(s, Delta))


#: tokens of a greedy text compared alone vs batched. llama.cpp's batched decode is not
#: bit-identical to a lone sequence's on every CPU (the attention's sums run over a KV
#: length padded to the batch's), and a near tie can then flip a greedy token: seen on
#: an AVX2 AMD EPYC, at token 7-12 of these prompts. A batch that mixed sequences' KV
#: cells, or a cancel that dropped the wrong one, changes the text at once.
SAME_TOKENS = 6


def leading(steps: list[Step]) -> str:
    """The text of the first `SAME_TOKENS` tokens (one Delta a token)."""
    return "".join([s.text for s in steps if isinstance(s, Delta)][:SAME_TOKENS])


def together(engine: LocalEngine, requests: list[Generation]) -> list[Collected]:
    async def run() -> list[Collected]:
        return list(await asyncio.gather(*(collect(engine, r, timeout=TIMEOUT) for r in requests)))

    return asyncio.run(run())


def alone(engine: LocalEngine, request: Generation) -> Collected:
    return asyncio.run(collect(engine, request, timeout=TIMEOUT))


def check_usage(engine: LocalEngine, request: Generation, got: Collected) -> None:
    """PromptRead first (exact input tokens), one token a step, the trace agrees."""
    steps = got.steps
    assert isinstance(steps[0], PromptRead)
    assert steps[0].input_tokens == asyncio.run(engine.count_tokens(request))
    produced = tokens(steps)
    assert all(s.tokens == 1 for s in steps if isinstance(s, (Delta, ToolCallDelta)))
    trace = engine.traces[request.response_id]
    assert trace.produced == produced == len(trace.token_times)
    end = got.finished
    assert end is not None and steps[-1] == end
    limit = request.max_output_tokens
    assert end == Finished("length") if produced == limit else end == Finished("stop")
    assert limit is not None and 0 < produced <= limit


def test_four_concurrent_streams_complete_with_exact_usage(engine: LocalEngine) -> None:
    """Free text (sampled and greedy), a forced tool call and a JSON-schema answer, each
    with its own sampler chain and grammar, decoded side by side."""
    requests = [
        gen("resp_b0", PROMPTS[0], 48, temperature=1.0, top_p=0.9),
        gen("resp_b1", PROMPTS[1], 40),
        gen(
            "resp_b2",
            "What's the weather in Rome?",
            60,
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
        ),
        gen(
            "resp_b3",
            "Invent a person.",
            60,
            text_format={"type": "json_schema", "name": "person", "schema": PERSON},
        ),
    ]
    got = together(engine, requests)
    for request, run in zip(requests, got, strict=True):
        check_usage(engine, request, run)
    # They ran together: every trace saw a step of four.
    assert all(engine.traces[r.response_id].batched == 4 for r in requests)
    calls = [s for s in got[2].steps if isinstance(s, ToolCall)]
    assert [c.name for c in calls] == ["get_weather"]
    args = "".join(s.arguments for s in got[2].steps if isinstance(s, ToolCallDelta))
    if got[2].finished == Finished("stop"):
        jsonschema.validate(json.loads(args), WEATHER["parameters"])
    if got[3].finished == Finished("stop"):
        jsonschema.validate(json.loads(output(got[3].steps)), PERSON)


def test_greedy_outputs_are_the_same_alone_or_beside_others(engine: LocalEngine) -> None:
    """At temperature 0 a response's text does not depend on what runs beside it: each
    sequence attends to its own KV cache only, a decode step is one token per sequence,
    and a prompt is read in pieces of at least MIN_PIECE tokens (llama.cpp rounds a
    prompt read token by token differently; see local_batch). Compared on the leading
    tokens (`SAME_TOKENS`): later, llama.cpp's own rounding may flip a near tie."""
    requests = [gen(f"resp_g{i}", p, 24 + 8 * i) for i, p in enumerate(PROMPTS)]
    solo = [leading(alone(engine, r).steps) for r in requests]

    async def staggered() -> list[Collected]:
        # The later ones join while the first ones decode (admitted between steps).
        results: list[Collected] = [Collected()] * len(requests)

        async def one(i: int) -> None:
            results[i] = await collect(engine, requests[i], timeout=TIMEOUT)

        async with anyio.create_task_group() as tg:
            for i in range(len(requests)):
                tg.start_soon(one, i)
                await asyncio.sleep(0.05 * i)  # a spread of start times, not a wait
        return results

    mixed = asyncio.run(staggered())
    assert [leading(m.steps) for m in mixed] == solo
    assert max(engine.traces[r.response_id].batched for r in requests) >= 2
    side_by_side = together(engine, list(reversed(requests)))
    assert [leading(m.steps) for m in reversed(side_by_side)] == solo


@pytest.mark.parametrize("mode", ["emit", "task", "inside"])
def test_cancel_of_one_stream_leaves_the_others_unchanged(engine: LocalEngine, mode: Any) -> None:
    requests = [gen(f"resp_c{i}", p, 40) for i, p in enumerate(PROMPTS)]
    solo = [leading(alone(engine, r).steps) for r in requests[1:]]
    victim = gen("resp_cx", PROMPTS[0], 400)

    async def run() -> list[Collected]:
        return list(
            await asyncio.gather(
                collect(engine, victim, after_tokens(3), mode, TIMEOUT),
                *(collect(engine, r, timeout=TIMEOUT) for r in requests[1:]),
            )
        )

    cut, *rest = asyncio.run(run())
    assert cut.cancel_caught and cut.finished is None
    assert 3 <= tokens(cut.steps) <= 4 and tokens(cut.after_cancel) <= 1
    trace = engine.traces["resp_cx"]
    assert trace.produced == tokens(cut.steps) and trace.aborted_at is not None
    assert len(trace.token_times) <= trace.produced + 1  # sampled, never delivered: one
    assert trace.batched >= 2
    for request, run_, text in zip(requests[1:], rest, solo, strict=True):
        check_usage(engine, request, run_)
        assert leading(run_.steps) == text


def test_more_requests_than_sequences_wait_for_a_slot() -> None:
    async def scenario() -> None:
        eng = LocalEngine(n_ctx=1024, sequences=2)
        await eng.start()
        try:
            requests = [gen(f"resp_q{i}", p, 6) for i, p in enumerate(PROMPTS)]
            got = await asyncio.gather(*(collect(eng, r, timeout=TIMEOUT) for r in requests))
            for run in got:
                assert tokens(run.steps) == 6 and run.finished == Finished("length")
            assert max(eng.traces[r.response_id].batched for r in requests) == 2
            # A response cancelled while it waits for a slot never reads its prompt.
            long = [gen(f"resp_w{i}", PROMPTS[i], 200) for i in range(2)]
            async with anyio.create_task_group() as tg:
                for r in long:
                    tg.start_soon(collect, eng, r, None, "emit", TIMEOUT)
                with anyio.fail_after(TIMEOUT):  # both slots taken: both are decoding
                    while not all(eng.traces.get(r.response_id, Trace()).token_times for r in long):
                        await anyio.sleep(0.01)
                with anyio.move_on_after(0.2):
                    await collect(eng, gen("resp_queued", PROMPTS[2], 5), timeout=TIMEOUT)
                tg.cancel_scope.cancel()
            queued = eng.traces["resp_queued"]
            assert queued.aborted_in_prefill and queued.prefill_tokens == 0
            assert not queued.token_times
        finally:
            await eng.close()

    asyncio.run(scenario())


def test_cancel_one_of_several_streams_through_the_server(make_server) -> None:  # type: ignore[no-untyped-def]
    """Over HTTP with the official SDK: three responses decoded together; a cancel of one
    replies with exactly the tokens its stream got (none after the reply), the others end
    by themselves with exact usage."""
    server = make_server(engine="local")
    with server.client() as client:
        streams = [
            client.responses.create(
                model="smollm2-135m",
                input=p,
                stream=True,
                background=True,
                max_output_tokens=40 if i else 400,
                temperature=0,
            )
            for i, p in enumerate(PROMPTS[:3])
        ]
        victim, others = streams[0], streams[1:]
        seen: list[Any] = []
        for event in victim:
            seen.append(event)
            if sum(e.type == "response.output_text.delta" for e in seen) == 3:
                break
        rid = seen[0].response.id
        reply = client.responses.cancel(rid)
        rest = list(victim)
        ended = [list(s) for s in others]
    assert reply.status == "cancelled" and reply.usage is not None
    got = sum(e.type == "response.output_text.delta" for e in seen + rest)
    assert reply.usage.output_tokens == got >= 3
    assert rest[-1].type == "response.failed" and rest[-1].response.status == "cancelled"
    trace = server.trace(rid)
    assert trace["produced"] == got and trace["aborted_at"] is not None
    assert len(cast(list[float], trace["token_times"])) <= got + 1
    for events in ended:
        final = events[-1].response
        assert final.status in ("completed", "incomplete") and final.usage is not None
        deltas = sum(e.type == "response.output_text.delta" for e in events)
        assert final.usage.output_tokens == deltas > 0
    assert max(cast(int, server.trace(e[0].response.id)["batched"]) for e in ended) >= 2


def test_a_deferred_response_waits_while_an_interactive_one_decodes(engine: LocalEngine) -> None:
    # issue 19: a `2h` response (defer_until ahead) decodes only when nothing else does;
    # once its deadline has passed it is batched like any other.
    for late, rid in ((False, "deferred-waits"), (True, "deferred-due")):
        interactive = gen(f"{rid}-interactive", PROMPTS[0], 40)
        until = time.time() + (-1 if late else 3600)
        deferred = gen(rid, PROMPTS[1], 10, defer_until=until)
        got = together(engine, [deferred, interactive])
        assert [tokens(g.steps) for g in got] == [10, 40]
        mine = engine.traces[rid].token_times
        theirs = engine.traces[interactive.response_id].token_times
        if late:
            assert min(mine) < max(theirs)  # decoded together
        else:
            assert min(mine) >= max(theirs)  # every token after the interactive one's last


def test_deferred_responses_alone_decode_in_turn(engine: LocalEngine) -> None:
    # With only deferred work, each step decodes one of them in turn (short steps: an
    # interactive request that arrives waits for less), and all of them finish.
    until = time.time() + 3600
    requests = [gen(f"alone-deferred-{i}", PROMPTS[i], 12, defer_until=until) for i in range(3)]
    got = together(engine, requests)
    assert [tokens(g.steps) for g in got] == [12, 12, 12]
    # In turn: none waits for another to finish (each started before the others ended),
    # and no two share a step (rows of one batched step are microseconds apart; steps
    # are a decode apart, milliseconds).
    times = [engine.traces[r.response_id].token_times for r in requests]
    assert all(min(t) < min(max(u) for u in times) for t in times)
    merged = sorted((at, i) for i, t in enumerate(times) for at in t)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(merged) if a[1] != b[1]]
    assert min(gaps) > 0.001


def test_an_announced_interactive_response_aborts_a_deferred_step() -> None:
    """A step of deferred work in flight when an interactive response is announced
    (`expect`) is aborted: nothing of it happened (llama.cpp removed its tokens), the
    deferred response holds until the interactive one is admitted, and then goes on to
    the same greedy text as one never aborted. The scheduler is driven step by step here
    (not started), so what happens when is certain."""
    import llama_cpp

    from tether.engines.local import find_model_file
    from tether.engines.local_batch import Scheduler
    from tether.engines.local_worker import Channel, ModelWorker, Sampling

    llm = llama_cpp.Llama(str(find_model_file()), n_ctx=256, n_threads=2, verbose=False)
    sched = Scheduler(ModelWorker(llm, 512, Sampling(0.05, 1.15, 320)), 2, 512, 2)
    loop = asyncio.new_event_loop()

    def run(rid: str, abort: bool) -> str:
        chan = Channel(loop, Trace(), sched.cond)
        request = gen(rid, PROMPTS[0], 12, defer_until=time.time() + 3600)
        live = sched._admit(request, chan)
        assert live is not None
        if abort:
            assert sched.deferral.begin([live])
            sched.expect()  # announced as the step begins: its decode is aborted
            sched._step([live])
            sched.deferral.end()
            assert sched.deferral.aborts == 1 and live.at == 0 and not live.slot.tokens
            mem = llama_cpp.llama_get_memory(sched._ctx)
            assert llama_cpp.llama_memory_seq_pos_max(mem, live.slot.seq) == -1
            assert sched.deferral.pick([live], [live]) == []  # held for the announced one
            sched.deferral.arrived()  # ... until it is admitted (and then while it runs)
        while live in sched._live:
            with sched.cond:
                assert sched.deferral.pick([live], [live]) == [live]
                assert sched._ready(live)
            sched._step([live])
            chan.give()  # the consumer took the token
        loop.run_until_complete(asyncio.sleep(0))  # deliver the channel's items
        steps = []
        while not chan.queue.empty():
            item = chan.queue.get_nowait()
            if item is not None:
                steps.append(item)
        assert tokens(steps) == 12
        return output(steps)

    try:
        assert run("aborted", abort=True) == run("never-aborted", abort=False)
    finally:
        sched.close()
        llm.close()
        loop.close()


def test_greedy_in_numpy_chooses_as_llama_cpp_does(engine: LocalEngine) -> None:
    # issue 20: greedy free text is sampled in numpy (`ModelWorker._greedy`); the text
    # is the one llama.cpp's penalties + greedy chain gives, repetition penalty included.
    worker = engine._worker
    assert worker is not None
    texts = []
    for fast in (True, False):
        worker.fast_greedy = fast
        try:
            got = alone(engine, gen(f"greedy-{fast}", PROMPTS[2], 120))
        finally:
            worker.fast_greedy = True
        assert tokens(got.steps) > 50
        texts.append(got.text)
    assert texts[0] == texts[1]
