"""Open Responses conformance: required fields, request bodies (JSON and form), image
input, function tools with every `tool_choice`, every `text.format`, assistant `phase`.

Every reply in this module passes through `spec.ValidatingTransport` (the `Server.client()`
clients, and the raw `http` client below), which checks it against the specs as it
passes; the tests also check that the checks ran (`spec.CHECKED`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest

import spec
from tether import wire
from tether.errors import APIError
from tether.wire_form import parse_form
from tether.wire_input import IMAGE_PLACEHOLDER
from upstreams import FakeUpstream, fake_upstream

from conftest import Server, served

MODEL = "scripted"
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8"
    "z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {"type": "function", "name": "get_time", "parameters": None},
]


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with served(
        tmp_path_factory.mktemp("conformance"),
        "--engine",
        "scripted",
        "--debug-routes",
        "--scripted-rate",
        "1000",
        "--scripted-length",
        "20",
    ) as server:
        yield server


@pytest.fixture
def sdk(fast: Server) -> Iterator[openai.OpenAI]:
    with fast.client() as c:
        yield c


@pytest.fixture
def http(fast: Server) -> Iterator[httpx2.Client]:
    """Raw HTTP, every reply checked against the specs all the same."""
    with httpx2.Client(
        base_url=fast.base_url, timeout=10, transport=spec.ValidatingTransport()
    ) as c:
        yield c


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """A chat-completions upstream (the fake): a model that takes tools and formats."""
    with served(
        tmp_path_factory.mktemp("conformance-up"),
        "--engine",
        "none",
        "--upstream",
        f"fake={fake.url}",
    ) as server:
        yield server


@pytest.fixture
def up(upstream: Server) -> Iterator[openai.OpenAI]:
    with upstream.client() as c:
        yield c


def refusal(call: Any) -> dict[str, Any]:
    """The error body of a call that must fail with 400, via the SDK."""
    with pytest.raises(openai.BadRequestError) as exc:
        call()
    body: dict[str, Any] = exc.value.response.json()["error"]
    return body


# --- the checks themselves ------------------------------------------------------------------


def _mock(status: int, kind: str, body: bytes) -> openai.OpenAI:
    def reply(request: httpx2.Request) -> httpx2.Response:
        # A stream, not `content=`: a body given whole is never read through the stream.
        return httpx2.Response(
            status, headers={"content-type": kind}, stream=httpx2.ByteStream(body)
        )

    transport = spec.ValidatingTransport(httpx2.MockTransport(reply))
    return openai.OpenAI(
        base_url="http://127.0.0.1:9/v1",
        api_key="x",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(transport=transport),
    )


@pytest.mark.parametrize(
    ("status", "kind", "body", "found"),
    [
        (200, "application/json", b'{"id": "r", "object": "response"}', "not a ResponseResource"),
        (
            400,
            "application/json",
            b'{"error": {"message": "m", "type": "t"}}',
            "not a ErrorResponse",
        ),
        (
            200,
            "text/event-stream",
            b'event: response.created\ndata: {"type": "error"}\n\ndata: [DONE]\n\n',
            "is not the type",
        ),
        (
            200,
            "text/event-stream",
            b'event: response.queued\ndata: {"type": "response.queued", "sequence_number": 0}\n\n',
            "response",
        ),
        (200, "text/event-stream", b"", "without data: [DONE]"),
    ],
)
def test_the_transport_catches_replies_the_specs_forbid(
    status: int, kind: str, body: bytes, found: str
) -> None:
    stream = kind == "text/event-stream"
    with _mock(status, kind, body) as client, pytest.raises((AssertionError, openai.APIError)):
        reply = client.responses.create(model="m", input="x", stream=stream)
        if stream:
            list(reply)  # type: ignore[arg-type]
    assert len(spec.VIOLATIONS) == 1 and found in spec.VIOLATIONS[0], spec.VIOLATIONS
    spec.VIOLATIONS.clear()


# --- item 1: every required field, every event -----------------------------------------------


def test_every_required_field_of_responses_and_events(
    sdk: openai.OpenAI, http: httpx2.Client
) -> None:
    assert len(spec.RESOURCE_REQUIRED) == 31
    for background in (False, True):
        r = http.post("/responses", json={"model": MODEL, "input": "hi", "background": background})
        obj = r.json()
        assert set(spec.RESOURCE_REQUIRED) <= set(obj)
        assert type(obj["created_at"]) is int
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            assert isinstance(obj[name], float), name
        assert type(obj["top_logprobs"]) is int and isinstance(obj["service_tier"], str)
    with http.stream(
        "POST", "/responses", json={"model": MODEL, "input": "hi", "stream": True}
    ) as r:
        raw = r.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    events = list(sdk.responses.create(model=MODEL, input="hi", stream=True))
    assert events[-1].type == "response.completed"
    kinds = {e.type for e in events}
    # Each was checked against its own schema (event name == type, [DONE] last).
    assert all(spec.CHECKED[k] >= 2 for k in kinds), spec.CHECKED
    assert spec.CHECKED["[DONE]"] == 2 and spec.CHECKED["ResponseResource"] == 2


def test_every_path_validates_sync_stream_background_cancel_errors(
    sdk: openai.OpenAI, fast: Server
) -> None:
    done = sdk.responses.create(model=MODEL, input="hi")
    sdk.responses.retrieve(done.id)
    bg = sdk.responses.create(model=MODEL, input="LINGER=5 hi", background=True, stream=True)
    rid = next(iter(bg)).response.id  # type: ignore[union-attr]
    assert sdk.responses.cancel(rid).status == "cancelled"
    assert list(bg)[-1].type == "response.failed"
    assert [e.type for e in sdk.responses.retrieve(rid, stream=True, starting_after=2)]
    sdk.responses.input_items.list(rid)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve("resp_missing")
    with pytest.raises(openai.BadRequestError):
        sdk.responses.cancel(done.id)  # a synchronous response
    with pytest.raises(openai.APIError):  # the `error` event, flat and nested, validated
        list(sdk.responses.create(model=MODEL, input="FAIL_AT=2", stream=True))
    sdk.responses.delete(rid)
    sdk.models.list()
    for name in (
        "ResponseResource",
        "ErrorResponse",
        "ResponseItemList",
        "DeletedResponse",
        "ListModelsResponse",
        "error",
        "response.failed",
        "response.queued",
    ):
        assert spec.CHECKED[name] >= 1, (name, spec.CHECKED)


def test_any_client_of_a_test_server_is_checked(fast: Server) -> None:
    # The hook (`spec.install`): raw httpx, and an SDK client with its default transport.
    httpx.post(f"{fast.base_url}/responses", json={"model": MODEL, "input": "x"}, timeout=10)
    with httpx.stream("GET", f"{fast.base_url}/responses/resp_nope", timeout=10) as r:
        r.read()
    with openai.OpenAI(base_url=fast.base_url, api_key="x", max_retries=0) as plain:
        list(plain.responses.create(model=MODEL, input="x", stream=True))
    assert spec.CHECKED["ResponseResource"] == 1 and spec.CHECKED["ErrorResponse"] == 1
    assert spec.CHECKED["response.completed"] == 1


@pytest.mark.anyio
async def test_async_clients_are_checked_too(fast: Server) -> None:
    async with fast.async_client() as c:
        stream = await c.responses.create(model=MODEL, input="hi", stream=True)
        rid = ""
        async for event in stream:
            rid = rid or event.response.id  # type: ignore[union-attr]
        await c.responses.retrieve(rid)
    assert spec.CHECKED["response.completed"] == 1 and spec.CHECKED["[DONE]"] == 1
    assert spec.CHECKED["ResponseResource"] == 1


# --- item 2: bodies -------------------------------------------------------------------------


def test_form_bodies_parse_like_json() -> None:
    body = parse_form(
        b"model=m&input=hi&stream=true&temperature=0.5&max_output_tokens=20"
        b"&metadata%5Bk%5D=v&tools=%5B%5D&instructions=%7Bbrace%7D"
    )
    assert body == {
        "model": "m",
        "input": "hi",
        "stream": True,
        "temperature": 0.5,
        "max_output_tokens": 20,
        "metadata": {"k": "v"},
        "tools": [],
        "instructions": "{brace}",
    }
    nested = parse_form(
        b"model=m&input[0][role]=user&input[0][content]=a"
        b"&input[1][role]=assistant&input[1][content]=b&include[]=x"
    )
    assert nested["input"] == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    assert nested.pop("include") == ["x"]
    assert wire.parse_create(nested).input[1].role == "assistant"  # type: ignore[union-attr]
    for bad, param in (
        (b"model=a&model=b", "model"),
        (b"text=%7Bnope", "text"),
        (b"input[0]=a&input[0][role]=user", "input[0][role]"),
        (b"input[5]=a", "input[5]"),
    ):
        with pytest.raises(APIError) as exc:
            parse_form(bad)
        assert exc.value.status == 400 and exc.value.param == param


def test_form_and_json_create_bodies(http: httpx2.Client) -> None:
    form = http.post(
        "/responses",
        data={
            "model": MODEL,
            "input": "hi",
            "max_output_tokens": "3",
            "metadata[k]": "v",
            "store": "true",
        },
    )
    assert form.status_code == 200, form.text
    assert form.headers["content-type"].startswith("application/json")
    obj = form.json()
    assert obj["status"] == "incomplete" and obj["metadata"] == {"k": "v"}
    assert obj["max_output_tokens"] == 3 and obj["usage"]["output_tokens"] == 3
    as_json = http.post(
        "/responses",
        json={"model": MODEL, "input": [{"type": "message", "role": "user", "content": "hi"}]},
    )
    assert as_json.status_code == 200 and as_json.json()["status"] == "completed"
    with http.stream(
        "POST", "/responses", data={"model": MODEL, "input": "hi", "stream": "true"}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.read().endswith(b"data: [DONE]\n\n")
    bad = http.post("/responses", data={"model": MODEL, "input": "hi", "stream": "maybe"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"
    other = http.post("/responses", content=b"model=x", headers={"content-type": "text/plain"})
    assert other.status_code == 415
    assert other.json()["error"]["code"] == "unsupported_media_type"
    assert spec.CHECKED["ResponseResource"] == 2 and spec.CHECKED["ErrorResponse"] == 2


def test_form_bodies_stay_bounded(tmp_path: Any, make_server: Any) -> None:
    server: Server = make_server("--max-body-bytes", "200")
    with httpx2.Client(
        base_url=server.base_url, timeout=10, transport=spec.ValidatingTransport()
    ) as c:
        r = c.post("/responses", data={"model": MODEL, "input": "x" * 500})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# --- item 2: images -------------------------------------------------------------------------


def test_image_input_is_accepted_answered_and_echoed(fast: Server, sdk: openai.OpenAI) -> None:
    content: Any = [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": PNG},
        {"type": "input_image", "image_url": "https://example.invalid/a.png", "detail": "low"},
    ]
    reply = sdk.responses.create(model=MODEL, input=[{"role": "user", "content": content}])
    assert reply.status == "completed" and reply.output_text
    seen = fast.trace(reply.id)["messages"]
    assert seen == [
        {"role": "user", "text": f"What is this?\n{IMAGE_PLACEHOLDER}\n\n{IMAGE_PLACEHOLDER}"}
    ]
    [item] = sdk.responses.input_items.list(reply.id)
    parts = item.content  # type: ignore[union-attr]
    assert [p.type for p in parts] == ["input_text", "input_image", "input_image"]
    assert (parts[1].image_url, parts[1].detail) == (PNG, "auto")  # type: ignore[union-attr]
    assert parts[2].detail == "low"  # type: ignore[union-attr]
    # Images come from the user only, and as URLs (tether fetches nothing).
    err = refusal(
        lambda: sdk.responses.create(
            model=MODEL,
            input=[{"role": "assistant", "content": [{"type": "input_image", "image_url": PNG}]}],
        )
    )
    assert err["param"] == "input[0].content[0].type"
    err = refusal(
        lambda: sdk.responses.create(
            model=MODEL,
            input=[
                {"role": "user", "content": [{"type": "input_image", "image_url": "file:///x"}]}
            ],
        )
    )
    assert err["param"] == "input[0].content[0].image_url"


def test_the_embedded_model_answers_an_image_request(make_server: Any) -> None:
    server: Server = make_server(engine="local")
    with server.client() as c:
        reply = c.responses.create(
            model="smollm2-135m",
            max_output_tokens=16,
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Describe this."},
                        {"type": "input_image", "image_url": PNG},
                    ],
                }
            ],
        )
    assert reply.status in ("completed", "incomplete") and reply.output_text.strip()
    assert reply.usage is not None and reply.usage.input_tokens > 10  # the placeholder too


def test_images_reach_upstreams_as_image_parts(up: openai.OpenAI, fake: FakeUpstream) -> None:
    up.responses.create(
        model="fake",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "LENGTH=2 look"},
                    {"type": "input_image", "image_url": PNG, "detail": "high"},
                ],
            }
        ],
    )
    assert fake.last().body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "LENGTH=2 look"},
                {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}},
            ],
        }
    ]


def test_images_pass_through_to_responses_upstreams() -> None:
    from tether.engines.base import Message
    from tether.engines.responses import input_items

    parts = [{"type": "text", "text": "look"}, {"type": "image", "url": PNG, "detail": "auto"}]
    assert input_items([Message("user", "look", parts=parts)]) == [
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "look"},
                {"type": "input_image", "image_url": PNG, "detail": "auto"},
            ],
        }
    ]


# --- item 2: tools and tool_choice ----------------------------------------------------------


@pytest.mark.parametrize(
    "choice",
    [
        "none",
        "auto",
        "required",
        {"type": "function", "name": "get_time"},
        {
            "type": "allowed_tools",
            "tools": [{"type": "function", "name": "get_time"}],
            "mode": "required",
        },
        {"type": "allowed_tools", "tools": [{"type": "function", "name": "get_weather"}]},
    ],
    ids=["none", "auto", "required", "function", "allowed-required", "allowed-default"],
)
def test_tool_choice_variants_are_accepted_echoed_and_sent(
    up: openai.OpenAI, fake: FakeUpstream, choice: Any
) -> None:
    reply = up.responses.create(model="fake", input="LENGTH=2 hi", tools=TOOLS, tool_choice=choice)
    assert reply.status == "completed"
    echoed = (
        reply.tool_choice
        if isinstance(reply.tool_choice, str)
        else (reply.tool_choice.model_dump())
    )
    expected = choice if isinstance(choice, str) else {"mode": "auto", **choice}
    if isinstance(choice, dict) and choice["type"] == "function":
        expected = choice
    assert echoed == expected
    assert [t.name for t in reply.tools] == ["get_weather", "get_time"]  # type: ignore[union-attr]
    assert reply.tools[1].description is None and reply.tools[1].strict is True  # type: ignore[union-attr]
    sent = fake.last().body
    if isinstance(choice, dict) and choice["type"] == "allowed_tools":
        # A hard limit: only the allowed tools reach the model, with the mode.
        assert [t["function"]["name"] for t in sent["tools"]] == [choice["tools"][0]["name"]]
        assert sent["tool_choice"] == choice.get("mode", "auto")
    else:
        assert len(sent["tools"]) == 2


def test_allowed_tools_mode_none_and_tool_choice_refusals(
    upstream: Server, up: openai.OpenAI
) -> None:
    # `mode: "none"` is Open Responses' (the SDK types only auto/required): raw HTTP.
    with httpx2.Client(
        base_url=upstream.base_url, timeout=10, transport=spec.ValidatingTransport()
    ) as c:
        r = c.post(
            "/responses",
            json={
                "model": "fake",
                "input": "LENGTH=1 x",
                "tools": TOOLS,
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "none",
                    "tools": [{"type": "function", "name": "get_time"}],
                },
            },
        )
    assert r.status_code == 200 and r.json()["tool_choice"]["mode"] == "none"
    err = refusal(
        lambda: up.responses.create(
            model="fake", input="x", tools=TOOLS, tool_choice={"type": "function", "name": "nope"}
        )
    )
    assert err["param"] == "tool_choice.name"
    err = refusal(
        lambda: up.responses.create(
            model="fake",
            input="x",
            tools=TOOLS,
            tool_choice={
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "function", "name": "no"}],
            },
        )
    )
    assert err["param"] == "tool_choice.tools[0].name"


def test_built_in_engines_take_tools(sdk: openai.OpenAI) -> None:
    # Issue 13: the scripted (and embedded) engines apply tools; a forced choice calls.
    reply = sdk.responses.create(model=MODEL, input="x", tools=TOOLS, tool_choice="required")
    assert [item.type for item in reply.output] == ["function_call"]
    reply = sdk.responses.create(model=MODEL, input="x", tool_choice="none", tools=[])
    assert reply.tool_choice == "none"


# --- item 2: text.format --------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "name": "thing", "schema": {"type": "object"}},
        {
            "type": "json_schema",
            "name": "thing",
            "description": "a thing",
            "strict": True,
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        },
    ],
    ids=["text", "json_object", "json_schema", "json_schema-strict"],
)
def test_text_format_variants_are_echoed_per_spec(
    up: openai.OpenAI, fake: FakeUpstream, fmt: dict[str, Any]
) -> None:
    reply = up.responses.create(
        model="fake", input="LENGTH=2 x", text={"format": fmt}, max_output_tokens=16
    )
    echoed = reply.text.format.model_dump(by_alias=True)  # type: ignore[union-attr]
    if fmt["type"] == "json_schema":
        assert echoed == {"description": None, "strict": False, **fmt}
        assert fake.last().body["response_format"]["json_schema"]["name"] == "thing"
    else:
        assert echoed == fmt
    assert spec.CHECKED["ResponseResource"] == 1


def test_text_format_refusals(sdk: openai.OpenAI, up: openai.OpenAI) -> None:
    err = refusal(
        lambda: up.responses.create(
            model="fake",
            input="x",
            text={"format": {"type": "json_schema", "schema": {"type": "object"}}},
        )
    )  # type: ignore[typeddict-item]
    assert (err["param"], err["code"]) == ("text.format.name", "missing_required_parameter")
    reply = sdk.responses.create(model=MODEL, input="x", text={"format": {"type": "json_object"}})
    assert reply.output_text == "{}"  # the built-in engines apply it (issue 13)


# --- item 2: assistant phase ----------------------------------------------------------------


def test_assistant_phase_is_accepted_and_echoed(fast: Server, sdk: openai.OpenAI) -> None:
    reply = sdk.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "thinking aloud", "phase": "commentary"},
            {
                "role": "assistant",
                "content": [{"type": "output_text", "text": "done"}],
                "phase": "final_answer",
            },
            {"role": "user", "content": "and?"},
        ],
    )
    assert reply.status == "completed"
    items = list(sdk.responses.input_items.list(reply.id, order="asc"))
    assert [getattr(i, "phase", None) for i in items] == [None, "commentary", "final_answer", None]
    assert [m["role"] for m in fast.trace(reply.id)["messages"]] == [  # type: ignore[index]
        "user",
        "assistant",
        "assistant",
        "user",
    ]
    err = refusal(
        lambda: sdk.responses.create(
            model=MODEL, input=[{"role": "user", "content": "hi", "phase": "commentary"}]
        )
    )
    assert err["param"] == "input[0].phase"
