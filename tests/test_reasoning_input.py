"""Reasoning items going back in (issue 16): `include: ["reasoning.encrypted_content"]`
seals the thinking with the install's key; a `store: false` client (Codex) sends the item
back and the upstream gets the earlier thinking again (chat: `reasoning_content` on the
assistant message; Responses: the reasoning item, with the upstream's own id and
encrypted content). Also: summaries from a Responses upstream, and `think_tags = "open"`
for templates that open `<think>` in the prompt (DeepSeek-R1).

Through a real tether server and the `openai` SDK; every reply and event is checked
against both specs by tests/spec.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import spec
from tether import compact, seal
from tether.engines.base import Delta, ReasoningDelta
from tether.engines.chat import chat_messages
from tether.engines.responses import input_items
from tether.engines.think import Splitter
from tether.turns import Message, Thought
from tether.wire_items import history
from upstreams import FakeUpstream, fake_upstream, llama_server

from conftest import Server, served

THOUGHT = "alpha bravo charlie delta"  # THINK=4: the fake's first four words
SEALED = ["reasoning.encrypted_content"]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


@pytest.fixture(scope="module")
def tether(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flags = ["--engine", "none", "--upstream", f"vllm={fake.url}"]
    flags += ["--upstream", f"quiet={fake.url},reasoning_field=none"]
    flags += ["--upstream", f"ollama={fake.url},reasoning_field=reasoning"]
    flags += ["--upstream", f"r1={fake.url},think_tags=open"]
    flags += ["--upstream", f"rs=responses+{fake.url}"]
    with served(tmp_path_factory.mktemp("reasoning-input"), *flags) as server:
        # This process reads the server's tokens with the install's key (`<db>.key`).
        key = seal._key
        seal.configure(str(server.db))
        try:
            yield server
        finally:
            seal._key = key


def error_of(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as exc:
        call()
    body: dict[str, Any] = exc.value.response.json()["error"]
    return body


def items(response: Any) -> list[dict[str, Any]]:
    """A response's output as input items, as a `store: false` client keeps them."""
    return [i.model_dump(exclude_none=True) for i in response.output]


# --- the parts ----------------------------------------------------------------------------


def test_a_thought_round_trips_sealed_and_refuses_alteration() -> None:
    thought = Thought("hmm", ["short"], {"id": "rs_up", "encrypted_content": "x"})
    token = thought.seal()
    assert Thought.unseal(token) == thought
    kind, payload, mac = token.split(".")
    altered = [
        f"{kind}.{payload[:-2]}AA.{mac}",
        f"{kind}.{payload}.{mac[:-2]}AA",
        f"tc1.{payload}.{mac}",  # another kind's name on it
        "gAAAAABoOpenAIsOwnToken",
        "",
    ]
    for bad in altered:
        with pytest.raises(ValueError):
            Thought.unseal(bad)
    # One key, two kinds: neither token is accepted as the other.
    with pytest.raises(ValueError):
        compact.unseal(token)
    with pytest.raises(ValueError):
        Thought.unseal(compact.seal([]))
    assert issubclass(seal.Unsealed, ValueError)


def test_history_gives_thinking_to_the_assistant_turn_it_precedes() -> None:
    text = lambda t: {"type": "reasoning", "summary": [], "content": [t]}  # noqa: E731
    part = {"type": "reasoning_text", "text": "plain"}
    sealed = {"type": "reasoning", "summary": [], "encrypted_content": Thought("kept").seal()}
    turns = history(
        [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
            sealed,
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
            text(part),
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "a"}],
            },
            text(part),  # a reply that never came: no turn to carry it
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q2"}]},
        ]
    )
    assert [(t.role, [r.text for r in t.reasoning]) for t in turns] == [
        ("user", []),
        ("assistant", ["kept"]),
        ("tool", []),
        ("assistant", ["plain"]),
        ("user", []),
    ]


