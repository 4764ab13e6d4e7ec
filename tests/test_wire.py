"""Request parsing and event building, without a server."""

from __future__ import annotations

from typing import Any

import pytest

from tether import wire, wire_output
from tether.errors import APIError
from tether.turns import Message, Thought, ToolCallSpec

#: a reasoning item's encrypted_content as this process seals it (`Thought.seal`)
SEALED = Thought("earlier thinking").seal()


def refused(body: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as exc:
        wire.parse_create(body)
    return exc.value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": 5}, "input"),
        ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "input": "x", "temperature": 2.5}, "temperature"),
        ({"model": "m", "input": "x", "top_p": 1.5}, "top_p"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        (
            {
                "model": "m",
                "input": [{"role": "user", "content": [{"type": "input_audio", "text": "x"}]}],
            },
            "input[0].content[0].type",
        ),
        (
            {
                "model": "m",
                "input": [{"role": "user", "content": [{"type": "input_image", "text": "x"}]}],
            },
            "input[0].content[0].image_url",
        ),
        ({"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata.k"),
        ({"model": "m", "input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"model": "m", "input": "x", "foo": 1}, "foo"),
        # Function tools and `text.format` are parsed (refused per model by the lifecycle);
        # hosted tools (by default) and unknown formats are refused here.
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "m", "input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
        # docs/fields.md: refused where accepting would give a silently wrong result.
        ({"model": "m", "input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
        (
            {"model": "m", "input": "x", "conversation": "c", "previous_response_id": "r"},
            "conversation",
        ),
        ({"model": "m", "input": "x", "conversation": {"id": 1}}, "conversation"),
        ({"model": "m", "input": "x", "conversation": {}}, "conversation.id"),
        ({"model": "m", "input": "x", "moderation": {"model": "omni"}}, "moderation"),
        ({"model": "m", "input": "x", "top_logprobs": 21}, "top_logprobs"),
        (
            {"model": "m", "input": "x", "tool_choice": {"type": "custom", "name": "nope"}},
            "tool_choice.name",
        ),
        (
            {
                "model": "m",
                "input": [
                    {"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}
                ],
            },
            "input[0].content[0].file_id",
        ),
        (
            {
                "model": "m",
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "input_file",
                                "file_data": "data:application/pdf;base64,JVBERi0=",
                            }
                        ],
                    }
                ],
            },
            "input[0].content[0]",
        ),
        ({"model": "m", "input": [{"type": "reasoning"}]}, "input[0].summary"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        (
            {"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]},
            "input[0].output",
        ),
    ],
)
def test_refusals_name_the_parameter(body: dict[str, Any], param: str) -> None:
    # contract §6.3
    err = refused(body)
    assert err.status == 400 and err.param == param
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": []},
        {"tool_choice": "auto"},
        {"include": []},
        {"reasoning": {"effort": None}},
        {"text": {"format": {"type": "text"}}},
        {"presence_penalty": 0},
        {"truncation": "auto"},
        {"user": "u"},
        {"parallel_tool_calls": False},
        {"store": False},
        {"prompt": None},
        {"conversation": None},
        {"moderation": None},
        {"reasoning": {"effort": "high", "summary": "auto"}},
        {"client_metadata": {"a": "b"}},
        {"include": ["reasoning.encrypted_content", "message.output_text.logprobs"]},
    ],
)
def test_defaults_of_unsupported_parameters_are_accepted(extra: dict[str, Any]) -> None:
    req = wire.parse_create({"model": "m", "input": "x", **extra})
    assert req.model == "m"


def test_input_items_keep_roles_and_sdk_item_shapes() -> None:
    req = wire.parse_create(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {
                    "type": "message",
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "c"}],
                },
            ],
        }
    )
    items = wire.input_items(req)
    assert [(i["role"], wire.item_text(i)) for i in items] == [
        ("user", "a"),
        ("assistant", "b"),
        ("developer", "c"),
    ]
    # `logprobs`: OpenAI's OutputTextContent requires it in input_items pages too.
    assert items[1]["content"][0] == {
        "type": "output_text",
        "text": "b",
        "annotations": [],
        "logprobs": [],
    }
    assert all(i["id"].startswith("msg_") and i["status"] == "completed" for i in items)


def test_message_item_events_and_replay() -> None:
    item = wire_output.MessageItem()
    events = [*item.opened(), item.delta("a"), item.delta("b")]
    done, still_open = wire_output.replay(events)
    assert done == [] and len(still_open) == 1 and "".join(still_open[0].text) == "ab"
    closing = still_open[0].closed("incomplete")
    assert [e["type"] for e in closing] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert closing[0]["text"] == "ab"
    assert closing[-1]["item"]["status"] == "incomplete"
    done, still_open = wire_output.replay(events + closing)
    assert still_open == [] and done == [closing[-1]["item"]]


def test_sse_frame() -> None:
    # contract §4.1
    assert wire.sse_frame("response.created", b'{"a":1}') == (
        b'event: response.created\ndata: {"a":1}\n\n'
    )
    assert wire.DONE_FRAME == b"data: [DONE]\n\n"


