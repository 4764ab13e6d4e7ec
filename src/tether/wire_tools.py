"""Tools on the wire: what a request offers, what engines are given, and how a call an
engine makes maps back to an output item (docs/fields.md, "Tools").

Engines know only function tools. So:
- a `namespace` tool's functions are flattened to `NAMESPACE__NAME` (the name Codex
  itself uses where a namespace cannot be kept), and a call of one comes back as a
  `function_call` item with `name` and `namespace` (as OpenAI returns it);
- a `custom` (freeform) tool is a function with one string parameter `input`; a call of
  it comes back as a `custom_tool_call` item whose `input` is that string;
- an `mcp` tool is a server the run calls itself (`tether.mcp_tools`): engines get its
  tools as functions named `LABEL__TOOL` once the run has listed them (`tether.tool_loop`);
- hosted tools tether cannot run (web search, file search, code interpreter, ...)
  follow the `hosted_tools` setting: refused with a 400 naming `tools[i].type`, or
  dropped (the response then lists only the tools the model had).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from tether import mcp_tools
from tether.errors import bad_request
from tether.mcp_tools import McpTool

HostedRule = Literal["refuse", "drop"]
#: the one parameter of the function a custom tool is given to engines as
CUSTOM_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
    "additionalProperties": False,
}


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None
    defer_loading: StrictBool | None = None


class CustomTool(BaseModel):
    """A freeform tool: the model writes its input as plain text (`format` may ask for
    a grammar; engines get it as part of the description)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["custom"]
    name: StrictStr
    description: StrictStr | None = None
    format: dict[str, Any] | None = None
    defer_loading: StrictBool | None = None


class NamespaceTool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["namespace"]
    name: Annotated[str, Field(min_length=1, strict=True)]
    description: StrictStr | None = None
    tools: Annotated[list[FunctionTool | CustomTool], Field(min_length=1)]


class ToolChoiceFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    name: StrictStr
    namespace: StrictStr | None = None


