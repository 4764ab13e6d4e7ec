"""The test MCP server (`tests/mcp_server.py`) as the MCP tests use it: a real subprocess
on a loopback port (`mcp_server`), what it saw (`McpServer.seen`), and the `mcp` tool of a
request that calls it (`tool`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from conftest import free_port, wait_for

SERVER = Path(__file__).resolve().parent / "mcp_server.py"


@dataclass
class McpServer:
    """A `tests/mcp_server.py` process: its URL, and what it saw (`seen()`)."""

    port: int
    transport: str
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        path = {"sse": "/sse", "sse-events": "/events"}.get(self.transport, "/mcp")
        return f"http://127.0.0.1:{self.port}{path}"

    def seen(self, event: str | None = None, tool: str | None = None) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = httpx.get(f"http://127.0.0.1:{self.port}/seen").json()
        return [
            s
            for s in got
            if (event is None or s["event"] == event) and (tool is None or s["tool"] == tool)
        ]


@contextmanager
def mcp_server(transport: str, *extra: str) -> Iterator[McpServer]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), str(port), transport, *extra])
    server = McpServer(port, transport, proc)
    try:

        def up() -> bool:
            try:
                server.seen()
            except httpx.HTTPError:
                return False
            return True

        wait_for(up, 30, "the MCP server")
        yield server
    finally:
        proc.kill()
        proc.wait()


def tool(server: McpServer, **fields: Any) -> dict[str, Any]:
    return {
        "type": "mcp",
        "server_label": "calc",
        "server_url": server.url,
        "require_approval": "never",
        **fields,
    }


def types_of(events: list[Any]) -> list[str]:
    return [e.type for e in events]


MCP_EVENTS = (
    "response.mcp_call.in_progress",
    "response.mcp_call_arguments.delta",
    "response.mcp_call_arguments.done",
    "response.mcp_call.completed",
)