def test_upstreams_get_the_thinking_in_their_own_shape() -> None:
    turn = Message("assistant", "answer", reasoning=[Thought("one"), Thought("two")])
    assert chat_messages([turn])[0] == {
        "role": "assistant",
        "content": "answer",
        "reasoning_content": "one\n\ntwo",
    }
    assert chat_messages([turn], "thinking")[0]["thinking"] == "one\n\ntwo"
    assert "reasoning_content" not in chat_messages([turn], "none")[0]
    upstream = {"id": "rs_up", "encrypted_content": "theirs"}
    turn = Message("assistant", "answer", reasoning=[Thought("", ["sum"], upstream)])
    assert input_items([turn]) == [
        {
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": "sum"}],
            "id": "rs_up",
            "encrypted_content": "theirs",
        },
        {"type": "message", "role": "assistant", "content": "answer"},
    ]


@pytest.mark.parametrize(
    "chunks",
    [
        ["alpha", " bravo", "</th", "ink>x"],
        ["alpha bravo</think>", "x"],
        ["<think>\n", "alpha bravo", "</think>x"],  # a template that streams the tag anyway
        ["<th", "ink>alpha", " bravo<", "/think>", "x"],
        ["\n", "<think>alpha bravo</think>x"],
    ],
)
def test_open_think_tags_start_inside_the_thinking(chunks: list[str]) -> None:
    splitter = Splitter(opened=True)
    steps = [s for c in chunks for s in splitter.steps(c)] + splitter.end()
    thought = "".join(s.text for s in steps if type(s) is ReasoningDelta)
    text = "".join(s.text for s in steps if type(s) is Delta)
    assert (thought.strip(), text) == ("alpha bravo", "x")
    assert sum(s.tokens for s in steps) == len(chunks)


def test_open_think_tags_without_a_close_are_all_thinking() -> None:
    splitter = Splitter(opened=True)
    steps = splitter.steps("no ") + splitter.steps("tags <b>") + splitter.end()
    assert all(type(s) is ReasoningDelta for s in steps)
    assert "".join(s.text for s in steps) == "no tags <b>"


# --- through tether: encrypted_content ----------------------------------------------------


