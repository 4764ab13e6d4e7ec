"""MCP tools on the wire: `tools: [{"type": "mcp", ...}]` as OpenAI documents them, and the
operator's allow-list of the servers tether may call (docs/fields.md, "Tools").

A request's MCP tool becomes an `McpServer` the run spec keeps (`RunSpec.mcp`): its URL,
the headers to send, which of its tools the model may see (`allowed_tools`) and which need
an approval first (`require_approval`, whose default is `always`, as OpenAI's). The run
lists its tools and calls them (`tether.tool_loop`, `tether.mcp_client`).

Connectors (`connector_id`) and tunnels (`tunnel_id`) are OpenAI's own: refused with a 400
naming the field. A `server_url` is called only when its host is in the `mcp_hosts`
setting (default: loopback only), since the server makes these requests itself.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from tether.errors import bad_request

#: the default of the `mcp_hosts` setting: this machine only (`loopback`: any loopback
#: address, and `localhost`)
LOOPBACK_HOSTS = ["loopback"]


class McpToolFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    tool_names: list[StrictStr] | None = None
    read_only: StrictBool | None = None


class ApprovalFilter(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    always: McpToolFilter | None = None
    never: McpToolFilter | None = None


class McpTool(BaseModel):
    """`{"type": "mcp", ...}` (OpenAI's `MCPTool`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["mcp"]
    # Part of the function names engines are given (`label__tool`): a name's characters.
    server_label: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    server_url: StrictStr | None = None
    connector_id: StrictStr | None = None
    tunnel_id: StrictStr | None = None
    authorization: StrictStr | None = None
    server_description: StrictStr | None = None
    headers: dict[str, StrictStr] | None = None
    allowed_tools: list[StrictStr] | McpToolFilter | None = None
    require_approval: Literal["always", "never"] | ApprovalFilter | None = None
    defer_loading: StrictBool | None = None
    allowed_callers: list[Any] | None = None


def check(tool: McpTool, i: int) -> None:
    """What the model cannot say: a connector or tunnel (OpenAI's own), no URL, a URL
    tether cannot speak to."""
    for name in ("connector_id", "tunnel_id"):
        if getattr(tool, name) is not None:
            raise bad_request(
                f"Invalid value for 'tools[{i}].{name}': connectors and tunnels are "
                "OpenAI's; this server calls MCP servers by 'server_url' only.",
                f"tools[{i}].{name}",
                "unsupported_parameter",
            )
    if tool.server_url is None:
        raise bad_request(
            f"Missing required parameter: 'tools[{i}].server_url'.",
            f"tools[{i}].server_url",
            "missing_required_parameter",
        )
    url = urlsplit(tool.server_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise bad_request(
            f"Invalid value for 'tools[{i}].server_url': an http or https URL is expected.",
            f"tools[{i}].server_url",
            "invalid_value",
        )


def echo(tool: McpTool) -> dict[str, Any]:
    """The tool as the response shows it: as given, less its secrets (`headers`,
    `authorization` are sent to the server, never shown)."""
    shown = tool.model_dump(exclude_none=True, exclude={"headers", "authorization"})
    return shown


def server(tool: McpTool, i: int) -> dict[str, Any]:
    """The run's view of the server (JSON: the run spec keeps it)."""
    headers = dict(tool.headers or {})
    if tool.authorization is not None:
        headers["Authorization"] = f"Bearer {tool.authorization}"
    allowed = tool.allowed_tools
    approval = tool.require_approval
    return {
        "index": i,
        "label": tool.server_label,
        "url": tool.server_url,
        "headers": headers,
        "allowed": allowed.model_dump() if isinstance(allowed, McpToolFilter) else allowed,
        "approval": approval.model_dump() if isinstance(approval, ApprovalFilter) else approval,
    }


def check_hosts(servers: list[dict[str, Any]], hosts: list[str]) -> None:
    """Refuse a server whose host the operator did not allow (`mcp_hosts`; `*`: any)."""
    if "*" in hosts:
        return
    allowed = {h.lower().strip("[]") for h in hosts}
    for s in servers:
        host = (urlsplit(s["url"]).hostname or "").lower()
        if host in allowed or (_loopback(host) and "loopback" in allowed):
            continue
        raise bad_request(
            f"Invalid value for 'tools[{s['index']}].server_url': this server may not call "
            f"MCP servers on host '{host}' (the operator's mcp_hosts setting allows: "
            f"{', '.join(sorted(allowed))}).",
            f"tools[{s['index']}].server_url",
            "invalid_value",
        )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def visible(server: dict[str, Any], name: str, annotations: dict[str, Any] | None) -> bool:
    """The model may see tool `name` (`allowed_tools`)."""
    allowed = server.get("allowed")
    if allowed is None:
        return True
    if isinstance(allowed, list):
        return name in allowed
    return _matches(allowed, name, annotations)


def needs_approval(server: dict[str, Any], name: str, annotations: dict[str, Any] | None) -> bool:
    """A call of `name` waits for an approval (`require_approval`; default `always`)."""
    rule = server.get("approval")
    if rule is None or rule == "always":
        return True
    if rule == "never":
        return False
    return not (rule.get("never") and _matches(rule["never"], name, annotations))


def _matches(f: dict[str, Any], name: str, annotations: dict[str, Any] | None) -> bool:
    """A filter matches when every criterion it gives holds."""
    names, read_only = f.get("tool_names"), f.get("read_only")
    if names is None and read_only is None:
        return False
    if names is not None and name not in names:
        return False
    hint = bool((annotations or {}).get("readOnlyHint"))
    return read_only is None or hint == read_only


# --- MCP items as input (an approval's answer; earlier output sent back as context) --------


class McpApprovalResponseInput(BaseModel):
    """`mcp_approval_response`: the answer to an `mcp_approval_request` of an earlier
    response (`tether.tool_loop` makes the call, when approved, first thing)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["mcp_approval_response"]
    approval_request_id: StrictStr
    approve: StrictBool
    reason: StrictStr | None = None
    id: StrictStr | None = None


class McpApprovalRequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["mcp_approval_request"]
    id: StrictStr
    server_label: StrictStr
    name: StrictStr
    arguments: StrictStr


class McpCallInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["mcp_call"]
    id: StrictStr
    server_label: StrictStr
    name: StrictStr
    arguments: StrictStr
    output: StrictStr | None = None
    error: Any = None
    status: StrictStr | None = None
    approval_request_id: StrictStr | None = None


class McpListToolsInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["mcp_list_tools"]
    id: StrictStr
    server_label: StrictStr
    tools: list[dict[str, Any]]
    error: StrictStr | None = None


#: input item type -> the prefix of the id a stored one is given when it has none
INPUT_PREFIXES = {
    "mcp_approval_response": "mcpa",
    "mcp_approval_request": "mcpr",
    "mcp_call": "mcp",
    "mcp_list_tools": "mcpl",
}


def output_text(call: dict[str, Any]) -> str:
    """What the model reads of an `mcp_call` item: its output, or its error."""
    if call.get("output") is not None:
        return str(call["output"])
    return error_text(call.get("error") or {})


def error_text(error: dict[str, Any]) -> str:
    """What the model reads of a failed call (OpenAI's `MCPToolCallError` shapes)."""
    if error.get("type") == "mcp_tool_execution_error":
        content = error.get("content") or []
        parts = [c.get("text", "") for c in content if isinstance(c, dict)]
        return "Error: " + "\n".join(parts)
    return f"Error: {error.get('message', 'the call failed')}"


class McpFailure(Exception):
    """A server that could not be reached, refused, timed out or failed a call."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message") or "the MCP tool failed")
        self.error = error  # OpenAI's MCPToolCallError: protocol, tool execution or HTTP
