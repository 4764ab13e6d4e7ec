"""What a run is asked to generate: fixed when the response is created, stored with its
record (`Record.run`), read back by whichever process runs it (`run.drive`).

`RunSpec.encode` is the JSON the store keeps and `RunSpec.decode` reads it back; records
stored by earlier versions hold the same JSON (their turns included: `tether.turns`), so
they decode unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tether import schedule, turns, wire
from tether.engines.base import Generation
from tether.turns import Message


@dataclass(frozen=True, slots=True)
class RunSpec:
    """The conversation and the request's settings, as engines need them."""

    #: the conversation so far: the previous response's context and output, then this
    #: request's input (fitted to the model's context: `tether.context`)
    messages: list[Message]
    instructions: str | None = None
    #: Responses-API function tools as engines get them (namespaces flattened, custom
    #: tools as functions: `wire_tools`)
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = None
    #: flat tool name -> how a call of it is shown (`wire_tools.Toolset.names`)
    tool_names: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: request fields an upstream may forward (`wire_fields.forwarded`)
    forward: dict[str, Any] = field(default_factory=dict)
    #: `text.format` when it is not plain text
    text_format: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    #: `background_options.completion_window` (`tether.schedule`)
    window: str = "soonest"
    #: the MCP servers the run lists and calls (`mcp_tools.server`)
    mcp: list[dict[str, Any]] = field(default_factory=list)
    #: MCP servers' tools by label, listed earlier in the conversation (reused, as OpenAI
    #: does: no new `mcp_list_tools` item for them)
    listed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: this request's answers to approval requests: `{"approval_request_id", "approve",
    #: "reason", "server_label", "name", "arguments"}` (`tool_loop.chained`)
    approved: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, req: wire.CreateRequest, messages: list[Message], echo: dict[str, Any]) -> RunSpec:
        """The spec of a create with `req` over `messages`; sampling as echoed (`echo`:
        `wire.echo_fields`, which fills in the defaults)."""
        tools = req.toolset()
        return cls(
            messages,
            req.instructions,
            tools.engine,
            req.engine_tool_choice(),
            tools.names,
            req.forward(),
            req.text_format(),
            req.max_output_tokens,
            echo["temperature"],
            echo["top_p"],
            req.window(),
            tools.mcp,
        )

    def generation(
        self,
        response_id: str,
        model: str,
        background: bool,
        defer_until: float | None = None,
    ) -> Generation:
        """The request an engine is given: the instructions lead as a system turn."""
        lead = [Message("system", self.instructions)] if self.instructions else []
        return Generation(
            response_id,
            model,
            lead + self.messages,
            self.max_output_tokens,
            self.temperature,
            self.top_p,
            self.tools,
            self.tool_choice,
            self.text_format,
            background,
            self.forward,
            defer_until,
        )

    def encode(self) -> dict[str, Any]:
        """JSON-ready: what the store keeps."""
        return {
            "messages": turns.encode(self.messages),
            "instructions": self.instructions,
            "tools": self.tools,
            "tool_choice": self.tool_choice,
            "tool_names": self.tool_names,
            "forward": self.forward,
            "text_format": self.text_format,
            "max_output_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            # Only when deferred: a `soonest` spec stays what earlier versions stored.
            **({} if self.window == "soonest" else {"window": self.window}),
        } | self._mcp()

    def _mcp(self) -> dict[str, Any]:
        """The MCP keys, only when there is something to keep: a spec without MCP tools
        is stored as before them."""
        keys = {"mcp": self.mcp, "listed": self.listed, "approved": self.approved}
        return {k: v for k, v in keys.items() if v}

    @classmethod
    def decode(cls, run: dict[str, Any]) -> RunSpec:
        """A stored spec. Keys that records of earlier versions may lack (or hold as
        null) take their defaults."""
        return cls(
            turns.decode(run["messages"]),
            run.get("instructions"),
            run.get("tools") or [],
            run.get("tool_choice"),
            run.get("tool_names") or {},
            run.get("forward") or {},
            run.get("text_format"),
            run.get("max_output_tokens"),
            _number(run.get("temperature")),
            _number(run.get("top_p")),
            schedule.window_of(run),
            run.get("mcp") or [],
            run.get("listed") or {},
            run.get("approved") or [],
        )


def _number(value: float | None) -> float:
    return 1.0 if value is None else value
