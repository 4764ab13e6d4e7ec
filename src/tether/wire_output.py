"""Output items a run streams, and how a log is replayed into them.

`MessageItem`, `ReasoningItem` (`tether.wire_reasoning`), `FunctionCallItem` and
`CustomToolCallItem` build the events of one output item in order (added, deltas, done)
as a run produces it; `replay` rebuilds the items of a log (finished ones as dicts, open
ones as these classes), for a retrieve of a live response and for whoever ends a response
from its log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from tether.wire_input import new_id
from tether.wire_mcp import ApprovalRequestItem, McpCallItem, McpItem
from tether.wire_mcp import replay as replay_mcp
from tether.wire_reasoning import ReasoningItem as ReasoningItem  # re-exported


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
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": content,
        }

    def part(self) -> dict[str, Any]:
        return {
            "type": "output_text",
            "text": "".join(self.text),
            "annotations": [],
            "logprobs": list(self.logprobs),
        }

    def opened(self) -> list[dict[str, Any]]:
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            {
                "type": "response.output_item.added",
                "output_index": self.output_index,
                "item": self.item("in_progress"),
            },
            {
                "type": "response.content_part.added",
                "item_id": self.id,
                "output_index": self.output_index,
                "content_index": 0,
                "part": empty,
            },
        ]

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        self.text.append(text)
        if logprobs:
            self.logprobs += logprobs
        return {
            "type": "response.output_text.delta",
            "item_id": self.id,
            "output_index": self.output_index,
            "content_index": 0,
            "delta": text,
            "logprobs": logprobs or [],
        }

    def undo(self, logprobs: list[dict[str, Any]] | None) -> None:
        """Take back the last `delta` (it never reached the log)."""
        self.text.pop()
        if logprobs:
            del self.logprobs[-len(logprobs) :]

    def live(self) -> dict[str, Any]:
        """The item as a retrieve of a live response shows it."""
        return self.item("in_progress") | {"content": [self.part()]}

    def closed(self, status: str) -> list[dict[str, Any]]:
        part = self.part()
        return [
            {
                "type": "response.output_text.done",
                "item_id": self.id,
                "output_index": self.output_index,
                "content_index": 0,
                "text": part["text"],
                "logprobs": part["logprobs"],
            },
            {
                "type": "response.content_part.done",
                "item_id": self.id,
                "output_index": self.output_index,
                "content_index": 0,
                "part": part,
            },
            {
                "type": "response.output_item.done",
                "output_index": self.output_index,
                "item": self.item(status),
            },
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
        item = {
            "id": self.id,
            "type": "function_call",
            "status": status,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": "".join(self.arguments),
        }
        if self.namespace is not None:
            item["namespace"] = self.namespace
        return item

    def live(self) -> dict[str, Any]:
        return self.item("in_progress")

    def opened(self) -> list[dict[str, Any]]:
        item = self.item("in_progress") | {"arguments": ""}
        return [
            {"type": "response.output_item.added", "output_index": self.output_index, "item": item}
        ]

    def delta(self, text: str) -> dict[str, Any]:
        self.arguments.append(text)
        return {
            "type": "response.function_call_arguments.delta",
            "item_id": self.id,
            "output_index": self.output_index,
            "delta": text,
        }

    def closed(self, status: str) -> list[dict[str, Any]]:
        return [
            {
                "type": "response.function_call_arguments.done",
                "item_id": self.id,
                "output_index": self.output_index,
                "name": self.name,
                "arguments": "".join(self.arguments),
            },
            {
                "type": "response.output_item.done",
                "output_index": self.output_index,
                "item": self.item(status),
            },
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
        item = {
            "id": self.id,
            "type": "custom_tool_call",
            "status": status,
            "call_id": self.call_id,
            "name": self.name,
            "input": "".join(self.input),
        }
        if self.namespace is not None:
            item["namespace"] = self.namespace
        return item

    def live(self) -> dict[str, Any]:
        return self.item("in_progress")

    def opened(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "response.output_item.added",
                "output_index": self.output_index,
                "item": self.item("in_progress") | {"input": ""},
            }
        ]

    def delta(self, arguments: str) -> dict[str, Any]:
        text = self.decoder.feed(arguments)
        self.input.append(text)
        return {
            "type": "response.custom_tool_call_input.delta",
            "item_id": self.id,
            "output_index": self.output_index,
            "delta": text,
        }

    def closed(self, status: str) -> list[dict[str, Any]]:
        events = []
        rest = self.decoder.rest("".join(self.input))
        if rest:  # arguments that were not `{"input": "..."}`: given as they came
            events.append(self.delta_of(rest))
        return [
            *events,
            {
                "type": "response.custom_tool_call_input.done",
                "item_id": self.id,
                "output_index": self.output_index,
                "input": "".join(self.input),
            },
            {
                "type": "response.output_item.done",
                "output_index": self.output_index,
                "item": self.item(status),
            },
        ]

    def delta_of(self, text: str) -> dict[str, Any]:
        self.input.append(text)
        return {
            "type": "response.custom_tool_call_input.delta",
            "item_id": self.id,
            "output_index": self.output_index,
            "delta": text,
        }


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
            size = 6 if raw[pos + 1 : pos + 2] == "u" else 2
            if (
                raw[pos + 1 : pos + 2] == "u"
                and raw[pos + 2 : pos + 3] in "dD"
                and raw[pos + 3 : pos + 4].lower() in "89ab"
            ):
                size = 12  # a surrogate pair: decoded together
            if pos + size > len(raw):
                break  # the rest of the escape comes with the next piece
            try:
                out.append(orjson.loads('"' + raw[pos : pos + size] + '"'))
            except orjson.JSONDecodeError:
                out.append(raw[pos : pos + size])
            pos += size
        self.pos = pos
        return "".join(out)

    def rest(self, decoded: str) -> str:
        """At the end: the raw arguments, when nothing could be decoded from them."""
        return self.raw if not decoded and not self.started else ""


OpenItem = MessageItem | ReasoningItem | FunctionCallItem | CustomToolCallItem | McpItem
CallItem = FunctionCallItem | CustomToolCallItem | McpCallItem | ApprovalRequestItem


def call_item(
    output_index: int, call_id: str, flat: str, names: dict[str, dict[str, Any]] | None
) -> CallItem:
    """The output item of a call an engine made of tool `flat` (docs/fields.md, "Tools")."""
    shown = (names or {}).get(flat)
    if shown is None:
        return FunctionCallItem(output_index, call_id, flat)
    if "mcp" in shown:  # a tool of an MCP server the run calls (`tether.tool_loop`)
        kind = ApprovalRequestItem if shown.get("approval") else McpCallItem
        return kind(output_index, call_id, shown["name"], shown["mcp"])
    if shown.get("custom"):
        return CustomToolCallItem(
            output_index, call_id, shown["name"], namespace=shown.get("namespace")
        )
    return FunctionCallItem(output_index, call_id, shown["name"], namespace=shown.get("namespace"))


def replay(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[OpenItem]]:
    """Rebuild output from a log: (closed items, items still open)."""
    open_items: dict[str, OpenItem] = {}
    done: list[dict[str, Any]] = []
    for ev in events:
        kind = ev["type"]
        if kind.startswith("response.mcp_") or (
            kind == "response.output_item.added" and ev["item"]["type"].startswith("mcp_")
        ):
            replay_mcp(kind, ev, open_items)
        elif kind == "response.output_item.added":
            item = ev["item"]
            index = ev["output_index"]
            if item["type"] == "function_call":
                open_items[item["id"]] = FunctionCallItem(
                    index,
                    item["call_id"],
                    item["name"],
                    item["id"],
                    namespace=item.get("namespace"),
                )
            elif item["type"] == "custom_tool_call":
                open_items[item["id"]] = CustomToolCallItem(
                    index,
                    item["call_id"],
                    item["name"],
                    item["id"],
                    namespace=item.get("namespace"),
                )
            elif item["type"] == "reasoning":
                open_items[item["id"]] = ReasoningItem(index, item["id"])
            else:
                open_items[item["id"]] = MessageItem(index, item["id"])
        elif kind == "response.content_part.added":
            thinking = open_items.get(ev["item_id"])
            if isinstance(thinking, ReasoningItem):
                thinking.part = True
        elif kind == "response.reasoning_summary_text.delta":
            summarized = open_items[ev["item_id"]]
            assert isinstance(summarized, ReasoningItem)
            summarized.summary_delta(ev["summary_index"], ev["delta"])
        elif kind == "response.reasoning_summary_part.done":
            summarized = open_items[ev["item_id"]]
            assert isinstance(summarized, ReasoningItem)
            summarized.summary_open = False
        elif kind == "response.output_text.delta":
            msg = open_items[ev["item_id"]]
            assert isinstance(msg, MessageItem)
            msg.text.append(ev["delta"])
            msg.logprobs += ev.get("logprobs") or ()
        elif kind == "response.reasoning_text.delta":
            thought = open_items[ev["item_id"]]
            assert isinstance(thought, ReasoningItem)
            thought.text.append(ev["delta"])
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


def reasoning_deltas(events: list[dict[str, Any]]) -> int:
    """The reasoning tokens of a log, for an ending made from the log (`Lifecycle.end`):
    the number of its reasoning deltas. The log keeps token counts per append, not per
    kind, so this is the one place `reasoning_tokens` is a count of deltas (exact for
    engines that emit a token a delta; an upstream's late report is not in the log)."""
    kinds = ("response.reasoning_text.delta", "response.reasoning_summary_text.delta")
    return sum(1 for ev in events if ev["type"] in kinds)


# --- SSE ---------------------------------------------------------------------------------