def test_error_event_has_flat_and_nested_fields() -> None:
    # contract §6.1
    event = wire.error_event("server_error", "boom")
    assert event["code"] == event["error"]["code"] == "server_error"
    assert event["message"] == event["error"]["message"] == "boom"


def test_hosted_tools_can_be_dropped_with_a_note() -> None:
    req = wire.parse_create(
        {
            "model": "m",
            "input": "x",
            "tools": [{"type": "web_search"}, {"type": "function", "name": "f"}],
        },
        "drop",
    )
    assert [t["name"] for t in req.toolset().echo] == ["f"]
    assert wire.echo_fields(req)["tether"] == {"dropped_tools": ["web_search"]}


def test_namespace_and_custom_tools_are_flattened_for_engines() -> None:
    req = wire.parse_create(
        {
            "model": "m",
            "input": "x",
            "tools": [
                {
                    "type": "namespace",
                    "name": "crm",
                    "description": "CRM",
                    "tools": [
                        {"type": "function", "name": "lookup", "parameters": {"type": "object"}},
                        {"type": "custom", "name": "note"},
                    ],
                },
                {
                    "type": "custom",
                    "name": "apply_patch",
                    "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
                },
            ],
            "tool_choice": {"type": "custom", "name": "apply_patch"},
        }
    )
    tools = req.toolset()
    assert [t["name"] for t in tools.engine] == ["crm__lookup", "crm__note", "apply_patch"]
    assert tools.names["crm__lookup"] == {"name": "lookup", "namespace": "crm"}
    assert tools.names["crm__note"] == {"name": "note", "namespace": "crm", "custom": True}
    assert tools.engine[2]["parameters"]["required"] == ["input"]
    assert "start: /.+/" in tools.engine[2]["description"]
    assert req.engine_tool_choice() == {"type": "function", "name": "apply_patch"}
    assert [t["type"] for t in wire.echo_fields(req)["tools"]] == ["namespace", "custom"]


def test_custom_tool_call_input_is_decoded_as_it_streams() -> None:
    item = wire_output.call_item(
        0, "call_1", "ns__edit", {"ns__edit": {"name": "edit", "namespace": "ns", "custom": True}}
    )
    assert isinstance(item, wire_output.CustomToolCallItem)
    pieces = ['{"in', 'put": "a\\', "nb \\u00", 'e9 \\"q\\"', ' \\ud83d\\ude00"}']
    deltas = [item.delta(p)["delta"] for p in pieces]
    assert "".join(deltas) == 'a\nb \u00e9 "q" \U0001f600'
    closing = item.closed("completed")
    assert closing[0] == {
        "type": "response.custom_tool_call_input.done",
        "item_id": item.id,
        "output_index": 0,
        "input": "".join(deltas),
    }
    assert closing[-1]["item"]["namespace"] == "ns" and closing[-1]["item"]["name"] == "edit"
    done, still_open = wire_output.replay(
        [
            *item.opened(),
            *[
                {"type": "response.custom_tool_call_input.delta", "item_id": item.id, "delta": d}
                for d in deltas
            ],
        ]
    )
    assert done == [] and "".join(still_open[0].input) == "".join(deltas)  # type: ignore[union-attr]


def test_function_call_done_event_names_the_function() -> None:
    item = wire_output.call_item(
        1, "call_1", "crm__lookup", {"crm__lookup": {"name": "lookup", "namespace": "crm"}}
    )
    item.delta("{}")
    done = item.closed("completed")[0]
    assert done["type"] == "response.function_call_arguments.done" and done["name"] == "lookup"


def test_every_input_item_type_round_trips() -> None:
    txt = "data:text/plain;base64,aGVsbG8gZmlsZQ=="
    req = wire.parse_create(
        {
            "model": "m",
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_file", "filename": "a.txt", "file_data": txt}],
                },
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": SEALED},
                {
                    "type": "custom_tool_call",
                    "call_id": "c1",
                    "name": "edit",
                    "namespace": "ns",
                    "input": "diff",
                },
                {"type": "custom_tool_call_output", "call_id": "c1", "output": "ok"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "part"}],
                },
                {"type": "item_reference", "id": "msg_1"},
                {"id": "msg_2"},
            ],
        }
    )
    items = wire.input_items(req)
    assert [i["type"] for i in items] == [
        "message",
        "message",
        "reasoning",
        "custom_tool_call",
        "custom_tool_call_output",
        "function_call",
        "function_call_output",
        "item_reference",
        "item_reference",
    ]
    assert items[2]["encrypted_content"] == SEALED
    turns = wire.history(items[:7])
    assert turns[0].text == "[a.txt]\nhello file"
    assert turns[1] == Message(
        "assistant",
        "no",
        [ToolCallSpec("c1", "ns__edit", '{"input":"diff"}')],
        reasoning=[Thought("earlier thinking")],  # the item before the call's turn
    )
    assert [t.role for t in turns] == ["user", "assistant", "tool", "assistant", "tool"]
    assert turns[-1] == Message("tool", "part", call_id="c2")
