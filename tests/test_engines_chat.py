"""The `chat` engine: tether in front of chat-completions upstreams.

Two upstreams, both real HTTP servers on loopback: the fault-injecting fake of
tests/upstreams.py (exact timing, failures, tool calls), and llama-cpp-python's own
OpenAI-compatible server serving the packaged SmolLM2 model (a real third party).
The engine is tested by itself first (its steps through `emit`, cancelled by a scope),
then through a whole tether server.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import orjson
import pytest

from engine_steps import after_tokens, collect, tokens
from tether.config import UpstreamConfig
from tether.engines import upstream
from tether.engines.base import (
    Delta,
    EngineError,
    Finished,
    Generation,
    Message,
    PromptRead,
    Report,
)
from tether.engines.chat import ChatEngine
from tether.engines.upstream import UpstreamGone, backoff
from upstreams import FakeUpstream, fake_upstream, llama_server, smollm2_gguf

from conftest import Server, free_port, raw_events, read_deltas

DONE_TYPES = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


@pytest.fixture
def via_fake(make_server: Any, fake: FakeUpstream) -> Server:
    server: Server = make_server(
        "--upstream", f"fake={fake.url},retries=2,read_timeout=3", engine="none"
    )
    return server


def check_cancelled_stream(events: list[Any]) -> None:
    """contract §3.4: the open message closed `incomplete`, then `response.failed`
    with status cancelled and no error."""
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    tail = [e.type for e in events[events.index(deltas[-1]) + 1 :]]
    assert tail == [*DONE_TYPES, "response.failed"], tail
    assert events[-1].response.status == "cancelled"
    assert events[-1].response.error is None
    assert events[-2].item.status == "incomplete"


# --- the engine by itself, against the fake upstream --------------------------------


@contextlib.asynccontextmanager
async def chat_engine(fake: FakeUpstream, **options: Any) -> AsyncIterator[ChatEngine]:
    engine = ChatEngine(UpstreamConfig(model="fake", url=fake.url, **options))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def ask(text: str) -> Generation:
    return Generation("resp_1", "fake", [Message("user", text)])


async def gone(fake: FakeUpstream) -> bool:
    """The upstream saw its client leave (within 5 s)."""
    return await anyio.to_thread.run_sync(fake.last().gone.wait, 5)


@pytest.mark.anyio
async def test_engine_steps_end_with_the_upstream_usage(fake: FakeUpstream) -> None:
    async with chat_engine(fake) as engine:
        got = await collect(engine, ask("LENGTH=3 go"))
    assert isinstance(got.steps[0], PromptRead)
    assert got.steps[1:] == [
        Delta("alpha"),
        Delta(" bravo"),
        Delta(" charlie"),
        Report(7, 3, {"input_tokens": "upstream", "output_tokens": "upstream"}),
        Finished("stop"),
    ]


@pytest.mark.anyio
async def test_engine_cancel_closes_the_upstream_connection_at_once(fake: FakeUpstream) -> None:
    # 50 tokens/s: one chunk every 20 ms; the cancel comes from another task.
    async with chat_engine(fake) as engine:
        got = await collect(engine, ask("RATE=50 LENGTH=500 go"), after_tokens(5), "task")
        assert await gone(fake), "the upstream connection was not closed"
    call = fake.last()
    assert got.cancel_caught and got.finished is None and got.stop_seconds < 0.5
    assert call.disconnected_at is not None and got.cancelled_wall is not None
    assert call.disconnected_at - got.cancelled_wall < 0.5
    # At most the chunk in flight when the cancel came, then the usage report.
    assert call.generated_after(got.cancelled_wall) <= 1
    assert tokens(got.after_cancel) <= 1
    report = got.steps[-1]
    assert isinstance(report, Report) and report.output_tokens is None
    assert report.notes == {"input_tokens": "estimate", "output_tokens": "chunks"}


@pytest.mark.anyio
async def test_engine_cancel_of_a_stalled_upstream(fake: FakeUpstream) -> None:
    async with chat_engine(fake) as engine:
        got = await collect(engine, ask("STALL_AFTER=3 LENGTH=50 go"), after_tokens(3), "task")
        assert await gone(fake)
    assert got.stop_seconds < 0.5 and tokens(got.steps) == 3
    assert isinstance(got.steps[-1], Report)


@pytest.mark.anyio
async def test_engine_cancel_landing_in_emit(fake: FakeUpstream) -> None:
    """The chunk whose `emit` the cancel interrupted is still emitted, then the usage."""
    async with chat_engine(fake) as engine:
        got = await collect(engine, ask("RATE=50 LENGTH=500 go"), after_tokens(3), "inside")
        assert await gone(fake)
    assert got.text == "alpha bravo charlie"
    assert [type(s) for s in got.after_cancel] == [Delta, Report]


@pytest.mark.anyio
async def test_engine_cancel_recounts_with_the_tokenizer(fake: FakeUpstream) -> None:
    async with chat_engine(fake, tokenizer=str(smollm2_gguf())) as engine:
        got = await collect(engine, ask("RATE=50 LENGTH=500 go"), after_tokens(4), "task")
        assert engine._tokenizer is not None
        expected = engine._tokenizer.count(got.text)
    report = got.steps[-1]
    assert isinstance(report, Report) and report.output_tokens == expected > 0
    assert report.notes == {"input_tokens": "tokenizer", "output_tokens": "tokenizer"}


@pytest.mark.anyio
async def test_engine_retries_before_the_first_token_only(fake: FakeUpstream) -> None:
    async with chat_engine(fake, retries=2) as engine:
        got = await collect(engine, ask("STATUS_ONCE=503 LENGTH=2 go"))
        assert got.text == "alpha bravo" and got.finished == Finished("stop")
        assert len(fake.calls) == 2
        with pytest.raises(EngineError) as refused:
            await collect(engine, ask("STATUS=429 go"))
        assert refused.value.code == "rate_limit_exceeded" and len(fake.calls) == 5
        with pytest.raises(UpstreamGone):
            await collect(engine, ask("FAIL_AT=3 go"))
        assert len(fake.calls) == 6  # never retried after the first token


@pytest.mark.anyio
async def test_streams_waiting_for_their_first_token_are_counted(fake: FakeUpstream) -> None:
    """While a stream waits for its first token, the others hand on short slices
    (`upstream.turn_events`); the count is right again whatever way a stream ends."""
    seen: list[int] = []

    def waiting(steps: list[Any]) -> bool:
        seen.append(upstream.turn_events())
        return isinstance(steps[-1], PromptRead)

    async with chat_engine(fake) as engine:
        await collect(engine, ask("STALL_AFTER=0 LENGTH=5 go"), waiting, "task")
        assert seen == [upstream.STARTING_TURN_EVENTS]
        assert upstream.turn_events() == upstream.TURN_EVENTS
        await collect(engine, ask("LENGTH=3 go"))
        with pytest.raises(EngineError):
            await collect(engine, ask("STATUS=429 go"))
    assert upstream.turn_events() == upstream.TURN_EVENTS


@pytest.mark.anyio
async def test_backoff_is_a_sleep_a_cancel_ends() -> None:
    begun = time.monotonic()
    with anyio.move_on_after(0.05) as scope:
        await backoff(4, UpstreamGone("x", retryable=True))  # 4 s
    assert scope.cancelled_caught and time.monotonic() - begun < 1.0


# --- the fake upstream ----------------------------------------------------------------


def test_create_maps_the_request_and_reports_upstream_usage(
    via_fake: Server, fake: FakeUpstream
) -> None:
    with via_fake.client() as client:
        first = client.responses.create(
            model="fake", input="LENGTH=3 hello", instructions="be brief"
        )
        assert first.status == "completed"
        assert first.output_text == "alpha bravo charlie"
        reply = client.responses.create(
            model="fake",
            input="LENGTH=4 again",
            previous_response_id=first.id,
            max_output_tokens=2,
            temperature=0.5,
            top_p=0.9,
            text={
                "format": {
                    "type": "json_schema",
                    "name": "thing",
                    "strict": True,
                    "schema": {"type": "object", "properties": {}},
                }
            },
        )
    assert fake.calls[0].body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "LENGTH=3 hello"},
    ]
    body = fake.last().body
    assert body["model"] == "fake" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    # The history of `previous_response_id`, without its instructions (as OpenAI).
    assert body["messages"] == [
        {"role": "user", "content": "LENGTH=3 hello"},
        {"role": "assistant", "content": "alpha bravo charlie"},
        {"role": "user", "content": "LENGTH=4 again"},
    ]
    assert body["max_tokens"] == 2 and body["temperature"] == 0.5 and body["top_p"] == 0.9
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "thing",
            "strict": True,
            "schema": {"type": "object", "properties": {}},
        },
    }
    # A budget hit upstream is `incomplete` (contract §1.3); usage is the upstream's.
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.text.format.type == "json_schema"
    usage = reply.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (7, 2)
    assert usage.model_extra is not None
    assert usage.model_extra["tether"] == {"input_tokens": "upstream", "output_tokens": "upstream"}


def test_cancel_closes_the_upstream_connection_within_one_chunk(
    via_fake: Server, fake: FakeUpstream
) -> None:
    # contract §3.2-3.4; the upstream streams at 50 tokens/s (one chunk every 20 ms).
    with via_fake.client() as client:
        stream = client.responses.create(
            model="fake", input="RATE=50 LENGTH=500 go", background=True, stream=True
        )
        rid, events = read_deltas(stream, 5)
        called = time.time()
        reply = client.responses.cancel(rid)
        replied = time.time()
        events += list(stream)
    call = fake.last()
    assert call.gone.wait(5), "the upstream connection was not closed"
    assert call.disconnected_at is not None
    # tether closes the connection before it replies; the upstream (a thread of this
    # busy test process) notices a moment later. What counts: at most one chunk was
    # generated after the cancel call (one may be in flight when the abort lands), and
    # none after the reply.
    assert call.disconnected_at - replied < 0.5
    assert call.generated_after(called) <= 1, call.generated_after(called)
    assert call.generated_after(replied) == 0
    assert reply.status == "cancelled"
    check_cancelled_stream(events)
    deltas = sum(e.type == "response.output_text.delta" for e in events)
    assert reply.usage is not None and reply.usage.output_tokens == deltas
    assert reply.usage.model_extra is not None
    assert reply.usage.model_extra["tether"]["output_tokens"] == "chunks"


def test_client_leaving_a_foreground_stream_closes_the_upstream(
    via_fake: Server, fake: FakeUpstream
) -> None:
    # contract §4.7: a non-background stream whose client disconnects is cancelled, and
    # the cancel reaches the upstream.
    with via_fake.client() as client:
        with client.responses.create(
            model="fake", input="RATE=50 LENGTH=500 go", stream=True
        ) as stream:
            rid, _ = read_deltas(stream, 3)
        left = time.time()
        call = fake.last()
        assert call.gone.wait(5), "the upstream connection was not closed"
        assert call.generated_after(left + 1.0) == 0
        deadline = time.monotonic() + 5
        while client.responses.retrieve(rid).status != "cancelled":
            assert time.monotonic() < deadline, "not cancelled"
            time.sleep(0.02)  # the server has no push API for a state change


def test_cancel_of_a_stalled_upstream(via_fake: Server, fake: FakeUpstream) -> None:
    with via_fake.client() as client:
        stream = client.responses.create(
            model="fake", input="STALL_AFTER=3 LENGTH=50 go", stream=True
        )
        rid, events = read_deltas(stream, 3)
        started = time.monotonic()
        reply = client.responses.cancel(rid)
        assert time.monotonic() - started < 1.0  # the run answered: no fencing bound
        events += list(stream)
    assert fake.last().gone.wait(5)
    assert reply.status == "cancelled" and reply.usage is not None
    assert reply.usage.output_tokens == 3
    check_cancelled_stream(events)


def test_upstream_ignoring_the_disconnect_still_gives_the_contract(
    via_fake: Server, fake: FakeUpstream
) -> None:
    with via_fake.client() as client:
        stream = client.responses.create(
            model="fake", input="IGNORE_CANCEL RATE=100 go", background=True, stream=True
        )
        rid, events = read_deltas(stream, 4)
        reply = client.responses.cancel(rid)
        events += list(stream)
        # Every later view agrees with the reply (contract §3.9).
        again = client.responses.retrieve(rid)
    assert reply.status == again.status == "cancelled"
    check_cancelled_stream(events)
    deltas = sum(e.type == "response.output_text.delta" for e in events)
    assert reply.usage is not None and again.usage is not None
    assert reply.usage.output_tokens == again.usage.output_tokens == deltas
    assert fake.last().gone.wait(5)


def test_upstream_dying_mid_stream_fails_the_response(via_fake: Server, fake: FakeUpstream) -> None:
    # contract §6.1: an `error` event, then `response.failed` with the error set.
    with via_fake.client() as client:
        rid = client.responses.create(model="fake", input="FAIL_AT=3 go", background=True).id
    events = raw_events(via_fake, rid)
    types = [e["type"] for e in events]
    assert types[-2:] == ["error", "response.failed"]
    assert types.count("response.output_text.delta") == 3
    final: Any = events[-1]["response"]
    assert final["status"] == "failed" and final["error"]["code"] == "server_error"
    assert "broke" in final["error"]["message"] or "before it finished" in final["error"]["message"]
    assert final["usage"]["output_tokens"] == 3
    assert len(fake.calls) == 1  # never retried after the first token


@pytest.mark.parametrize(
    ("status", "code", "attempts"),
    [
        (400, "invalid_prompt", 1),
        (401, "server_error", 1),
        (500, "server_error", 1),
        (429, "rate_limit_exceeded", 3),
        (503, "server_error", 3),
    ],
)
def test_upstream_errors_map_to_openai_errors(
    via_fake: Server, fake: FakeUpstream, status: int, code: str, attempts: int
) -> None:
    with via_fake.client() as client:
        reply = client.responses.create(model="fake", input=f"STATUS={status} go")
    assert reply.status == "failed" and reply.error is not None
    assert reply.error.code == code
    assert f"HTTP {status}: injected {status}" in reply.error.message
    # Only busy/unavailable statuses are retried (retries=2), all before any token.
    assert len(fake.calls) == attempts
    assert reply.usage is not None and reply.usage.output_tokens == 0


def test_retry_before_the_first_token_succeeds(via_fake: Server, fake: FakeUpstream) -> None:
    with via_fake.client() as client:
        reply = client.responses.create(model="fake", input="STATUS_ONCE=503 LENGTH=2 go")
    assert reply.status == "completed" and reply.output_text == "alpha bravo"
    assert len(fake.calls) == 2


def test_read_timeout_and_unreachable_upstream(make_server: Any, fake: FakeUpstream) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    server: Server = make_server(
        "--upstream",
        f"stall={fake.url},read_timeout=0.5,retries=0",
        "--upstream",
        f"gone={closed},retries=1,connect_timeout=1",
        engine="none",
    )
    with server.client() as client:
        stalled = client.responses.create(model="stall", input="STALL_AFTER=2 go")
        gone = client.responses.create(model="gone", input="hi")
    assert stalled.status == "failed" and stalled.error is not None
    assert "timed out" in stalled.error.message
    assert stalled.output_text == "alpha bravo"  # what arrived before the silence
    assert gone.status == "failed" and gone.error is not None
    assert "unreachable" in gone.error.message


def test_function_tool_round_trip_with_the_sdk(via_fake: Server, fake: FakeUpstream) -> None:
    tools: Any = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
            "strict": True,
        }
    ]
    with via_fake.client() as client:
        with client.responses.stream(
            model="fake", input="CALL=get_weather weather?", tools=tools
        ) as stream:
            kinds = [event.type for event in stream]
            first = stream.get_final_response()
        assert "response.function_call_arguments.delta" in kinds
        assert "response.function_call_arguments.done" in kinds
        call = first.output[-1]
        assert call.type == "function_call" and call.name == "get_weather"
        assert call.arguments == '{"city": "Paris"}' and call.status == "completed"
        sent = fake.last().body
        assert sent["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather",
                    "strict": True,
                    "parameters": tools[0]["parameters"],
                },
            }
        ]
        assert sent["tool_choice"] == "auto"
        follow = client.responses.create(
            model="fake",
            previous_response_id=first.id,
            tools=tools,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        )
    assert follow.status == "completed"
    assert follow.output_text == "The result is sunny"
    messages = fake.last().body["messages"]
    assert messages[-2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert messages[-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}


def test_models_config_file_and_api_key_from_env(
    make_server: Any, fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tether.toml"
    config.write_text(f"""