def raw_create(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(f"{server.base_url}/responses", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


def test_encrypted_content_only_when_included(tether: Server) -> None:
    body = {"model": "vllm", "input": "THINK=4 LENGTH=8 go"}
    plain = raw_create(tether, body)
    assert plain["output"][0]["type"] == "reasoning"
    assert "encrypted_content" not in plain["output"][0]  # absent, as OpenAI
    with tether.client() as client:
        with client.responses.stream(model="vllm", input=body["input"], include=SEALED) as s:
            events = list(s)
            final = s.get_final_response()
        again = client.responses.retrieve(final.id)
    done = [e for e in events if e.type == "response.output_item.done"]
    completed = events[-1]
    assert completed.type == "response.completed"
    for thought in (done[0].item, completed.response.output[0], final.output[0], again.output[0]):
        assert thought.type == "reasoning"
        assert Thought.unseal(thought.encrypted_content).text.strip() == THOUGHT
    # The added item has no encrypted_content yet (nothing is sealed until it is done).
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.encrypted_content is None


@pytest.mark.parametrize(
    ("model", "field"), [("vllm", "reasoning_content"), ("ollama", "reasoning")]
)
def test_a_stateless_client_gives_the_thinking_back(
    tether: Server, fake: FakeUpstream, model: str, field: str
) -> None:
    with tether.client() as client:
        first = client.responses.create(
            model=model, input="THINK=4 LENGTH=8 go", store=False, include=SEALED
        )
        assert first.output[0].encrypted_content
        second = client.responses.create(
            model=model,
            input=[
                {"role": "user", "content": "THINK=4 LENGTH=8 go"},
                *items(first),
                {"role": "user", "content": "LENGTH=2 more"},
            ],
            store=False,
            include=SEALED,
        )
    assert second.status == "completed"
    messages = fake.last().body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"].strip() == "echo foxtrot golf hotel"  # the answer alone
    assert messages[1][field].strip() == THOUGHT  # the thinking, apart


def test_the_thinking_in_the_sealed_content_wins_over_the_shown_one(
    tether: Server, fake: FakeUpstream
) -> None:
    with tether.client() as client:
        first = client.responses.create(
            model="vllm", input="THINK=4 LENGTH=8 go", store=False, include=SEALED
        )
        thought = items(first)[0]
        thought["content"] = [{"type": "reasoning_text", "text": "something else"}]
        client.responses.create(
            model="vllm",
            input=[thought, items(first)[1], {"role": "user", "content": "LENGTH=1 ok"}],
            store=False,
        )
    assert fake.last().body["messages"][0]["reasoning_content"].strip() == THOUGHT


def test_reasoning_items_without_encrypted_content_are_taken_as_given(
    tether: Server, fake: FakeUpstream
) -> None:
    given = [
        {"role": "user", "content": "why?"},
        {
            "type": "reasoning",
            "id": "rs_elsewhere",
            "summary": [{"type": "summary_text", "text": "short"}],
            "content": [{"type": "reasoning_text", "text": "I pondered"}],
        },
        {"role": "assistant", "content": "because"},
        {"role": "user", "content": "LENGTH=1 ok"},
    ]
    with tether.client() as client:
        client.responses.create(model="vllm", input=given)  # type: ignore[arg-type]
        assert fake.last().body["messages"][1]["reasoning_content"] == "I pondered"
        client.responses.create(model="quiet", input=given)  # type: ignore[arg-type]
        assert "reasoning_content" not in fake.last().body["messages"][1]  # reasoning_field=none


def test_altered_or_foreign_encrypted_content_is_a_400(tether: Server) -> None:
    with tether.client() as client:
        first = client.responses.create(
            model="vllm", input="THINK=4 LENGTH=8 go", store=False, include=SEALED
        )
        token = first.output[0].encrypted_content
        assert token
        kind, payload, mac = token.split(".")
        foreign = f"{kind}.{payload}.{'A' * len(mac)}"  # as sealed with another install's key
        for bad in (f"{kind}.{payload[:-3]}xyz.{mac}", foreign, compact.seal([]), "gAAAAAB"):
            thought = items(first)[0] | {"encrypted_content": bad}
            err = error_of(
                lambda t=thought: client.responses.create(
                    model="vllm",
                    input=[{"role": "user", "content": "hi"}, t, items(first)[1]],
                    store=False,
                )
            )
            assert err["param"] == "input[1].encrypted_content", err
            assert err["type"] == "invalid_request_error"
            assert "encrypted reasoning content" in err["message"]


# --- through tether: a Responses upstream's summaries and encrypted content ---------------


def test_summaries_from_a_responses_upstream_reach_the_stream_helper(
    tether: Server, fake: FakeUpstream
) -> None:
    prompt = "THINK=4 SUMMARY=2 LENGTH=8 go"
    with (
        tether.client() as client,
        client.responses.stream(
            model="rs", input=prompt, include=SEALED, reasoning={"summary": "auto"}
        ) as stream,
    ):
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds.count("response.reasoning_summary_part.added") == 2
    assert kinds.count("response.reasoning_summary_text.delta") == 4
    assert kinds.count("response.reasoning_summary_text.done") == 2
    assert kinds.count("response.reasoning_summary_part.done") == 2
    assert "response.reasoning_text.delta" not in kinds
    for kind in set(kinds):  # every event was checked against both specs (tests/spec.py)
        assert spec.CHECKED[f"openai:{kind}"] > 0, kind
    thought, _ = final.output
    assert thought.type == "reasoning"
    assert [s.text for s in thought.summary] == ["alpha bravo", " charlie delta"]
    assert not thought.content  # a summary alone: no empty reasoning_text part
    assert final.output_text.strip() == "echo foxtrot golf hotel"
    assert final.usage.output_tokens_details.reasoning_tokens == 4
    assert fake.last().body["reasoning"] == {"summary": "auto"}  # forwarded
    assert fake.last().body["include"] == SEALED
    sealed = Thought.unseal(thought.encrypted_content or "")
    assert sealed.summary == ["alpha bravo", " charlie delta"]
    assert sealed.upstream == {
        "id": "rs_fake",
        "encrypted_content": f"sealed-by-upstream-{fake.last().id}",
    }


def test_a_cancel_while_summarizing_agrees_on_reasoning_tokens(
    tether: Server, fake: FakeUpstream
) -> None:
    directives = "THINK=6 SUMMARY=2 STALL_AFTER=3 LENGTH=12"
    with tether.client() as client:
        stream = client.responses.create(
            model="rs", input=f"{directives} go", background=True, stream=True, include=SEALED
        )
        rid, deltas = "", 0
        for event in stream:
            if event.type == "response.created":
                rid = event.response.id
            deltas += event.type == "response.reasoning_summary_text.delta"
            if deltas == 3:
                break
        reply = client.responses.cancel(rid)
        final = list(stream)[-1]
        again = client.responses.retrieve(rid)
    call = [c for c in fake.calls if directives in str(c.body)][-1]
    assert call.gone.wait(5), "the upstream connection was not closed"
    assert len(call.generated) == 3
    assert final.type == "response.failed"
    for response in (reply, final.response, again):
        assert response.status == "cancelled"
        assert response.usage.output_tokens == 3
        assert response.usage.output_tokens_details.reasoning_tokens == 3
        thought = response.output[0]
        assert thought.type == "reasoning" and thought.status == "incomplete"
        assert [s.text for s in thought.summary] == ["alpha bravo", " charlie"]
        assert Thought.unseal(thought.encrypted_content or "").summary == [
            "alpha bravo",
            " charlie",
        ]


def test_a_responses_upstream_gets_its_own_reasoning_item_back(
    tether: Server, fake: FakeUpstream
) -> None:
    with tether.client() as client:
        first = client.responses.create(
            model="rs", input="THINK=4 SUMMARY=4 LENGTH=8 go", store=False, include=SEALED
        )
        upstream_id = fake.last().id
        client.responses.create(
            model="rs",
            input=[
                {"role": "user", "content": "THINK=4 SUMMARY=4 LENGTH=8 go"},
                *items(first),
                {"role": "user", "content": "LENGTH=2 more"},
            ],
            store=False,
        )
    sent = fake.last().body["input"]
    assert [i.get("type") for i in sent] == ["message", "reasoning", "message", "message"]
    assert sent[1] == {
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": THOUGHT}],
        "id": "rs_fake",
        "encrypted_content": f"sealed-by-upstream-{upstream_id}",
    }


def test_a_responses_upstream_thinking_text_goes_back_as_content(
    tether: Server, fake: FakeUpstream
) -> None:
    with tether.client() as client:
        first = client.responses.create(model="rs", input="THINK=4 LENGTH=8 go")
        client.responses.create(model="rs", input="LENGTH=2 more", previous_response_id=first.id)
    # Not sealed (no `include`): the stored item's text is what goes back.
    assert fake.last().body["input"][1] == {
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": THOUGHT}],
    }


# --- through tether: think_tags = "open" --------------------------------------------------


def test_open_think_tags_through_tether(tether: Server) -> None:
    with tether.client() as client:
        response = client.responses.create(model="r1", input="THINK=4 STYLE=open LENGTH=8 go")
    thought, _ = response.output
    assert thought.type == "reasoning"
    assert thought.content and thought.content[0].text.strip() == THOUGHT
    # The fake spends the fifth token on `</th` (its token goes with the next step).
    assert response.output_text.strip() == "foxtrot golf hotel"
    assert response.usage.output_tokens == 8
    assert response.usage.output_tokens_details.reasoning_tokens == 4


# --- a real upstream ----------------------------------------------------------------------


def test_llama_cpp_server_takes_the_thinking_back(tmp_path: Path) -> None:
    """llama-cpp-python's server (no reasoning GGUF ships in a registry package we can
    use: SmolLM2 does not think) accepts the earlier thinking as `reasoning_content` on
    an assistant message, the default `reasoning_field`."""
    with (
        llama_server(tmp_path) as upstream,
        served(tmp_path, "--engine", "none", "--upstream", f"smollm2={upstream.url}") as server,
        server.client() as client,
    ):
        response = client.responses.create(
            model="smollm2",
            max_output_tokens=3,
            input=[
                {"role": "user", "content": "hi"},
                {
                    "type": "reasoning",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "they greet me"}],
                },
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"},
            ],
        )
    assert response.status == "incomplete"  # its 3 tokens, as asked
    assert response.usage.output_tokens == 3
