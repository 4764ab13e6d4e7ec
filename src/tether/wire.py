"""The wire format: the Response object, stream events, SSE frames (requests: `wire_input`).

Responses and events are plain dicts built here (the per-token path never runs model
validation); tests check every one of them against the official SDK's types and the
Open Responses OpenAPI schemas.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel

from tether.store.base import LogEntry

# Request parsing lives in `wire_input`; these names stay importable from here.
from tether.wire_input import (
    CompactRequest,
    CreateRequest,
    history,
    input_items,
    item_text,
    new_id,
    parse_compact,
    parse_create,
)

__all__ = ["CompactRequest", "CreateRequest", "history", "input_items", "item_text",
           "new_id", "parse_compact", "parse_create"]

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
LIVE_STATES = ("queued", "in_progress")


# --- the Response object -----------------------------------------------------------------


def echo_fields(req: CreateRequest) -> dict[str, Any]:
    """The parts of a Response that repeat the request, fixed at creation (what each
    field does: docs/fields.md)."""
    reasoning = req.reasoning
    return {
        "object": "response",
        "model": req.model,
        "instructions": req.instructions,
        "previous_response_id": req.previous_response_id,
        "tools": req.toolset().echo,
        "tool_choice": (req.tool_choice.model_dump(exclude_none=True)
                        if isinstance(req.tool_choice, BaseModel)
                        else req.tool_choice or "auto"),
        "truncation": req.truncation or "disabled",
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "text": {"format": _echo_format(req.text_format())}
        | ({"verbosity": req.text.verbosity} if req.text and req.text.verbosity else {}),
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "top_logprobs": req.top_logprobs or 0,
        "reasoning": None if reasoning is None else {
            "effort": reasoning.effort, "summary": reasoning.summary or reasoning.generate_summary},
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "store": True if req.store is None else req.store,
        "background": bool(req.background),
        # What was used: tether has one tier (OpenAI answers `auto` with `default` too).
        "service_tier": "default",
        "metadata": req.metadata or {},
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
    } | ({"user": req.user} if req.user is not None else {}) | _cache_echo(req) | _notes(req)


def _cache_echo(req: CreateRequest) -> dict[str, Any]:
    """The prompt-cache fields, echoed only when given (OpenAI's Response has them, Open
    Responses' does not); the options as applied: their defaults filled in."""
    echo: dict[str, Any] = {}
    if req.prompt_cache_retention is not None:
        echo["prompt_cache_retention"] = req.prompt_cache_retention
    options = req.prompt_cache_options
    if options is not None:
        echo["prompt_cache_options"] = {"ttl": options.get("ttl", "30m"),
                                        "mode": options.get("mode", "implicit")}
    return echo


def _notes(req: CreateRequest) -> dict[str, Any]:
    """tether's note on what it left out (hosted tools, with `hosted_tools = "drop"`)."""
    dropped = req.toolset().dropped
    return {"tether": {"dropped_tools": dropped}} if dropped else {}


def _echo_format(fmt: dict[str, Any] | None) -> dict[str, Any]:
    """`text.format` as a Response shows it: a json_schema format has every field the
    spec requires (`description`, `strict`), filled with their defaults."""
    if fmt is None:
        return {"type": "text"}
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    return {"type": "json_schema", "name": fmt["name"], "description": fmt.get("description"),
            "schema": fmt["schema"], "strict": bool(fmt.get("strict", False))}


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def snapshot(
    echo: dict[str, Any],
    *,
    id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
    completed_at: int | None = None,
) -> dict[str, Any]:
    return {
        "id": id,
        **echo,
        "created_at": created_at,
        "status": status,
        "completed_at": completed_at,
        "output": output or [],
        "usage": usage,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
    }


# --- stream events -----------------------------------------------------------------------


def lifecycle_event(kind: str, response: dict[str, Any]) -> dict[str, Any]:
    return {"type": f"response.{kind}", "response": response}


def error_event(code: str, message: str) -> dict[str, Any]:
    """docs/contract.md §6.1: flat fields (OpenAI) and the nested object (Open Responses)."""
    err = {"type": "server_error", "code": code, "message": message, "param": None}
    return {"type": "error", "code": code, "message": message, "param": None, "error": err}


@dataclass(slots=True)
class MessageItem:
    """The one assistant message a run streams; builds its events in order."""

    output_index: int = 0
    id: str = field(default_factory=lambda: new_id("msg"))
    text: list[str] = field(default_factory=list)
    #: the text's log probabilities, when the engine gave them (docs/fields.md, include)
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def item(self, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [self.part()]
        return {"id": self.id, "type": "message", "role": "assistant",
                "status": status, "content": content}

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": "".join(self.text), "annotations": [],
                "logprobs": list(self.logprobs)}

    def opened(self) -> list[dict[str, Any]]:
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            {"type": "response.output_item.added", "output_index": self.output_index,
             "item": self.item("in_progress")},
            {"type": "response.content_part.added", "item_id": self.id,
             "output_index": self.output_index, "content_index": 0, "part": empty},
        ]

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        self.text.append(text)
        if logprobs:
            self.logprobs += logprobs
        return {"type": "response.output_text.delta", "item_id": self.id,
                "output_index": self.output_index, "content_index": 0, "delta": text,
                "logprobs": logprobs or []}

    def undo(self, logprobs: list[dict[str, Any]] | None) -> None:
        """Take back the last `delta` (it never reached the log)."""
        self.text.pop()
        if logprobs:
            del self.logprobs[-len(logprobs):]

    def live(self) -> dict[str, Any]:
        """The item as a retrieve of a live response shows it."""
        return self.item("in_progress") | {"content": [self.part()]}

    def closed(self, status: str) -> list[dict[str, Any]]:
        part = self.part()
        return [
            {"type": "response.output_text.done", "item_id": self.id,
             "output_index": self.output_index, "content_index": 0, "text": part["text"],
             "logprobs": part["logprobs"]},
            {"type": "response.content_part.done", "item_id": self.id,
             "output_index": self.output_index, "content_index": 0, "part": part},
            {"type": "response.output_item.done", "output_index": self.output_index,
             "item": self.item(status)},
        ]


