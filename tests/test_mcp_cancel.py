"""Cancel inside an MCP tool loop (issue 17; docs/cancellation.md, "Tool loops"): while
the tools are listed, while the model streams a call's arguments, while a call is in
flight (the MCP server sees the cancellation within 50 ms of the reply), between steps; and
a crash mid-call. Every time the reply, the retrieve and the log agree, the open item
closes `incomplete`, and nothing runs after the reply.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mcps import McpServer, mcp_server, tool, types_of

from conftest import Server, raw_events, wait_for
from test_codex import call_directive


@pytest.fixture(scope="module", params=["streamable-http", "sse"])
def mcp(request: pytest.FixtureRequest) -> Iterator[McpServer]:
    with mcp_server(request.param) as server:
        yield server


@pytest.fixture(scope="module")
def mcp_http() -> Iterator[McpServer]:
    with mcp_server("streamable-http") as server:
        yield server


def test_cancel_during_a_slow_call(make_server: Any, mcp: McpServer) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    before = len(mcp.seen("cancelled", "slow"))
    started = len(mcp.seen("started", "slow"))
    prompt = f"{call_directive('calc__slow', {'seconds': 30})} wait"
    with server.client() as client:
        stream = client.responses.create(
            model="scripted", input=prompt, tools=[tool(mcp)], stream=True, background=True
        )
        events = []
        for event in stream:
            events.append(event)
            if event.type == "response.mcp_call_arguments.done":
                break
        rid = events[0].response.id
        wait_for(lambda: len(mcp.seen("started", "slow")) > started, 10, "the slow call")
        live = client.responses.retrieve(rid)  # a live response shows the call in flight
        assert [(i.type, getattr(i, "status", None)) for i in live.output] == [
            ("mcp_list_tools", None),
            ("mcp_call", "calling"),
        ]
        called = time.time()
        reply = client.responses.cancel(rid)
        replied = time.time()
        events += list(stream)
        retrieved = client.responses.retrieve(rid)
    assert reply.status == retrieved.status == "cancelled"
    [call] = [i for i in reply.output if i.type == "mcp_call"]
    assert call.status == "incomplete" and call.output is None
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "cancelled"
    assert types_of(events)[-2:] == ["response.output_item.done", "response.failed"]
    assert retrieved.model_dump() == reply.model_dump()
    # The server saw the cancellation within 50 ms of the reply.
    [seen] = wait_for(lambda: mcp.seen("cancelled", "slow")[before:], 5, "the server's cancel")
    assert called - 0.01 <= seen["at"] <= replied + 0.05, (called, seen["at"], replied)
    # Nothing after the terminal event: the log ends there.
    assert [e["type"] for e in raw_events(server, rid)] == types_of(events)


def test_cancel_while_the_model_generates_between_calls(
    make_server: Any, mcp_http: McpServer
) -> None:
    server: Server = make_server("--scripted-rate", "20", "--scripted-length", "400")
    before = len(mcp_http.seen("started", "add"))
    prompt = f"CALLS=3 {call_directive('calc__add', {'a': 2, 'b': 3})} add"
    with server.client() as client:
        stream = client.responses.create(
            model="scripted", input=prompt, tools=[tool(mcp_http)], stream=True, background=True
        )
        events = []
        for event in stream:
            events.append(event)
            if types_of(events).count("response.mcp_call_arguments.delta") == 7:
                break  # the second call's arguments are streaming
        rid = events[0].response.id
        reply = client.responses.cancel(rid)
        replied = time.time()
        events += list(stream)
    assert reply.status == "cancelled"
    calls = [i for i in reply.output if i.type == "mcp_call"]
    assert [c.status for c in calls] == ["completed", "incomplete"]
    deltas = sum(
        e.type in ("response.output_text.delta", "response.mcp_call_arguments.delta")
        for e in events
    )
    assert reply.usage.output_tokens == deltas
    time.sleep(0.3)  # a call made after the reply would show up by now
    assert len(mcp_http.seen("started", "add")) == before + 1
    trace = server.trace(rid)
    assert not any(t > replied for t in trace["token_times"])  # type: ignore[union-attr]


def test_cancel_between_steps(make_server: Any, mcp_http: McpServer) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    before = len(mcp_http.seen("started", "add"))
    # Every step reads its prompt for 1 s: the cancel lands after the call completed,
    # while the next step has produced nothing.
    prompt = f"PREFILL=1 CALLS=3 {call_directive('calc__add', {'a': 2, 'b': 3})} add"
    with server.client() as client:
        stream = client.responses.create(
            model="scripted", input=prompt, tools=[tool(mcp_http)], stream=True, background=True
        )
        events = []
        for event in stream:
            events.append(event)
            if event.type == "response.mcp_call.completed":
                break
        reply = client.responses.cancel(events[0].response.id)
        replied = time.time()
        events += list(stream)
    assert reply.status == "cancelled"
    assert [(i.type, getattr(i, "status", None)) for i in reply.output] == [
        ("mcp_list_tools", None),
        ("mcp_call", "completed"),
    ]
    # The step that was cancelled added nothing: the call's item closed, then the end.
    assert types_of(events)[-3:] == [
        "response.mcp_call.completed",
        "response.output_item.done",
        "response.failed",
    ]
    assert reply.usage.output_tokens == types_of(events).count("response.mcp_call_arguments.delta")
    time.sleep(0.3)  # a call made after the reply would show up by now
    assert len(mcp_http.seen("started", "add")) == before + 1
    trace = server.trace(reply.id)
    assert not any(t > replied for t in trace["token_times"])  # type: ignore[union-attr]
    assert trace["aborted_at"] is not None


def test_cancel_while_listing_tools(make_server: Any) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    # A server that takes the connection and never answers: the listing waits.
    with socket.socket() as mute, server.client() as client:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        url = f"http://127.0.0.1:{mute.getsockname()[1]}/mcp"
        stream = client.responses.create(
            model="scripted",
            input="hi",
            tools=[{"type": "mcp", "server_label": "mute", "server_url": url}],
            stream=True,
            background=True,
        )
        events = []
        for event in stream:
            events.append(event)
            if event.type == "response.mcp_list_tools.in_progress":
                break
        started = time.monotonic()
        reply = client.responses.cancel(events[0].response.id)
        took = time.monotonic() - started
        events += list(stream)
    assert reply.status == "cancelled" and took < 1, took
    [listing] = reply.output
    assert listing.type == "mcp_list_tools" and listing.tools == [] and listing.error
    assert types_of(events)[-2:] == ["response.output_item.done", "response.failed"]


def test_a_crash_mid_loop_ends_failed_and_replays(make_server: Any, mcp_http: McpServer) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    started = len(mcp_http.seen("started", "slow"))
    prompt = f"{call_directive('calc__slow', {'seconds': 30})} wait"
    with server.client() as client:
        created = client.responses.create(
            model="scripted", input=prompt, tools=[tool(mcp_http)], background=True
        )
    wait_for(lambda: len(mcp_http.seen("started", "slow")) > started, 10, "the slow call")
    server.kill()
    server.start()
    with server.client() as client:
        final = wait_for(
            lambda: (r := client.responses.retrieve(created.id)).status != "in_progress" and r,
            10,
            "the dead run to end",
        )
    assert final.status == "failed"
    assert [i.type for i in final.output] == ["mcp_list_tools", "mcp_call"]
    assert final.output[1].status == "incomplete"
    log = raw_events(server, created.id)
    assert log[-1]["type"] == "response.failed"
    assert [e["type"] for e in log].count("response.mcp_call_arguments.done") == 1
