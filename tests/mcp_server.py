"""A real MCP server for the tests (`python tests/mcp_server.py PORT TRANSPORT [TOKEN]`),
built with the `mcp` SDK's `MCPServer`, served by uvicorn on loopback.

TRANSPORT is `streamable-http` (endpoint `/mcp`), `sse` (endpoint `/sse`) or `sse-events`
(SSE at `/events`). With TOKEN,
every MCP request must carry `Authorization: Bearer TOKEN` (a server that needs a
header); others get a 401. Tools:

- `add(a, b)`: a quick one;
- `slow(seconds)`: reports progress and sleeps; a cancel (the client's
  `notifications/cancelled`, or its disconnect) is recorded with its time;
- `fail(message)`: raises (the client sees a tool error);
- `big(size)`: a text of `size` characters.

`GET /health` answers 200 (bench/_server.py waits for it). `GET /seen` answers what the
server saw, in order: `{"event": "started"|"cancelled"|"finished", "tool", "at"}` (a
`time.time()`), so a test can tell when a cancel arrived.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

SEEN: list[dict[str, Any]] = []
server = MCPServer("tether-test", log_level="ERROR")


def _saw(event: str, tool: str) -> None:
    SEEN.append({"event": event, "tool": tool, "at": time.time()})


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    _saw("started", "add")
    return a + b


@server.tool()
async def slow(seconds: float, ctx: Context) -> str:
    """Wait `seconds`, reporting progress; records a cancel."""
    _saw("started", "slow")
    try:
        steps = max(1, int(seconds * 10))
        for i in range(steps):
            await ctx.report_progress(i, steps)
            await anyio.sleep(seconds / steps)
    except anyio.get_cancelled_exc_class():
        _saw("cancelled", "slow")
        raise
    _saw("finished", "slow")
    return f"waited {seconds}s"


@server.tool()
def fail(message: str = "it broke") -> str:
    """Always fails."""
    _saw("started", "fail")
    raise ToolError(message)


@server.tool()
def big(size: int) -> str:
    """A text of `size` characters."""
    _saw("started", "big")
    return "x" * size


@server.custom_route("/seen", methods=["GET"])
async def seen(request: Request) -> Response:
    return JSONResponse(SEEN)


@server.custom_route("/health", methods=["GET"])
async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


class NeedsToken:
    """Refuses MCP requests without `Authorization: Bearer TOKEN`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in ("/seen", "/health"):
            headers = dict(scope["headers"])
            if headers.get(b"authorization") != f"Bearer {self.token}".encode():
                await JSONResponse({"error": "unauthorized"}, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def main() -> None:
    port, transport = int(sys.argv[1]), sys.argv[2]
    if transport == "sse-events":  # SSE at a path that does not say so
        app: ASGIApp = server.sse_app(sse_path="/events")
    elif transport == "sse":
        app = server.sse_app()
    else:
        app = server.streamable_http_app()
    if len(sys.argv) > 3:
        app = NeedsToken(app, sys.argv[3])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
