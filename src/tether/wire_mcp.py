"""MCP output items a run streams (OpenAI's `mcp_list_tools`, `mcp_call`,
`mcp_approval_request`) and their events, in the order OpenAI sends them.

Like the items of `tether.wire_output`, each builds its own events (opened, deltas,
closed); `closed(status)` is what an ending (`tether.closing`) adds for one still open: a
cancelled call in flight closes `incomplete`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tether.wire_input import new_id


def _event(kind: str, item_id: str, output_index: int, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "item_id": item_id, "output_index": output_index, **fields}


@dataclass(slots=True)
class ListToolsItem:
    """The tools one MCP server offers, listed at the start of a run."""

    output_index: int
    server_label: str
    id: str = field(default_factory=lambda: new_id("mcpl"))
    tools: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def item(self, status: str = "completed") -> dict[str, Any]:
        item = {
            "id": self.id,
            "type": "mcp_list_tools",
            "server_label": self.server_label,
            "tools": self.tools,
        }
        if self.error is not None:
            item["error"] = self.error
        return item

    def live(self) -> dict[str, Any]:
        return self.item()

    def opened(self) -> list[dict[str, Any]]:
        return [
            {"type": "response.output_item.added", "output_index": self.output_index,
             "item": self.item()},
            _event("response.mcp_list_tools.in_progress", self.id, self.output_index),
        ]  # fmt: skip

    def listed(self, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.tools = tools
        return [
            _event("response.mcp_list_tools.completed", self.id, self.output_index),
            self._done(),
        ]

    def failed(self, error: str) -> list[dict[str, Any]]:
        self.error = error
        return [_event("response.mcp_list_tools.failed", self.id, self.output_index), self._done()]

    def closed(self, status: str) -> list[dict[str, Any]]:
        if status != "completed" and self.error is None:
            self.error = "The listing was stopped."
        return [self._done()]

    def _done(self) -> dict[str, Any]:
        return {
            "type": "response.output_item.done",
            "output_index": self.output_index,
            "item": self.item(),
        }


@dataclass(slots=True)
class McpCallItem:
    """A call of an MCP server's tool: the model streams its arguments, then the run
    calls the server (`response.mcp_call.in_progress` was sent when it opened) and the
    call completes with its output or fails with an `error`."""

    output_index: int
    call_id: str  # the engine's call id: the conversation's turns pair call and output by it
    name: str
    server_label: str
    id: str = field(default_factory=lambda: new_id("mcp"))
    arguments: list[str] = field(default_factory=list)
    output: str | None = None
    error: dict[str, Any] | None = None
    approval_request_id: str | None = None
    args_done: bool = False  # `response.mcp_call_arguments.done` was sent

    def item(self, status: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "mcp_call",
            "server_label": self.server_label,
            "name": self.name,
            "arguments": "".join(self.arguments),
            "output": self.output,
            "error": self.error,
            "status": status,
            "approval_request_id": self.approval_request_id,
        }

    def live(self) -> dict[str, Any]:
        return self.item("calling" if self.args_done else "in_progress")

    def opened(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "response.output_item.added",
                "output_index": self.output_index,
                "item": self.item("in_progress") | {"arguments": ""},
            },
            _event("response.mcp_call.in_progress", self.id, self.output_index),
        ]

    def delta(self, text: str) -> dict[str, Any] | None:
        self.arguments.append(text)
        return _event("response.mcp_call_arguments.delta", self.id, self.output_index, delta=text)

    def calling(self) -> list[dict[str, Any]]:
        """The arguments are complete: the server is called next."""
        self.args_done = True
        return [
            _event(
                "response.mcp_call_arguments.done",
                self.id,
                self.output_index,
                arguments="".join(self.arguments),
            )
        ]

    def finished(self) -> list[dict[str, Any]]:
        """The call's end: `output` or `error` set before."""
        status = "failed" if self.error is not None else "completed"
        return [
            _event(f"response.mcp_call.{status}", self.id, self.output_index),
            {
                "type": "response.output_item.done",
                "output_index": self.output_index,
                "item": self.item(status),
            },
        ]

    def closed(self, status: str) -> list[dict[str, Any]]:
        events = [] if self.args_done else self.calling()
        return [
            *events,
            {
                "type": "response.output_item.done",
                "output_index": self.output_index,
                "item": self.item(status),
            },
        ]


@dataclass(slots=True)
class ApprovalRequestItem:
    """A call the model made of a tool that needs an approval: it ends the response;
    the next request answers it with an `mcp_approval_response` (`tether.tool_loop`).
    OpenAI streams no argument deltas for it: they are in its `done` item."""

    output_index: int
    call_id: str
    name: str
    server_label: str
    id: str = field(default_factory=lambda: new_id("mcpr"))
    arguments: list[str] = field(default_factory=list)

    def item(self, status: str = "completed") -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "mcp_approval_request",
            "server_label": self.server_label,
            "name": self.name,
            "arguments": "".join(self.arguments),
        }

    def live(self) -> dict[str, Any]:
        return self.item()

    def opened(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "response.output_item.added",
                "output_index": self.output_index,
                "item": self.item() | {"arguments": ""},
            }
        ]

    def delta(self, text: str) -> dict[str, Any] | None:
        self.arguments.append(text)
        return None

    def closed(self, status: str) -> list[dict[str, Any]]:
        return [
            {
                "type": "response.output_item.done",
                "output_index": self.output_index,
                "item": self.item(),
            }
        ]


McpItem = ListToolsItem | McpCallItem | ApprovalRequestItem


def replay(kind: str, ev: dict[str, Any], items: dict[str, Any]) -> bool:
    """Rebuild an MCP item from its events in a log (`wire_output.replay`); False: not
    an MCP event."""
    if kind == "response.output_item.added":
        item, index = ev["item"], ev["output_index"]
        if item["type"] == "mcp_list_tools":
            items[item["id"]] = ListToolsItem(index, item["server_label"], item["id"])
        elif item["type"] == "mcp_call":
            items[item["id"]] = McpCallItem(
                index, "", item["name"], item["server_label"], item["id"],
                approval_request_id=item.get("approval_request_id"),
            )  # fmt: skip
        elif item["type"] == "mcp_approval_request":
            items[item["id"]] = ApprovalRequestItem(index, "", item["name"], item["server_label"],
                                                    item["id"])  # fmt: skip
        else:
            return False
        return True
    if kind == "response.mcp_call_arguments.delta":
        items[ev["item_id"]].arguments.append(ev["delta"])
        return True
    if kind == "response.mcp_call_arguments.done":
        items[ev["item_id"]].args_done = True
        return True
    return kind.startswith("response.mcp_")