[[upstreams]]
model = "filed"
url = "{fake.url}"
upstream_model = "real-name"
api_key_env = "FAKE_UPSTREAM_KEY"

[[upstreams]]
model = "azure-style"
url = "{fake.url}"
api_key_env = "FAKE_UPSTREAM_KEY"
api_key_header = "api-key"

[[upstreams]]
model = "filed-responses"
url = "{fake.url}"
kind = "responses"
""")
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-secret")
    server: Server = make_server(
        "--config", str(config), "--upstream", f"flagged={fake.url}", engine="scripted"
    )
    with server.client() as client:
        ids = sorted(m.id for m in client.models.list())
        assert ids == ["azure-style", "filed", "filed-responses", "flagged", "scripted"]
        reply = client.responses.create(model="filed", input="LENGTH=1 hi")
        assert reply.output_text == "alpha"
        assert fake.last().body["model"] == "real-name"
        assert fake.last().headers["authorization"] == "Bearer sk-secret"
        client.responses.create(model="azure-style", input="LENGTH=1 hi")
        assert fake.last().headers["api-key"] == "sk-secret"
        assert "authorization" not in fake.last().headers
        assert (
            client.responses.create(model="scripted", input="hi", max_output_tokens=2).status
            == "incomplete"
        )
        # Routed to the scripted engine, which takes function outputs too (issue 13).
        assert client.responses.create(
            model="scripted",
            max_output_tokens=1,
            input=[{"type": "function_call_output", "call_id": "c", "output": "x"}],
        ).output_text
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="nope", input="hi")


def test_bad_upstream_flag_is_refused(tmp_path: Path) -> None:
    server = Server(tmp_path / "t.db", ["--upstream", "no-url-here"])
    with pytest.raises(RuntimeError, match="MODEL=URL"):
        server.start(timeout=20)


# --- llama-cpp-python's server (a real third-party upstream) ---------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("llama")
    with llama_server(tmp) as upstream:
        server = Server(
            tmp / "tether.db",
            [
                "--engine",
                "none",
                "--upstream",
                f"smollm2={upstream.url},tokenizer={smollm2_gguf()},retries=0",
            ],
        )
        server.start()
        try:
            yield server
        finally:
            server.stop()


def first_token_seconds(client: openai.OpenAI, prompt: str = "Say hello.") -> float:
    started = time.monotonic()
    with client.responses.create(
        model="smollm2", input=prompt, stream=True, max_output_tokens=4, temperature=0
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                return time.monotonic() - started
    raise AssertionError("no token")


def test_llama_create_and_stream(llama: Server) -> None:
    with llama.client() as client:
        reply = client.responses.create(
            model="smollm2", input="Name a colour.", max_output_tokens=8, temperature=0
        )
        assert reply.status == "incomplete" and reply.output_text
        usage = reply.usage
        assert usage is not None and usage.output_tokens > 0 and usage.input_tokens > 5
        assert usage.model_extra is not None
        # llama-cpp-python reports no usage on streams: counted with the GGUF's tokenizer.
        assert usage.model_extra["tether"] == {
            "input_tokens": "tokenizer",
            "output_tokens": "tokenizer",
        }
        with client.responses.create(
            model="smollm2", input="Name a colour.", max_output_tokens=8, temperature=0, stream=True
        ) as stream:
            events = list(stream)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    # Not compared with the first reply's text: llama.cpp reuses its prompt cache on the
    # second request, and even greedy decoding can then break a near-tie differently.
    assert events[-1].type == "response.incomplete"
    assert text and text == events[-1].response.output_text
    streamed = events[-1].response.usage
    assert streamed is not None and 0 < streamed.output_tokens <= 8


def test_llama_background_resume_and_cancel_frees_the_upstream(llama: Server) -> None:
    with llama.client() as client:
        idle = min(first_token_seconds(client) for _ in range(2))
        stream = client.responses.create(
            model="smollm2",
            input="Write a very long story about a lighthouse keeper.",
            background=True,
            stream=True,
            max_output_tokens=1000,
        )
        rid, events = read_deltas(stream, 5)
        # Resume from the middle (contract §4.4) while it runs.
        seq = events[3].sequence_number
        with client.responses.retrieve(rid, stream=True, starting_after=seq) as resumed:
            first = next(iter(resumed))
            assert first.sequence_number == seq + 1
        reply = client.responses.cancel(rid)
        events += list(stream)
        assert reply.status == "cancelled"
        check_cancelled_stream(events)
        # The upstream runs one generation at a time: had the cancelled one gone on
        # (up to 1000 tokens at ≤ 58 tokens/s: ~17 s), this first token would wait for it.
        # llama-cpp-python itself takes ~0.3 s to notice a closed connection; the margin
        # is for a loaded 2-core machine, where one token step can take 10x longer.
        after = first_token_seconds(client)
        assert after < idle + 5.0, (after, idle)
        full = raw_events(llama, rid)
    text = "".join(str(e["delta"]) for e in full if e["type"] == "response.output_text.delta")
    assert reply.output[0].type == "message"
    assert text == reply.output_text


def test_llama_upstream_direct_is_unchanged(llama: Server) -> None:
    # The models list reaches the upstream's model through tether's id.
    with llama.client() as client:
        assert [m.id for m in client.models.list()] == ["smollm2"]
    assert httpx.get(f"{llama.url}/health", timeout=5).status_code == 200


def test_tool_call_stream_validates_against_sdk_and_spec(via_fake: Server) -> None:
    """Every event of a text + function call stream, and the final object, validate with
    the SDK's types and the Open Responses schemas (tests/test_schema.py's checks), once
    the documented `usage.tether` extension is set aside."""
    from test_schema import check_response, check_stream

    body = {
        "model": "fake",
        "input": "CALL=lookup go",
        "stream": True,
        "tools": [
            {
                "type": "function",
                "name": "lookup",
                "parameters": {"type": "object", "properties": {}},
            }
        ],
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{via_fake.base_url}/responses", json=body) as r,
    ):
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [orjson.loads(line[6:]) for line in lines[:-1]]
    for event in events:
        if "response" in event and event["response"]["usage"]:
            assert set(event["response"]["usage"].pop("tether")) >= {"output_tokens"}
    check_stream(events)
    types = [e["type"] for e in events]
    assert types[-4:] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = check_response(events[-1]["response"])
    assert final.output[0].type == "function_call"


def test_upstream_flags_and_settings_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.config import load_settings, parse_upstream

    spec = parse_upstream("gpt=responses+https://api.example/v1,api_key_env=K,retries=0")
    assert (spec.model, spec.kind, spec.url, spec.api_key_env, spec.retries) == (
        "gpt",
        "responses",
        "https://api.example/v1",
        "K",
        0,
    )
    assert parse_upstream("m=http://h:1/v1").kind == "chat"
    assert parse_upstream("m=chat+http://h:1/v1").url == "http://h:1/v1"
    for bad in (
        "no-equals",
        "m=http://h/v1,nokey",
        "m=http://h/v1,bogus=1",
        "m=http://h/v1,retries=-1",
    ):
        with pytest.raises(ValueError):
            parse_upstream(bad)
    config = tmp_path / "t.toml"
    config.write_text(
        'port = 1\nkeepalive = 5.0\n[[upstreams]]\nmodel = "a"\nurl = "http://f/v1"\n'
    )
    monkeypatch.setenv("TETHER_KEEPALIVE", "7")
    settings = load_settings(str(config), port=3, upstream=["a=responses+http://g/v1"])
    assert settings.port == 3  # flag > file
    assert settings.keepalive == 7.0  # env > file
    [only] = settings.all_upstreams()  # a flag replaces the file's entry for its model
    assert (only.model, only.kind, only.url) == ("a", "responses", "http://g/v1")
    assert settings.engine_kind() == "none"
    assert load_settings().engine_kind() == "local"


def test_cancel_during_a_function_call_closes_it_incomplete(
    via_fake: Server, fake: FakeUpstream
) -> None:
    # contract §3.4 for a function_call item: its `.done` events, status incomplete.
    tools: Any = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    with via_fake.client() as client:
        rid = client.responses.create(
            model="fake", input="CALL=f STALL_AFTER=1 go", tools=tools, background=True
        ).id
        deadline = time.monotonic() + 5
        while not client.responses.retrieve(rid).output:
            assert time.monotonic() < deadline, "no function call started"
            time.sleep(0.02)  # the server has no push API for a state change
        reply = client.responses.cancel(rid)
    assert fake.last().gone.wait(5)
    assert reply.status == "cancelled"
    [item] = reply.output
    assert item.type == "function_call" and item.status == "incomplete"
    assert item.arguments == '{"city"'
    events = raw_events(via_fake, rid)
    assert [e["type"] for e in events[-3:]] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.failed",
    ]
    assert reply.usage is not None and reply.usage.output_tokens == 1


def test_upstream_context_option_refuses_before_sending(
    make_server: Any, fake: FakeUpstream
) -> None:
    """`context=N`: a prompt over it is refused (or truncated) before the upstream sees it;
    counted with the estimate when no tokenizer is configured (input_tokens agrees)."""
    server: Server = make_server("--upstream", f"fake={fake.url},context=200", engine="none")
    turns: list[Any] = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 60} for i in range(10)
    ] + [{"role": "user", "content": "LENGTH=2 go"}]
    with server.client() as client:
        counted = client.responses.input_tokens.count(model="fake", input=turns)
        assert counted.input_tokens > 200
        sent = len(fake.calls)
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="fake", input=turns)
        assert refused.value.code == "context_length_exceeded" and len(fake.calls) == sent
        done = client.responses.create(model="fake", input=turns, truncation="auto")
    assert done.status == "completed"
    assert len(fake.last().body["messages"]) < len(turns)
    assert fake.last().body["messages"][-1]["content"] == "LENGTH=2 go"
