"""The run spec and its codec, the one turn shape, and fitting a spec to a context."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import anyio
import pytest

from tether import context, turns, wire
from tether.engines.base import Engine, Generation
from tether.errors import APIError
from tether.runspec import RunSpec
from tether.turns import Message, ToolCallSpec

IMAGE = "data:image/png;base64,iVBORw0KGgo="

#: a record's `run` as the store holds it (written by versions before `RunSpec` too)
STORED: dict[str, Any] = {
    "messages": [
        {
            "role": "user",
            "text": "look\n[image omitted: this model cannot see images]",
            "parts": [
                {"type": "text", "text": "look"},
                {"type": "image", "url": IMAGE, "detail": "auto"},
            ],
        },
        {
            "role": "assistant",
            "text": "",
            "tool_calls": [{"call_id": "c1", "arguments": '{"q":1}', "name": "crm__lookup"}],
        },
        {"role": "tool", "text": "42", "call_id": "c1"},
        {"role": "assistant", "text": "It is 42."},
    ],
    "instructions": "Be brief.",
    "tools": [
        {
            "type": "function",
            "name": "crm__lookup",
            "description": None,
            "parameters": {"type": "object"},
            "strict": True,
        }
    ],
    "tool_choice": "auto",
    "tool_names": {"crm__lookup": {"name": "lookup", "namespace": "crm"}},
    "forward": {"user": "u1"},
    "text_format": None,
    "max_output_tokens": 64,
    "temperature": 0.5,
    "top_p": 1.0,
}


def test_a_stored_spec_decodes_unchanged() -> None:
    spec = RunSpec.decode(STORED)
    assert spec.messages == [
        Message(
            "user",
            "look\n[image omitted: this model cannot see images]",
            parts=[
                {"type": "text", "text": "look"},
                {"type": "image", "url": IMAGE, "detail": "auto"},
            ],
        ),
        Message("assistant", "", [ToolCallSpec("c1", "crm__lookup", '{"q":1}')]),
        Message("tool", "42", call_id="c1"),
        Message("assistant", "It is 42."),
    ]
    assert (
        spec.instructions,
        spec.tool_choice,
        spec.max_output_tokens,
        spec.temperature,
        spec.top_p,
    ) == ("Be brief.", "auto", 64, 0.5, 1.0)
    assert spec.tool_names == {"crm__lookup": {"name": "lookup", "namespace": "crm"}}
    assert spec.forward == {"user": "u1"} and spec.tools == STORED["tools"]
    assert spec.encode() == STORED  # the store keeps what it kept before


def test_a_spec_from_before_tools_decodes_with_defaults() -> None:
    old = {
        "messages": [{"role": "user", "text": "hi"}],
        "instructions": None,
        "max_output_tokens": None,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    spec = RunSpec.decode(old)
    assert spec == RunSpec([Message("user", "hi")])
    assert (spec.tools, spec.tool_choice, spec.tool_names, spec.forward, spec.text_format) == (
        [],
        None,
        {},
        {},
        None,
    )


def test_a_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunSpec.decode(STORED).instructions = "x"  # type: ignore[misc]


def test_of_a_create_request() -> None:
    req = wire.parse_create(
        {
            "model": "m",
            "input": "hi",
            "instructions": "Be brief.",
            "max_output_tokens": 9,
            "top_p": 0.5,
            "user": "u1",
            "tools": [
                {
                    "type": "namespace",
                    "name": "crm",
                    "tools": [
                        {"type": "function", "name": "lookup"},
                        {"type": "custom", "name": "edit"},
                    ],
                }
            ],
            "tool_choice": {"type": "function", "name": "lookup"},
            "text": {"format": {"type": "json_object"}},
        }
    )
    messages = wire.history(wire.input_items(req))
    spec = RunSpec.of(req, messages, wire.echo_fields(req))
    assert spec.messages == [Message("user", "hi")]
    assert spec.instructions == "Be brief." and spec.max_output_tokens == 9
    assert (spec.temperature, spec.top_p) == (1.0, 0.5)  # as echoed: defaults filled in
    assert [t["name"] for t in spec.tools] == ["crm__lookup", "crm__edit"]
    assert spec.tool_choice == {"type": "function", "name": "crm__lookup"}
    assert spec.tool_names["crm__edit"] == {"name": "edit", "namespace": "crm", "custom": True}
    assert spec.forward == {"user": "u1"}
    assert spec.text_format == {"type": "json_object"}
    assert RunSpec.decode(spec.encode()) == spec


def test_generation_leads_with_the_instructions() -> None:
    spec = RunSpec.decode(STORED)
    gen = spec.generation("resp_1", "m", True)
    assert gen.messages == [Message("system", "Be brief."), *spec.messages]
    assert len(spec.messages) == 4  # the spec's own list is not the engine's
    assert (gen.response_id, gen.model, gen.background) == ("resp_1", "m", True)
    assert (gen.max_output_tokens, gen.temperature, gen.top_p) == (64, 0.5, 1.0)
    assert (gen.tools, gen.tool_choice, gen.text_format, gen.forward) == (
        spec.tools,
        "auto",
        None,
        {"user": "u1"},
    )
    plain = dataclasses.replace(spec, instructions=None).generation("resp_2", "m", False)
    assert plain.messages == spec.messages


def test_history_encodes_to_the_stored_turn_shape() -> None:
    """Input items become Messages; encoded, the JSON every stored record and compaction
    token holds."""
    req = wire.parse_create(
        {
            "model": "m",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "look"},
                        {"type": "input_image", "image_url": IMAGE},
                    ],
                },
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "lookup",
                    "namespace": "crm",
                    "arguments": '{"q":1}',
                },
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
                {"role": "assistant", "content": "It is 42."},
            ],
        }
    )
    assert turns.encode(wire.history(wire.input_items(req))) == STORED["messages"]


class _Counter:
    """An engine that counts a character a token (`TokenCounter`)."""

    concurrency = 1

    async def count_tokens(self, request: Generation) -> int:
        return sum(len(m.text) for m in request.messages)


def _fit(spec: RunSpec, size: int, truncation: str | None) -> RunSpec:
    engine = cast(Engine, _Counter())
    return anyio.run(context.fit, engine, size, "m", spec, truncation)


def test_fit_drops_the_oldest_turns_under_auto() -> None:
    spec = RunSpec(
        [
            Message("developer", "d" * 10),
            Message("user", "u" * 100),
            Message("assistant", "a" * 300, [ToolCallSpec("c", "f", "{}")]),
            Message("tool", "t" * 10, call_id="c"),
            Message("user", "q" * 10),
        ],
        max_output_tokens=16,
    )
    assert _fit(spec, 1000, None) is spec  # fits: unchanged
    with pytest.raises(APIError) as exc:
        _fit(spec, 200, None)
    assert exc.value.code == "context_length_exceeded"
    fitted = _fit(spec, 200, "auto")
    # The oldest turns went until it fit (the user's, then the call): the call's output,
    # which would fit, went with its call; the developer turn and the last user turn stay.
    assert fitted.messages == [Message("developer", "d" * 10), Message("user", "q" * 10)]
    assert dataclasses.replace(fitted, messages=spec.messages) == spec
