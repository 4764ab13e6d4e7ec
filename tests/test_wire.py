"""Request parsing and event building, without a server."""

from __future__ import annotations

from typing import Any

import pytest

from tether import wire
from tether.errors import APIError


def refused(body: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as exc:
        wire.parse_create(body)
    return exc.value


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x"}, "model"),
    ({"model": "m"}, "input"),
    ({"model": "m", "input": 5}, "input"),
    ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "input": "x", "temperature": 2.5}, "temperature"),
    ({"model": "m", "input": "x", "top_p": 1.5}, "top_p"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
    ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_audio",
                                                            "text": "x"}]}]},
     "input[0].content[0].type"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image",
                                                            "text": "x"}]}]},
     "input[0].content[0].image_url"),
    ({"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata.k"),
    ({"model": "m", "input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"model": "m", "input": "x", "foo": 1}, "foo"),
    # Function tools and `text.format` are parsed (refused per model by the lifecycle);
    # hosted tools and unknown formats are refused here.
    ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
    ({"model": "m", "input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"model": "m", "input": [{"type": "function_call_output", "call_id": "c"}]},
     "input[0].output"),
])
def test_refusals_name_the_parameter(body: dict[str, Any], param: str) -> None:
    # contract §6.3
    err = refused(body)
    assert err.status == 400 and err.param == param
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("extra", [
    {"tools": []}, {"tool_choice": "auto"}, {"include": []}, {"reasoning": {"effort": None}},
    {"text": {"format": {"type": "text"}}}, {"presence_penalty": 0}, {"truncation": "auto"},
    {"user": "u"}, {"parallel_tool_calls": False}, {"store": False},
])
def test_defaults_of_unsupported_parameters_are_accepted(extra: dict[str, Any]) -> None:
    req = wire.parse_create({"model": "m", "input": "x", **extra})
    assert req.model == "m"


def test_input_items_keep_roles_and_sdk_item_shapes() -> None:
    req = wire.parse_create({"model": "m", "input": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"type": "message", "role": "developer", "content": [{"type": "input_text",
                                                              "text": "c"}]}]})
    items = wire.input_items(req)
    assert [(i["role"], wire.item_text(i)) for i in items] == [
        ("user", "a"), ("assistant", "b"), ("developer", "c")]
    # `logprobs`: OpenAI's OutputTextContent requires it in input_items pages too.
    assert items[1]["content"][0] == {"type": "output_text", "text": "b", "annotations": [],
                                      "logprobs": []}
    assert all(i["id"].startswith("msg_") and i["status"] == "completed" for i in items)


def test_message_item_events_and_replay() -> None:
    item = wire.MessageItem()
    events = [*item.opened(), item.delta("a"), item.delta("b")]
    done, still_open = wire.replay(events)
    assert done == [] and len(still_open) == 1 and "".join(still_open[0].text) == "ab"
    closing = still_open[0].closed("incomplete")
    assert [e["type"] for e in closing] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert closing[0]["text"] == "ab"
    assert closing[-1]["item"]["status"] == "incomplete"
    done, still_open = wire.replay(events + closing)
    assert still_open == [] and done == [closing[-1]["item"]]


def test_sse_frame() -> None:
    # contract §4.1
    assert wire.sse_frame("response.created", b'{"a":1}') == (
        b'event: response.created\ndata: {"a":1}\n\n')
    assert wire.DONE_FRAME == b"data: [DONE]\n\n"


def test_error_event_has_flat_and_nested_fields() -> None:
    # contract §6.1
    event = wire.error_event("server_error", "boom")
    assert event["code"] == event["error"]["code"] == "server_error"
    assert event["message"] == event["error"]["message"] == "boom"
