"""Every create field, tool type and input item type (issue 13; docs/fields.md): accepted,
and applied / forwarded / echoed / refused as the docs table says. Forwarding is read off
what the fake upstreams received; every reply is checked against both specs (`spec`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

import spec
from tether import wire_fields
from upstreams import FakeUpstream, fake_upstream

from conftest import Server, served, wait_for

DOCS = Path(__file__).resolve().parent.parent / "docs" / "fields.md"
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {
        "type": "namespace",
        "name": "crm",
        "description": "The CRM",
        "tools": [
            {
                "type": "function",
                "name": "lookup",
                "description": "Find a customer",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
            {"type": "custom", "name": "note", "description": "Write a note"},
        ],
    },
    {
        "type": "custom",
        "name": "apply_patch",
        "description": "Apply a patch",
        "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
    },
]
# Every forwarded field, with a value that is not its default.
FORWARDED: dict[str, Any] = {
    "parallel_tool_calls": False,
    "user": "u-1",
    "safety_identifier": "sid-1",
    "prompt_cache_key": "pck-1",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"ttl": "30m"},
    "reasoning": {"effort": "low", "summary": "auto"},
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "top_logprobs": 3,
    "max_tool_calls": 4,
    "truncation": "auto",
    "context_management": [{"type": "compaction", "compact_threshold": 5000}],
    "access_programs": {"cyber": "standard"},
    "image": {"context_compression": "auto"},
    "include": ["reasoning.encrypted_content", "message.output_text.logprobs"],
}
# What a chat-completions body carries of them (docs/fields.md, "chat upstream").
CHAT_SENT = {
    "parallel_tool_calls": False,
    "user": "u-1",
    "safety_identifier": "sid-1",
    "prompt_cache_key": "pck-1",
    "reasoning_effort": "low",
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "verbosity": "low",
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[Server]:
    """`fake`: a chat-completions upstream; `fake-r`: a Responses upstream; `scripted`."""
    with served(
        tmp_path_factory.mktemp("fields"),
        "--engine",
        "scripted",
        "--scripted-rate",
        "0",
        "--scripted-length",
        "5",
        "--upstream",
        f"fake={fake.url}",
        "--upstream",
        f"fake-r=responses+{fake.url}",
    ) as s:
        yield s


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with server.client() as c:
        yield c


def create(client: openai.OpenAI, **body: Any) -> Any:
    """`responses.create` with any fields (those the SDK does not type go as extra_body)."""
    return client.responses.create(extra_body=body)  # type: ignore[call-overload]


def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/responses", json=body, timeout=30)


# --- the table ------------------------------------------------------------------------------


def _openai_create_fields() -> set[str]:
    doc = spec._openai_doc()["components"]["schemas"]
    fields: set[str] = set()
    for part in doc["CreateResponse"]["allOf"]:
        target = doc[part["$ref"].rsplit("/", 1)[1]] if "$ref" in part else part
        for sub in target.get("allOf", [target]):
            sub = doc[sub["$ref"].rsplit("/", 1)[1]] if "$ref" in sub else sub
            fields |= set(sub.get("properties", {}))
    return fields


def test_every_field_of_both_specs_and_the_sdk_is_in_the_table() -> None:
    from openai.types.responses import response_create_params as params

    sdk = set(params.ResponseCreateParamsBase.__annotations__) | {"stream"}
    open_responses = set(spec.SPEC["components"]["schemas"]["CreateResponseBody"]["properties"])
    missing = (_openai_create_fields() | sdk | open_responses | {"client_metadata"}) - set(
        wire_fields.FIELDS
    )
    assert not missing, f"fields with no decision: {sorted(missing)}"


def test_every_field_is_exercised_here() -> None:
    # Each field of the table appears in a test of this module (forwarded, echoed,
    # accepted or refused as the table says); the applied ones in their own modules too.
    source = Path(__file__).read_text()
    assert [
        name
        for name in wire_fields.FIELDS
        if f'"{name}"' not in source and f"{name}=" not in source
    ] == []


def test_the_docs_table_is_the_code_table() -> None:
    table = DOCS.read_text().split("## Tools")[0]  # the fields table, before the tools'
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \|", table, re.M)
    assert dict(rows) == {name: f.decision for name, f in wire_fields.FIELDS.items()}


# --- forwarded and echoed -------------------------------------------------------------------


def test_chat_upstream_gets_the_fields_it_understands(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    reply = create(
        client,
        model="fake",
        input="LENGTH=3 hi",
        tools=TOOLS[:1],
        text={"verbosity": "low"},
        service_tier="auto",
        stream_options=None,
        client_metadata={"x-codex-turn-metadata": "{}"},
        **FORWARDED,
    )
    assert reply.status == "completed"
    sent = fake.last("chat").body
    assert {k: sent.get(k) for k in CHAT_SENT} == CHAT_SENT
    # Fields chat-completions servers do not share are not sent to them.
    for name in (
        "max_tool_calls",
        "truncation",
        "include",
        "reasoning",
        "client_metadata",
        "prompt_cache_retention",
        "context_management",
    ):
        assert name not in sent
    # `include` asks for logprobs: the chat way, with `top_logprobs`.
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 3)
    echoed = reply.model_dump()
    assert echoed["reasoning"] == {"effort": "low", "summary": "auto"} | {
        k: None for k in echoed["reasoning"] if k not in ("effort", "summary")
    }
    assert echoed["service_tier"] == "default"  # the tier used
    for name in (
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "max_tool_calls",
        "truncation",
        "top_logprobs",
        "parallel_tool_calls",
    ):
        assert echoed[name] == FORWARDED[name], name
    assert echoed["prompt_cache_options"]["ttl"] == "30m"
    assert echoed["text"]["verbosity"] == "low"
    assert reply.model_extra is None or "include" not in reply.model_extra  # not echoed
    raw = httpx.get(f"{client.base_url}responses/{reply.id}").json()
    assert (raw["presence_penalty"], raw["frequency_penalty"]) == (0.5, 0.25)
    # include message.output_text.logprobs: the upstream's, with top_logprobs.
    assert [lp["token"] for lp in raw["output"][0]["content"][0]["logprobs"]] == [
        "alpha",
        " bravo",
        " charlie",
    ]


def test_logprobs_come_through_where_the_engine_has_them(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    events = stream_events(
        client,
        model="fake",
        input="LENGTH=3 hi",
        top_logprobs=1,
        include=["message.output_text.logprobs"],
        stream_options={"include_obfuscation": True},
    )
    sent = fake.last("chat").body
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 1)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [d["logprobs"][0]["token"] for d in deltas] == ["alpha", " bravo", " charlie"]
    assert not any("obfuscation" in d for d in deltas)  # stream_options: accepted, no effect
    assert deltas[1]["logprobs"][0]["top_logprobs"] == [
        {"token": " bravo", "logprob": -0.5, "bytes": list(b" bravo")}
    ]
    part = events[-1]["response"]["output"][0]["content"][0]
    assert [lp["token"] for lp in part["logprobs"]] == ["alpha", " bravo", " charlie"]
    # Without the include value nothing is asked for: the arrays stay empty.
    create(client, model="fake", input="LENGTH=1 hi")
    assert "logprobs" not in fake.last("chat").body


def test_applied_fields_reach_the_engine(client: openai.OpenAI, fake: FakeUpstream) -> None:
    first = create(client, model="fake", input="LENGTH=1 hi", store=True)
    calls = len(fake.calls)
    reply = create(
        client,
        model="fake",
        input="LENGTH=5 hi",
        instructions="Be brief.",
        previous_response_id=first.id,
        max_output_tokens=2,
        temperature=0.5,
        top_p=0.9,
        metadata={"k": "v"},
        background=True,
        stream=False,
        text={"format": {"type": "json_object"}},
        tools=TOOLS[:1],
        tool_choice="none",
    )
    assert (reply.status, reply.background, reply.metadata) == ("queued", True, {"k": "v"})
    sent = fake.wait_call(calls + 1).body  # the background run's request
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][1]["content"] == "LENGTH=1 hi"  # the previous response's turn
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (2, 0.5, 0.9)
    assert (sent["tool_choice"], sent["response_format"]) == ("none", {"type": "json_object"})


def test_parallel_tool_calls_goes_to_chat_only_with_tools(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    create(client, model="fake", input="LENGTH=1 hi", parallel_tool_calls=True)
    assert "parallel_tool_calls" not in fake.last("chat").body


def test_responses_upstream_gets_every_forwarded_field_as_given(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    reply = create(
        client,
        model="fake-r",
        input="LENGTH=2 hi",
        tools=TOOLS[:1],
        text={"verbosity": "high"},
        **FORWARDED,
    )
    assert reply.status == "completed"
    sent = fake.last("/responses").body
    for name, value in FORWARDED.items():
        assert sent[name] == value, name
    assert sent["text"] == {"verbosity": "high"}


def test_the_completion_window_is_tethers_not_the_upstreams(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    # tether schedules the response (tests/test_schedule.py); the upstream is streamed
    # from as usual, so a window must not reach it (OpenAI refuses `2h` with a stream).
    reply = create(
        client,
        model="fake-r",
        input="LENGTH=2 hi",
        background=True,
        background_options={"completion_window": "2h", "continuation_id": "c-1"},
    )
    wait_for(lambda: client.responses.retrieve(reply.id).status == "completed", 60, "completed")
    assert "background_options" not in fake.last("/responses").body


def test_refused_fields_name_themselves_and_null_is_accepted(server: Server) -> None:
    for name, value in (
        ("prompt", {"id": "pmpt_1"}),
        ("moderation", {"model": "omni-moderation-latest"}),
    ):
        reply = post(server, {"model": "scripted", "input": "x", name: value})
        assert reply.status_code == 400
        assert (reply.json()["error"]["param"], reply.json()["error"]["code"]) == (
            name,
            "unsupported_parameter",
        )
        assert wire_fields.FIELDS[name].why in reply.json()["error"]["message"]
        assert post(server, {"model": "scripted", "input": "x", name: None}).status_code == 200
    reply = post(server, {"model": "scripted", "input": "x", "no_such_field": 1})
    assert reply.json()["error"]["code"] == "unknown_parameter"


def test_conversation_is_applied_and_echoed(client: openai.OpenAI, fake: FakeUpstream) -> None:
    # Applied (tests/test_conversations.py has the rest): the upstream gets the
    # conversation's items before the input; neither `conversation` nor its id is sent on.
    conv = client.conversations.create(items=[{"role": "user", "content": "earlier"}])
    reply = create(client, model="fake", input="now", conversation={"id": conv.id})
    assert reply.conversation.id == conv.id
    sent = fake.last("/chat/completions").body
    assert [m["content"] for m in sent["messages"]][-2:] == ["earlier", "now"]
    assert "conversation" not in sent


def test_prompt_cache_prewarm_generates_nothing(client: openai.OpenAI, fake: FakeUpstream) -> None:
    calls = len(fake.calls)
    reply = create(client, model="fake", input="hi", prompt_cache_options={"prewarm": True})
    assert reply.status == "completed" and reply.output == []
    assert reply.usage is not None and reply.usage.output_tokens == 0
    assert len(fake.calls) == calls  # the upstream was never asked


# --- tools ----------------------------------------------------------------------------------


def stream_events(client: openai.OpenAI, **body: Any) -> list[dict[str, Any]]:
    with client.responses.create(stream=True, extra_body=body) as events:  # type: ignore[call-overload]
        return [e.model_dump(exclude_unset=True) for e in events]


def test_namespace_tool_calls_come_back_with_their_namespace(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    events = stream_events(client, model="fake", input="CALL=crm__lookup now", tools=TOOLS)
    sent = fake.last("chat").body
    assert [t["function"]["name"] for t in sent["tools"]] == [
        "get_weather",
        "crm__lookup",
        "crm__note",
        "apply_patch",
    ]
    assert sent["tools"][2]["function"]["parameters"]["required"] == ["input"]
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["name"] == "lookup" and done["arguments"] == '{"city": "Paris"}'
    final = events[-1]["response"]
    call = final["output"][0]
    assert (call["type"], call["name"], call["namespace"]) == ("function_call", "lookup", "crm")
    assert [t["type"] for t in final["tools"]] == ["function", "namespace", "custom"]


def test_custom_tool_calls_round_trip(client: openai.OpenAI, fake: FakeUpstream) -> None:
    events = stream_events(
        client,
        model="fake",
        input="CALL=apply_patch now",
        tools=TOOLS,
        tool_choice={"type": "custom", "name": "apply_patch"},
    )
    assert fake.last("chat").body["tool_choice"] == {
        "type": "function",
        "function": {"name": "apply_patch"},
    }
    kinds = [e["type"] for e in events]
    assert "response.custom_tool_call_input.delta" in kinds
    deltas = "".join(
        e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"
    )
    done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    assert deltas == done["input"] == '*** Begin Patch\né"x"'
    item = events[-1]["response"]["output"][0]
    assert (item["type"], item["name"], item["input"]) == (
        "custom_tool_call",
        "apply_patch",
        done["input"],
    )
    assert events[-1]["response"]["tool_choice"] == {"type": "custom", "name": "apply_patch"}
    # Back as input: the chat upstream sees the call and its output.
    reply = create(
        client,
        model="fake",
        input=[
            {"role": "user", "content": "patch it"},
            {
                "type": "custom_tool_call",
                "call_id": item["call_id"],
                "name": "apply_patch",
                "input": item["input"],
            },
            {"type": "custom_tool_call_output", "call_id": item["call_id"], "output": "applied"},
        ],
        tools=TOOLS,
    )
    messages = fake.last("chat").body["messages"]
    assert messages[-2]["tool_calls"][0]["function"] == {
        "name": "apply_patch",
        "arguments": '{"input":"*** Begin Patch\\né\\"x\\""}',
    }
    assert messages[-1] == {"role": "tool", "tool_call_id": item["call_id"], "content": "applied"}
    assert reply.output_text == "The result is applied"


@pytest.mark.parametrize(
    ("choice", "sent_names", "sent_choice"),
    [
        (
            {"type": "function", "name": "lookup", "namespace": "crm"},
            None,
            {"type": "function", "function": {"name": "crm__lookup"}},
        ),
        (
            {"type": "function", "name": "lookup"},
            None,  # unique among the members
            {"type": "function", "function": {"name": "crm__lookup"}},
        ),
        (
            {
                "type": "allowed_tools",
                "mode": "required",
                "tools": [
                    {"type": "custom", "name": "note", "namespace": "crm"},
                    {"type": "function", "name": "get_weather"},
                ],
            },
            ["get_weather", "crm__note"],
            "required",
        ),
    ],
)
def test_tool_choice_names_namespaced_and_custom_tools(
    client: openai.OpenAI,
    fake: FakeUpstream,
    choice: dict[str, Any],
    sent_names: list[str] | None,
    sent_choice: Any,
) -> None:
    reply = create(client, model="fake", input="LENGTH=1 hi", tools=TOOLS, tool_choice=choice)
    assert reply.status == "completed"
    sent = fake.last("chat").body
    assert sent["tool_choice"] == sent_choice
    if sent_names is not None:
        assert [t["function"]["name"] for t in sent["tools"]] == sent_names
    echoed = httpx.get(f"{client.base_url}responses/{reply.id}").json()["tool_choice"]
    assert echoed == choice


def test_responses_upstream_calls_map_back_too(client: openai.OpenAI, fake: FakeUpstream) -> None:
    events = stream_events(client, model="fake-r", input="CALL=crm__note now", tools=TOOLS)
    sent = fake.last("/responses").body
    assert [t["name"] for t in sent["tools"]] == [
        "get_weather",
        "crm__lookup",
        "crm__note",
        "apply_patch",
    ]
    item = events[-1]["response"]["output"][0]
    assert (item["type"], item["namespace"], item["name"], item["input"]) == (
        "custom_tool_call",
        "crm",
        "note",
        '*** Begin Patch\né"x"',
    )


def test_hosted_tools_are_refused_by_default(server: Server) -> None:
    reply = post(
        server,
        {
            "model": "fake",
            "input": "x",
            "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}],
        },
    )
    assert reply.status_code == 400
    assert (reply.json()["error"]["param"], reply.json()["error"]["code"]) == (
        "tools[1].type",
        "unsupported_tool",
    )


def test_hosted_tools_can_be_dropped(tmp_path: Path, fake: FakeUpstream) -> None:
    with served(
        tmp_path, "--engine", "none", "--upstream", f"fake={fake.url}", "--hosted-tools", "drop"
    ) as s:
        reply = post(
            s,
            {
                "model": "fake",
                "input": "LENGTH=1 x",
                "tools": [
                    {"type": "file_search", "vector_store_ids": ["vs_1"]},
                    {"type": "function", "name": "f"},
                ],
            },
        )
    assert reply.status_code == 200
    body = reply.json()
    assert [t["name"] for t in body["tools"]] == ["f"]
    assert body["tether"] == {"dropped_tools": ["file_search"]}
    assert [t["function"]["name"] for t in fake.last("chat").body["tools"]] == ["f"]


# --- input items ----------------------------------------------------------------------------


def test_every_input_item_type_round_trips(client: openai.OpenAI, fake: FakeUpstream) -> None:
    first = create(client, model="fake", input="LENGTH=2 first")
    text_file = "data:text/plain;base64,aGVsbG8gZmlsZQ=="
    reply = create(
        client,
        model="fake",
        previous_response_id=first.id,
        tools=TOOLS,
        input=[
            {"type": "item_reference", "id": first.output[0].id},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "opaque"}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "read"},
                    {"type": "input_file", "filename": "notes.txt", "file_data": text_file},
                ],
            },
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I won't."}]},
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "lookup",
                "namespace": "crm",
                "arguments": "{}",
            },
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_text", "text": "found it"}],
            },
        ],
    )
    messages = fake.last("chat").body["messages"]
    assert messages[-4] == {"role": "assistant", "content": first.output_text}  # referenced
    assert messages[-3]["content"] == "read\n[notes.txt]\nhello file"
    assert messages[-2]["content"] == "I won't."
    assert messages[-2]["tool_calls"][0]["function"]["name"] == "crm__lookup"
    assert messages[-1]["content"] == "found it"
    # Kept, not shown: no assistant turn follows it (a user message does) to carry it.
    assert "opaque" not in str(messages)
    items = client.responses.input_items.list(reply.id, order="asc").data
    kinds = [i.type for i in items]
    assert kinds == [
        "message",
        "reasoning",
        "message",
        "message",
        "function_call",
        "function_call_output",
    ]
    assert items[0].id == first.output[0].id  # the referenced item itself
    assert items[1].content[0].text == "opaque"  # type: ignore[union-attr]


def test_unknown_item_references_and_binary_files_are_refused(server: Server) -> None:
    reply = post(server, {"model": "fake", "input": [{"type": "item_reference", "id": "msg_nope"}]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "input[0].id"
    pdf = "data:application/pdf;base64,JVBERi0xLjQ="
    reply = post(
        server,
        {
            "model": "fake",
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_file", "filename": "a.pdf", "file_data": pdf}],
                }
            ],
        },
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "input[0].content[0]"


def test_the_openai_document_is_loaded_once() -> None:
    # The checks of every event share one parse of the 3 MB YAML.
    assert spec._openai_doc() is spec._openai_doc()
    assert "response.custom_tool_call_input.delta" in spec.openai_event_pointers()
    assert isinstance(yaml.__version__, str)


# --- Codex's first request (issue 13), over HTTP and WebSocket ---------------------------------


def codex_request(model: str, prompt: str) -> dict[str, Any]:
    """A request shaped as Codex CLI 0.171's first one (texts cut, as captured)."""
    params = {
        "type": "object",
        "properties": {"cmd": {"type": "string"}},
        "required": ["cmd"],
        "additionalProperties": False,
    }
    uid = "01a24a0b-6dd8-7622-be79-e18cebd58715"
    return {
        "model": model,
        "stream": True,
        "store": False,
        "input": [
            {
                "type": "message",
                "role": "developer",
                "id": f"msg_{uid}0",
                "content": [{"type": "input_text", "text": "You are Codex."}],
            },
            {
                "type": "message",
                "role": "developer",
                "id": f"msg_{uid}1",
                "content": [{"type": "input_text", "text": "Skills: none."}],
            },
            {
                "type": "message",
                "role": "user",
                "id": f"msg_{uid}2",
                "content": [{"type": "input_text", "text": "<environment_context/>"}],
            },
            {
                "type": "message",
                "role": "user",
                "id": f"msg_{uid}3",
                "content": [{"type": "input_text", "text": prompt}],
            },
        ],
        "tools": [
            {
                "type": "function",
                "name": "exec_command",
                "description": "Runs a command",
                "strict": False,
                "parameters": params,
            },
            {
                "type": "function",
                "name": "write_stdin",
                "description": "Writes to a session",
                "strict": False,
                "parameters": params,
            },
            {
                "type": "namespace",
                "name": "multi_agent_v1",
                "description": "Tools for spawning and managing sub-agents.",
                "tools": [
                    {
                        "type": "function",
                        "name": "close_agent",
                        "description": "Close an agent",
                        "strict": False,
                        "parameters": params,
                    }
                ],
            },
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": uid,
        "client_metadata": {
            "x-codex-window-id": f"{uid}:0",
            "x-codex-turn-metadata": '{"session_id": "x"}',
        },
    }


def test_codex_first_request_runs_over_http(server: Server, fake: FakeUpstream) -> None:
    body = codex_request("fake", "CALL=exec_command list the files")
    with (
        httpx.Client(timeout=30, transport=spec.HttpxValidatingTransport()) as http,
        http.stream("POST", f"{server.base_url}/responses", json=body) as r,
    ):
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    final = httpx.Response(200, content=lines[-1][6:]).json()["response"]
    assert final["status"] == "completed"
    assert final["output"][0]["name"] == "exec_command"
    assert final["reasoning"] == {"effort": None, "summary": "auto"}
    sent = fake.last("chat").body
    assert sent["prompt_cache_key"] == body["prompt_cache_key"]
    assert sent["parallel_tool_calls"] is True
    assert "multi_agent_v1__close_agent" in [t["function"]["name"] for t in sent["tools"]]


def test_codex_over_websocket_prewarms_then_streams(server: Server) -> None:
    from test_websocket import Socket

    with Socket(server) as sock:
        inner = sock.ws.recv

        def recv(timeout: float | None = None) -> str:
            # The documented `usage.tether` extension set aside, as test_engines_chat does.
            message = json.loads(inner(timeout=timeout))
            ((message.get("response") or {}).get("usage") or {}).pop("tether", None)
            return json.dumps(message)

        sock.ws.recv = recv  # type: ignore[method-assign,assignment]
        warm = codex_request("fake", "hello") | {"type": "response.create", "generate": False}
        sock.send(warm)
        events = sock.turn()
        assert [e["type"] for e in events] == ["response.created", "response.completed"]
        turn = codex_request("fake", "LENGTH=3 go") | {
            "type": "response.create",
            "previous_response_id": events[-1]["response"]["id"],
            "input": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "LENGTH=3 go"}],
                }
            ],
        }
        sock.send(turn)  # with `"stream": true`, as Codex sends it
        events = sock.turn()
        assert events[-1]["type"] == "response.completed" and sock.errors == []
        assert events[-1]["response"]["output"][0]["content"][0]["text"] == "alpha bravo charlie"


def test_compaction_resolves_item_references(client: openai.OpenAI, server: Server) -> None:
    first = create(client, model="fake", input="LENGTH=2 remember this")
    reply = httpx.post(
        f"{server.base_url}/responses/compact",
        json={"model": "fake", "input": [{"type": "item_reference", "id": first.output[0].id}]},
        timeout=30,
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "input[0].id"
    reply = httpx.post(
        f"{server.base_url}/responses/compact",
        json={
            "model": "fake",
            "previous_response_id": first.id,
            "input": [{"type": "item_reference", "id": first.output[0].id}],
        },
        timeout=30,
    )
    assert reply.status_code == 200
    compacted = reply.json()["output"][-1]
    later = create(
        client, model="fake", input=[compacted, {"role": "user", "content": "LENGTH=1 go"}]
    )
    assert later.status == "completed"
