"""Calling MCP servers with the official `mcp` SDK: connect, list tools, call a tool.

One connection per server for the whole run (`connect`), made by `Client` in `auto` mode
(the 2026 `server/discover` probe, falling back to the initialize handshake). The
transport follows the URL: a path ending in `/sse` is the older SSE transport, anything
else streamable HTTP.

Every failure becomes a `McpFailure` carrying OpenAI's `MCPToolCallError` shape, so a
call that failed is an `mcp_call` item with `error`, never a failed response. A
cancellation is never one: when the run's scope is cancelled while a call waits, the
SDK sends the server `notifications/cancelled` for it (a shielded write: the
`jsonrpc_dispatcher` of mcp 2.x; at the 2026 protocol version, closing the request's
stream is that signal) and leaving `connect` closes the connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import orjson
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from tether.mcp_tools import McpFailure

#: JSON-RPC's "request timed out" code, as the SDK uses it
REQUEST_TIMEOUT = -32001
INTERNAL_ERROR = -32603


def _failure(exc: BaseException, what: str) -> McpFailure:
    """`exc` (or the first of an exception group) as OpenAI's error shape."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, McpFailure):
        return exc
    if isinstance(exc, MCPError):
        return McpFailure(
            {"type": "mcp_protocol_error", "code": exc.code, "message": exc.error.message}
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):  # the SDK's HTTP client's status error
        return McpFailure(
            {"type": "http_error", "code": status, "message": f"{what}: HTTP {status}"}
        )
    if isinstance(exc, TimeoutError):
        return McpFailure(
            {"type": "mcp_protocol_error", "code": REQUEST_TIMEOUT, "message": f"{what}: timed out"}
        )
    detail = str(exc) or type(exc).__name__
    return McpFailure({"type": "http_error", "code": 502, "message": f"{what}: {detail}"})


@asynccontextmanager
async def connect(server: dict[str, Any], timeout: float, max_output: int) -> AsyncIterator[Client]:
    """A connected client of `server` (`mcp_tools.server`); connecting takes at most
    `timeout` seconds. Raises `McpFailure`.

    A URL whose path ends in `/sse` speaks the older SSE transport. Any other is tried
    with streamable HTTP first and, when the server answers that with an error (an
    SSE-only server refuses the POST), with SSE, as OpenAI does; if both fail, the
    first failure is the one reported."""
    sse_only = urlsplit(server["url"]).path.rstrip("/").endswith("/sse")
    async with AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(
                _session(server, sse_only, timeout, max_output)
            )
        except McpFailure as exc:
            refused = (
                exc.error["type"] == "mcp_protocol_error" and exc.error["code"] != REQUEST_TIMEOUT
            )
            if sse_only or not refused:
                raise
            try:
                client = await stack.enter_async_context(
                    _session(server, True, timeout, max_output)
                )
            except McpFailure:
                raise exc from None
        yield client


@asynccontextmanager
async def _session(
    server: dict[str, Any], sse: bool, timeout: float, max_output: int
) -> AsyncIterator[Client]:
    url, headers = server["url"], server.get("headers") or {}
    transport: Any
    if sse:
        transport = sse_client(url, headers=headers, timeout=timeout)
    else:
        # (The SDK's HTTP timeouts stay: a request waits at most `timeout` anyway, the
        # client's `read_timeout_seconds`, counted from the moment it is sent.)
        http = create_mcp_http_client(headers=headers)
        # A result's event larger than the output limit (and some room for its JSON
        # framing) is refused as it arrives, never buffered whole.
        transport = streamable_http_client(
            url, http_client=http, max_sse_event_size=max_output * 2 + 65536
        )
    # The handshake's requests wait at most `timeout` (`read_timeout_seconds`); the
    # client's task groups must nest in the caller's scopes, so no timer wraps them.
    client = Client(transport, read_timeout_seconds=timeout)
    entered, body_failed = False, False
    try:
        async with client:
            entered = True
            try:
                yield client
            except BaseException:
                body_failed = True
                raise
    except BaseException as exc:
        # A cancellation (and anything else not an Exception) always goes on, never
        # swallowed; so does what the caller's own body raised.
        if body_failed or not isinstance(exc, Exception):
            raise
        if not entered:
            raise _failure(exc, f"connecting to {server['label']}") from None
        # Closing a connection that broke meanwhile: nothing the run needs to know.


async def list_tools(client: Client, label: str, timeout: float) -> list[dict[str, Any]]:
    """The server's tools, every page, as OpenAI's `MCPListToolsTool`s."""
    tools: list[dict[str, Any]] = []
    cursor: str | None = None
    try:
        with anyio.fail_after(timeout):
            while True:
                page = await client.list_tools(cursor=cursor)
                for t in page.tools:
                    tool: dict[str, Any] = {
                        "name": t.name,
                        "input_schema": t.input_schema,
                        "description": t.description,
                        "annotations": (
                            t.annotations.model_dump(exclude_none=True) if t.annotations else None
                        ),
                    }
                    tools.append(tool)
                cursor = page.next_cursor
                if not cursor:
                    return tools
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        raise _failure(exc, f"listing the tools of {label}") from None


async def call_tool(
    client: Client, name: str, arguments: str, timeout: float, max_output: int
) -> str:
    """Call tool `name` with `arguments` (the model's JSON text): its output as text.
    Raises `McpFailure` (the tool's own error included)."""
    try:
        args = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        args = None
    if not isinstance(args, dict):
        raise McpFailure(
            {"type": "mcp_protocol_error", "code": -32602,
             "message": "The model's arguments are not a JSON object."}
        )  # fmt: skip
    try:
        with anyio.fail_after(timeout):
            result = await client.call_tool(name, args)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        raise _failure(exc, f"calling {name}") from None
    content = [c.model_dump(mode="json", exclude_none=True) for c in result.content]
    if result.is_error:
        raise McpFailure({"type": "mcp_tool_execution_error", "content": content})
    output = _text(content, result.structured_content)
    if len(output) > max_output:
        raise McpFailure(
            {"type": "mcp_protocol_error", "code": INTERNAL_ERROR,
             "message": f"The tool's output ({len(output)} characters) is over this "
             f"server's limit of {max_output} (mcp_max_output)."}
        )  # fmt: skip
    return output


def _text(content: list[dict[str, Any]], structured: Any) -> str:
    """A result as the text the model reads: its text blocks joined; other blocks
    (images, resources) as their JSON; structured content alone as JSON."""
    parts = [c["text"] if c.get("type") == "text" else orjson.dumps(c).decode() for c in content]
    if not parts and structured is not None:
        return orjson.dumps(structured).decode()
    return "\n".join(parts)
