"""Reasoning models (issue 16): thinking streamed as a reasoning output item, counted in
`output_tokens_details.reasoning_tokens`, and exact when cancelled.

Upstreams: the fake of tests/upstreams.py streaming thinking like vLLM (`reasoning_content`),
Ollama (`reasoning`), others (`thinking`), inline `<think>` tags (`think_tags=true`), and a
Responses upstream's reasoning item; through a real tether server and the `openai` SDK (every
reply and event is checked against both specs by tests/spec.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from engine_steps import collect
from tether import wire_output
from tether.config import Settings, UpstreamConfig
from tether.engines.base import (
    Delta,
    Emit,
    Generation,
    Message,
    PromptRead,
    ReasoningDelta,
    Report,
)
from tether.engines.chat import ChatEngine
from tether.engines.scripted import ScriptedEngine
from tether.engines.think import Splitter
from tether.lifecycle import Lifecycle
from tether.run import Progress
from tether.runner import Run
from tether.store.sqlite import SQLiteStore
from tether.turns import Thought
from tether.wire_input import parse_create
from upstreams import FakeUpstream, fake_upstream, smollm2_gguf

from conftest import Server, served

THOUGHT = "alpha bravo charlie delta"  # THINK=4: the fake's first four words
#: model id -> the fake's STYLE (chat upstreams) or None (the Responses upstream)
MODELS = {"vllm": "vllm", "ollama": "ollama", "thinking": "thinking", "tags": "tags", "rs": None}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


@pytest.fixture(scope="module")
def tether(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = ["--engine", "none"]
    for model in ("vllm", "ollama", "thinking"):
        flags += ["--upstream", f"{model}={fake.url}"]
    flags += ["--upstream", f"tags={fake.url},think_tags=true"]
    flags += ["--upstream", f"rs=responses+{fake.url}"]
    with served(tmp_path_factory.mktemp("reasoning"), *flags) as server:
        yield server


def prompt(model: str, directives: str) -> str:
    style = MODELS[model]
    return f"{directives} STYLE={style} go" if style else f"{directives} go"


# --- the parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        ["<think>", "a", "b", "</think>", "x"],
        ["<thi", "nk>a", "b</th", "ink>x"],
        ["<", "t", "h", "i", "n", "k", ">a", "b<", "/think", ">x"],
        ["<think>ab</think>x"],
    ],
)
def test_think_tags_split_across_chunks(chunks: list[str]) -> None:
    splitter = Splitter()
    steps = [s for c in chunks for s in splitter.steps(c)] + splitter.end()
    thought = "".join(s.text for s in steps if type(s) is ReasoningDelta)
    text = "".join(s.text for s in steps if type(s) is Delta)
    assert (thought, text) == ("ab", "x")
    # Every chunk's token is in some step (a tag's goes to the next step).
    assert sum(s.tokens for s in steps) == len(chunks)


def test_think_tags_leave_plain_text_and_lone_angles_alone() -> None:
    splitter = Splitter()
    steps = splitter.steps("a < b <th") + splitter.steps("e end") + splitter.end()
    assert "".join(s.text for s in steps) == "a < b <the end"
    assert all(type(s) is Delta for s in steps)


def test_a_live_reasoning_item_replays_from_its_log() -> None:
    item = wire_output.ReasoningItem(0)
    events = [*item.opened(), *item.thinking("one"), *item.thinking(" two")]
    events += item.summary_delta(0, "s1") + item.summary_delta(1, "s2") + item.summary_delta(1, "!")
    done, still_open = wire_output.replay(events)
    assert done == [] and [i.live() for i in still_open] == [item.live()]
    assert item.live()["content"] == [{"type": "reasoning_text", "text": "one two"}]
    assert item.live()["summary"] == [
        {"type": "summary_text", "text": "s1"},
        {"type": "summary_text", "text": "s2!"},
    ]
    assert wire_output.reasoning_deltas(events) == 5
    # Closed from the replay: the same events as the item itself would close with.
    assert still_open[0].closed("incomplete") == item.closed("incomplete")


# --- through tether -----------------------------------------------------------------------


def check_output(response: Any, thinking: str, answer: str) -> None:
    thought, message = response.output
    assert thought.type == "reasoning" and thought.status == "completed"
    assert [c.text.strip() for c in thought.content] == [thinking]
    assert message.type == "message"
    assert response.output_text.strip() == answer  # the thinking is not output text
    assert response.usage.output_tokens == 8
    assert response.usage.output_tokens_details.reasoning_tokens == 4


@pytest.mark.parametrize("model", list(MODELS))
def test_thinking_is_a_reasoning_item_with_its_tokens(tether: Server, model: str) -> None:
    # The tags style spends its first token on `<thi` and its fifth on `</th`.
    thinking = THOUGHT.removeprefix("alpha ") if model == "tags" else THOUGHT
    answer = "foxtrot golf hotel" if model == "tags" else "echo foxtrot golf hotel"
    with tether.client() as client:
        check_output(
            client.responses.create(model=model, input=prompt(model, "THINK=4 LENGTH=8")),
            thinking,
            answer,
        )
        with client.responses.stream(
            model=model, input=prompt(model, "THINK=4 LENGTH=8")
        ) as stream:
            kinds = [e.type for e in stream]
            final = stream.get_final_response()
        check_output(final, thinking, answer)
        check_output(client.responses.retrieve(final.id), thinking, answer)
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    assert kinds.count("response.output_item.done") == 2


def deltas_before_stall(model: str, stall: int, think: int) -> int:
    """The delta events a stream shows once the fake has sent `stall` tokens."""
    if model != "tags":
        return stall
    # `<thi` and `</th` yield no step: their tokens go with the next one.
    return stall - 1 - (stall > think)


@pytest.mark.parametrize("phase", ["thinking", "answer"])
@pytest.mark.parametrize("model", ["vllm", "ollama", "tags", "rs"])
def test_cancel_agrees_on_reasoning_tokens(
    tether: Server, fake: FakeUpstream, model: str, phase: str
) -> None:
    think = 5
    stall = 3 if phase == "thinking" else 7
    directives = f"THINK={think} STALL_AFTER={stall} LENGTH=20"
    kinds = ("response.reasoning_text.delta", "response.output_text.delta")
    want = deltas_before_stall(model, stall, think)
    with tether.client() as client:
        stream = client.responses.create(
            model=model, input=prompt(model, directives), background=True, stream=True
        )
        rid, events = "", []
        for event in stream:
            events.append(event)
            if event.type == "response.created":
                rid = event.response.id
            if sum(e.type in kinds for e in events) == want:
                break
        reply = client.responses.cancel(rid)
        events += list(stream)
        again = client.responses.retrieve(rid)
    call = [c for c in fake.calls if directives in str(c.body)][-1]
    assert call.gone.wait(5), "the upstream connection was not closed"
    produced = len(call.generated)  # what the upstream made before it saw the disconnect
    assert produced == stall
    final = events[-1]
    assert final.type == "response.failed" and final.response.status == "cancelled"
    for response in (reply, final.response, again):
        assert response.status == "cancelled"
        assert response.usage.output_tokens == produced
        assert response.usage.output_tokens_details.reasoning_tokens == min(produced, think)
    thought = reply.output[0]
    assert thought.type == "reasoning" and thought.status == "incomplete"


def test_think_tags_option_is_off_by_default(tether: Server) -> None:
    with tether.client() as client:
        response = client.responses.create(model="vllm", input="THINK=4 STYLE=tags LENGTH=8 go")
    assert [i.type for i in response.output] == ["message"]
    assert response.output_text.startswith("<thi")


# --- exactness at the edges ---------------------------------------------------------------


class HeldStore:
    """A store whose appends wait for `room` (a full live log): where a cancel lands."""

    def __init__(self) -> None:
        self.room = anyio.Event()
        self.waiting = anyio.Event()
        self.appended: list[tuple[list[dict[str, Any]], int]] = []

    async def append(
        self, rid: str, token: str, events: list[dict[str, Any]], tokens: int = 0, *_: Any
    ) -> bool:
        if not self.room.is_set():
            self.waiting.set()
            await self.room.wait()
        self.appended.append((events, tokens))
        return True


@pytest.mark.anyio
async def test_a_cancel_landing_in_a_reasoning_append_takes_nothing() -> None:
    store = HeldStore()
    progress = Progress(store, "resp_1", "tok", Run("resp_1"))  # type: ignore[arg-type]
    step = ReasoningDelta("hm", 2)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(progress.take, step)
            await store.waiting.wait()
            scope.cancel()
    # Not appended: nothing counted, no item open, so the engine may emit it again.
    assert (progress.reasoning, progress.output_tokens, progress.reasoning_tokens) == (None, 0, 0)
    store.room.set()
    await progress.take(step)
    await progress.take(Delta("ok"))
    assert (progress.output_tokens, progress.reasoning_tokens) == (3, 2)
    thought, message = progress.items()
    assert (thought.output_index, message.output_index) == (0, 1)
    assert thought.live()["content"] == [{"type": "reasoning_text", "text": "hm"}]


@pytest.mark.anyio
async def test_chat_engine_cancel_inside_emit_while_thinking(fake: FakeUpstream) -> None:
    engine = ChatEngine(UpstreamConfig(model="fake", url=fake.url))
    await engine.start()
    try:
        request = Generation("resp_1", "fake", [Message("user", "THINK=5 STALL_AFTER=3 go")])
        three = lambda steps: sum(type(s) is ReasoningDelta for s in steps) >= 3  # noqa: E731
        got = await collect(engine, request, three, "inside")
    finally:
        await engine.close()
    # The step the cancel landed on is emitted in the cleanup, then the count.
    assert [type(s) for s in got.after_cancel] == [ReasoningDelta, Report]
    assert sum(s.tokens for s in got.steps if type(s) is ReasoningDelta) == 3


class DeafThinker(ScriptedEngine):
    """Thinks three tokens, then waits for `release`, deaf to cancels (a stuck upstream):
    a cancel must fence it out and end the response from its log."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.thought = anyio.Event()

    async def generate(self, request: Generation, emit: Emit) -> None:
        await emit(PromptRead(input_tokens=1))
        with anyio.CancelScope(shield=True):
            for word in ("one", " two", " three"):
                await emit(ReasoningDelta(word))
            self.thought.set()
            await self.release.wait()