class ToolChoiceCustom(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["custom"]
    name: StrictStr
    namespace: StrictStr | None = None


class AllowedTools(BaseModel):
    """`{"type": "allowed_tools", "tools": [...], "mode": ...}`: a hard limit on the tools
    the model may call this time, without changing `tools`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["allowed_tools"]
    tools: Annotated[
        list[ToolChoiceFunction | ToolChoiceCustom], Field(min_length=1, max_length=128)
    ]
    mode: Literal["none", "auto", "required"] = "auto"


class ToolChoiceMcp(BaseModel):
    """`{"type": "mcp", "server_label", "name"?}`: call a tool of that MCP server (the
    run resolves it once it has listed the server's tools: `tool_loop`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["mcp"]
    server_label: StrictStr
    name: StrictStr | None = None


ToolChoice = (
    Literal["auto", "none", "required"]
    | ToolChoiceFunction
    | ToolChoiceCustom
    | AllowedTools
    | ToolChoiceMcp
)


def flat_name(namespace: str | None, name: str) -> str:
    """The name an engine knows a tool by (Codex's `canonical_flat_name`)."""
    if not namespace:
        return name
    return f"{namespace.rstrip('_')}__{name.lstrip('_')}"


@dataclass(slots=True)
class Toolset:
    """The request's tools, as the response echoes them and as engines get them."""

    echo: list[dict[str, Any]] = field(default_factory=list)
    engine: list[dict[str, Any]] = field(default_factory=list)
    #: flat name -> how a call of it is shown: {"name", "namespace"?, "custom"?}
    names: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # hosted tool types left out
    #: the MCP servers the run calls (`mcp_tools.server`)
    mcp: list[dict[str, Any]] = field(default_factory=list)


AnyTool = FunctionTool | CustomTool | NamespaceTool | McpTool
RUNNABLE = ("function", "custom", "namespace", "mcp")


def parse_tools(raw: Any, hosted: HostedRule) -> list[AnyTool]:
    """`tools` as models; hosted tools refused or dropped per `hosted` (the raw dicts of
    dropped ones are not returned: see `dropped_types`)."""
    if not isinstance(raw, list):
        raise bad_request("Invalid value for 'tools': expected an array.", "tools", "invalid_value")
    tools: list[AnyTool] = []
    kinds: dict[str, type[AnyTool]] = {
        "function": FunctionTool,
        "custom": CustomTool,
        "namespace": NamespaceTool,
        "mcp": McpTool,
    }
    for i, tool in enumerate(raw):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(kind, str):
            raise bad_request(
                f"Missing required parameter: 'tools[{i}].type'.",
                f"tools[{i}].type",
                "missing_required_parameter",
            )
        model = kinds.get(kind)
        if model is None:
            if hosted == "drop":
                continue
            raise bad_request(
                f"Invalid value for 'tools[{i}].type': tool type '{kind}' cannot run on "
                "this server (only function, custom, namespace and mcp tools do; see the "
                "hosted_tools setting).",
                f"tools[{i}].type",
                "unsupported_tool",
            )
        try:
            tools.append(model.model_validate(tool))
        except ValidationError as exc:
            err = exc.errors()[0]
            # (Union branches appear in the location as class names: not a field.)
            where = "".join(
                f"[{p}]" if isinstance(p, int) else f".{p}"
                for p in err["loc"]
                if isinstance(p, int) or not p[:1].isupper()
            )
            raise bad_request(
                f"Invalid value for 'tools[{i}]{where}': {err['msg']}.",
                f"tools[{i}]{where}",
                "invalid_value",
            ) from None
        if isinstance(tools[-1], McpTool):
            mcp_tools.check(tools[-1], i)
    return tools


def dropped_types(raw: Any) -> list[str]:
    if not isinstance(raw, list):
        return []
    return [t["type"] for t in raw if isinstance(t, dict) and t.get("type") not in RUNNABLE]


def toolset(tools: list[AnyTool] | None, dropped: list[str]) -> Toolset:
    out = Toolset(dropped=dropped)
    for i, tool in enumerate(tools or []):
        if isinstance(tool, McpTool):
            out.echo.append(mcp_tools.echo(tool))
            out.mcp.append(mcp_tools.server(tool, i))
            continue
        out.echo.append(_echo(tool))
        members = tool.tools if isinstance(tool, NamespaceTool) else [tool]
        namespace = tool.name if isinstance(tool, NamespaceTool) else None
        for member in members:
            flat = flat_name(namespace, member.name)
            shown: dict[str, Any] = {"name": member.name}
            if namespace is not None:
                shown["namespace"] = namespace
            if isinstance(member, CustomTool):
                shown["custom"] = True
            out.names[flat] = shown
            out.engine.append(_engine_tool(flat, member))
    return out


def _echo(tool: FunctionTool | CustomTool | NamespaceTool) -> dict[str, Any]:
    if isinstance(tool, NamespaceTool):
        return {
            "type": "namespace",
            "name": tool.name,
            "description": tool.description or "",
            "tools": [_echo(t) for t in tool.tools],
        }
    if isinstance(tool, CustomTool):
        echo: dict[str, Any] = {
            "type": "custom",
            "name": tool.name,
            "format": tool.format or {"type": "text"},
        }
        if tool.description is not None:
            echo["description"] = tool.description
        return echo
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        "strict": True if tool.strict is None else tool.strict,
    }


def _engine_tool(flat: str, tool: FunctionTool | CustomTool) -> dict[str, Any]:
    if isinstance(tool, FunctionTool):
        return _echo(tool) | {"name": flat}
    description = tool.description or ""
    fmt = tool.format or {}
    if fmt.get("type") == "grammar":
        description += (
            f"\nThe input must match this {fmt.get('syntax', '')} grammar:\n"
            f"{fmt.get('definition', '')}"
        )
    return {
        "type": "function",
        "name": flat,
        "description": description.strip() or None,
        "parameters": CUSTOM_PARAMETERS,
        "strict": True,
    }


def resolve_choice(
    choice: Any, names: dict[str, dict[str, Any]], labels: frozenset[str] = frozenset()
) -> Any:
    """`tool_choice` as engines get it (function names flattened), refusing a named tool
    that is not offered, as OpenAI does. An MCP choice names one of the request's MCP
    servers (`labels`); the run resolves it (`tool_loop`)."""
    if isinstance(choice, ToolChoiceMcp):
        if choice.server_label not in labels:
            raise bad_request(
                f"Invalid 'tool_choice.server_label': no mcp tool '{choice.server_label}' "
                "in 'tools'.",
                "tool_choice.server_label",
                "invalid_value",
            )
        return choice.model_dump()
    if isinstance(choice, ToolChoiceFunction | ToolChoiceCustom):
        return {"type": "function", "name": _flat_of(choice, names, "tool_choice")}
    if isinstance(choice, AllowedTools):
        tools = [
            {"type": "function", "name": _flat_of(t, names, f"tool_choice.tools[{i}]")}
            for i, t in enumerate(choice.tools)
        ]
        return {"type": "allowed_tools", "tools": tools, "mode": choice.mode}
    return choice


def _flat_of(
    choice: ToolChoiceFunction | ToolChoiceCustom, names: dict[str, dict[str, Any]], param: str
) -> str:
    """A named tool: by its flat name, by namespace + name, or by a name unique among
    the offered tools."""
    custom = choice.type == "custom"
    wanted = flat_name(choice.namespace, choice.name)
    found = [
        flat
        for flat, shown in names.items()
        if bool(shown.get("custom")) == custom
        and (flat == wanted or (choice.namespace is None and shown["name"] == choice.name))
    ]
    if wanted in found:
        return wanted
    if len(found) == 1:
        return found[0]
    raise bad_request(
        f"Invalid '{param}.name': no {choice.type} tool '{choice.name}' in 'tools'.",
        f"{param}.name",
        "invalid_value",
    )