@dataclass(slots=True)
class FunctionCallItem:
    """A function call a run streams: its arguments arrive in pieces."""

    output_index: int
    call_id: str
    name: str
    id: str = field(default_factory=lambda: new_id("fc"))
    arguments: list[str] = field(default_factory=list)
    namespace: str | None = None

    def item(self, status: str) -> dict[str, Any]:
        item = {"id": self.id, "type": "function_call", "status": status,
                "call_id": self.call_id, "name": self.name,
                "arguments": "".join(self.arguments)}
        if self.namespace is not None:
            item["namespace"] = self.namespace
        return item

    def live(self) -> dict[str, Any]:
        return self.item("in_progress")

    def opened(self) -> list[dict[str, Any]]:
        item = self.item("in_progress") | {"arguments": ""}
        return [{"type": "response.output_item.added", "output_index": self.output_index,
                 "item": item}]

    def delta(self, text: str) -> dict[str, Any]:
        self.arguments.append(text)
        return {"type": "response.function_call_arguments.delta", "item_id": self.id,
                "output_index": self.output_index, "delta": text}

    def closed(self, status: str) -> list[dict[str, Any]]:
        return [
            {"type": "response.function_call_arguments.done", "item_id": self.id,
             "output_index": self.output_index, "name": self.name,
             "arguments": "".join(self.arguments)},
            {"type": "response.output_item.done", "output_index": self.output_index,
             "item": self.item(status)},
        ]


@dataclass(slots=True)
class CustomToolCallItem:
    """A custom (freeform) tool call. Engines call it as a function whose arguments are
    `{"input": "..."}`; the item streams the string itself, decoded as it arrives."""

    output_index: int
    call_id: str
    name: str
    id: str = field(default_factory=lambda: new_id("ctc"))
    input: list[str] = field(default_factory=list)
    namespace: str | None = None
    decoder: InputDecoder = field(default_factory=lambda: InputDecoder())

    def item(self, status: str) -> dict[str, Any]:
        item = {"id": self.id, "type": "custom_tool_call", "status": status,
                "call_id": self.call_id, "name": self.name, "input": "".join(self.input)}
        if self.namespace is not None:
            item["namespace"] = self.namespace
        return item

    def live(self) -> dict[str, Any]:
        return self.item("in_progress")

    def opened(self) -> list[dict[str, Any]]:
        return [{"type": "response.output_item.added", "output_index": self.output_index,
                 "item": self.item("in_progress") | {"input": ""}}]

    def delta(self, arguments: str) -> dict[str, Any]:
        text = self.decoder.feed(arguments)
        self.input.append(text)
        return {"type": "response.custom_tool_call_input.delta", "item_id": self.id,
                "output_index": self.output_index, "delta": text}

    def closed(self, status: str) -> list[dict[str, Any]]:
        events = []
        rest = self.decoder.rest("".join(self.input))
        if rest:  # arguments that were not `{"input": "..."}`: given as they came
            events.append(self.delta_of(rest))
        return [*events,
                {"type": "response.custom_tool_call_input.done", "item_id": self.id,
                 "output_index": self.output_index, "input": "".join(self.input)},
                {"type": "response.output_item.done", "output_index": self.output_index,
                 "item": self.item(status)}]

    def delta_of(self, text: str) -> dict[str, Any]:
        self.input.append(text)
        return {"type": "response.custom_tool_call_input.delta", "item_id": self.id,
                "output_index": self.output_index, "delta": text}