@pytest.mark.anyio
async def test_a_response_ended_from_its_log_counts_its_reasoning(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "tether.db"))
    engine = DeafThinker()
    lc = Lifecycle(store, engine, Settings(db=store.path, cancel_timeout=0.2))
    await lc.start()
    try:
        body = {
            "model": "scripted",
            "input": "x",
            "background": True,
            "include": ["reasoning.encrypted_content"],
        }
        rec = await lc.create(parse_create(body), "t")
        with anyio.fail_after(10):
            await engine.thought.wait()
        reply = await lc.cancel(rec.id, "t")  # the run does not answer: fenced out
        assert reply["status"] == "cancelled"
        assert reply["usage"]["output_tokens"] == 3
        assert reply["usage"]["output_tokens_details"]["reasoning_tokens"] == 3
        [thought] = reply["output"]
        assert (thought["type"], thought["status"]) == ("reasoning", "incomplete")
        assert thought["content"] == [{"type": "reasoning_text", "text": "one two three"}]
        # Sealed as the run would have sealed it (`include`): it reads back.
        assert Thought.unseal(thought["encrypted_content"]).text == "one two three"
    finally:
        engine.release.set()
        await lc.stop()


@pytest.mark.anyio
async def test_chat_engine_cancel_recounts_thinking_with_the_tokenizer(fake: FakeUpstream) -> None:
    engine = ChatEngine(UpstreamConfig(model="fake", url=fake.url, tokenizer=str(smollm2_gguf())))
    await engine.start()
    try:
        request = Generation("resp_1", "fake", [Message("user", "THINK=3 STALL_AFTER=5 go")])
        five = lambda steps: sum(type(s) in (Delta, ReasoningDelta) for s in steps) >= 5  # noqa: E731
        got = await collect(engine, request, five, "task")
        assert engine._tokenizer is not None
        thought = "".join(s.text for s in got.steps if type(s) is ReasoningDelta)
        expected = engine._tokenizer.count(thought)
        answer = engine._tokenizer.count(got.text)
    finally:
        await engine.close()
    report = got.steps[-1]
    assert isinstance(report, Report) and report.reasoning_tokens == expected > 0
    assert report.output_tokens == expected + answer


def test_a_next_turn_gets_the_answer_as_content_and_the_thinking_apart(
    tether: Server, fake: FakeUpstream
) -> None:
    """A `previous_response_id` chain gives the upstream what a `store: false` client
    sending the items back gives it (tests/test_reasoning_input.py): the answer as the
    assistant message's content, the thinking never in it but in `reasoning_content`,
    which the model's chat template shows or drops."""
    with tether.client() as client:
        first = client.responses.create(model="vllm", input="THINK=4 LENGTH=6 go")
        second = client.responses.create(
            model="vllm", input="LENGTH=2 more", previous_response_id=first.id
        )
    assert second.status == "completed"
    messages = fake.last().body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"].strip() == "echo foxtrot"
    assert messages[1]["reasoning_content"].strip() == THOUGHT