class InputDecoder:
    """Decodes the string value of `{"input": "..."}` as its JSON text arrives in pieces
    (escapes split across pieces wait for their end)."""

    __slots__ = ("ended", "pos", "raw", "started")

    _START = re.compile(r'\s*\{\s*"input"\s*:\s*"')

    def __init__(self) -> None:
        self.raw = ""
        self.pos = 0
        self.started = False
        self.ended = False

    def feed(self, piece: str) -> str:
        self.raw += piece
        if not self.started:
            match = self._START.match(self.raw)
            if match is None:
                return ""
            self.started, self.pos = True, match.end()
        out = []
        raw, pos = self.raw, self.pos
        while pos < len(raw) and not self.ended:
            char = raw[pos]
            if char == '"':
                self.ended = True
                break
            if char != "\\":
                out.append(char)
                pos += 1
                continue
            size = 6 if raw[pos + 1:pos + 2] == "u" else 2
            if raw[pos + 1:pos + 2] == "u" and raw[pos + 2:pos + 3] in "dD" and \
                    raw[pos + 3:pos + 4].lower() in "89ab":
                size = 12  # a surrogate pair: decoded together
            if pos + size > len(raw):
                break  # the rest of the escape comes with the next piece
            try:
                out.append(orjson.loads('"' + raw[pos:pos + size] + '"'))
            except orjson.JSONDecodeError:
                out.append(raw[pos:pos + size])
            pos += size
        self.pos = pos
        return "".join(out)

    def rest(self, decoded: str) -> str:
        """At the end: the raw arguments, when nothing could be decoded from them."""
        return self.raw if not decoded and not self.started else ""


OpenItem = MessageItem | FunctionCallItem | CustomToolCallItem


def call_item(output_index: int, call_id: str, flat: str,
              names: dict[str, dict[str, Any]] | None) -> FunctionCallItem | CustomToolCallItem:
    """The output item of a call an engine made of tool `flat` (docs/fields.md, "Tools")."""
    shown = (names or {}).get(flat)
    if shown is None:
        return FunctionCallItem(output_index, call_id, flat)
    if shown.get("custom"):
        return CustomToolCallItem(output_index, call_id, shown["name"],
                                  namespace=shown.get("namespace"))
    return FunctionCallItem(output_index, call_id, shown["name"],
                            namespace=shown.get("namespace"))


def replay(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[OpenItem]]:
    """Rebuild output from a log: (closed items, items still open)."""
    open_items: dict[str, OpenItem] = {}
    done: list[dict[str, Any]] = []
    for ev in events:
        kind = ev["type"]
        if kind == "response.output_item.added":
            item = ev["item"]
            index = ev["output_index"]
            if item["type"] == "function_call":
                open_items[item["id"]] = FunctionCallItem(
                    index, item["call_id"], item["name"], item["id"],
                    namespace=item.get("namespace"))
            elif item["type"] == "custom_tool_call":
                open_items[item["id"]] = CustomToolCallItem(
                    index, item["call_id"], item["name"], item["id"],
                    namespace=item.get("namespace"))
            else:
                open_items[item["id"]] = MessageItem(index, item["id"])
        elif kind == "response.output_text.delta":
            msg = open_items[ev["item_id"]]
            assert isinstance(msg, MessageItem)
            msg.text.append(ev["delta"])
            msg.logprobs += ev.get("logprobs") or ()
        elif kind == "response.function_call_arguments.delta":
            call = open_items[ev["item_id"]]
            assert isinstance(call, FunctionCallItem)
            call.arguments.append(ev["delta"])
        elif kind == "response.custom_tool_call_input.delta":
            custom = open_items[ev["item_id"]]
            assert isinstance(custom, CustomToolCallItem)
            custom.input.append(ev["delta"])
            custom.decoder.started = True  # its text is decoded already
        elif kind == "response.output_item.done":
            open_items.pop(ev["item"]["id"], None)
            done.append(ev["item"])
    return done, list(open_items.values())


# --- SSE ---------------------------------------------------------------------------------

DONE_FRAME = b"data: [DONE]\n\n"


def sse_frame(kind: str, data: bytes) -> bytes:
    """docs/contract.md §4.1: one event, one write, `\\n` line ends, no `id:`/`retry:`."""
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def sse_frames(entries: list[LogEntry]) -> bytes:
    """The frames of logged events (built once, when logged, for every reader)."""
    return b"".join([entry.frame for entry in entries])
