"""MCP tools (issue 17): the run lists a real MCP server's tools, the model calls them,
the run calls the server and generates again, in one response; a cancel stops it inside
the loop, a call in flight included (the server sees the cancellation).

The MCP servers are real (`tests/mcp_server.py`, built with the `mcp` SDK) on loopback,
over streamable HTTP and SSE; tether is a real process, driven by the real `openai` SDK;
every event and response is checked against OpenAI's schema (`tests/spec.py`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from upstreams import FakeUpstream, fake_upstream

from conftest import Server, free_port, raw_events, wait_for
from test_codex import call_directive

SERVER = Path(__file__).resolve().parent / "mcp_server.py"
TOKEN = "s3cret"


@dataclass
class McpServer:
    """A `tests/mcp_server.py` process: its URL, and what it saw (`seen()`)."""

    port: int
    transport: str
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        path = "/sse" if self.transport == "sse" else "/mcp"
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


@pytest.fixture(scope="module", params=["streamable-http", "sse"])
def mcp(request: pytest.FixtureRequest) -> Iterator[McpServer]:
    with mcp_server(request.param) as server:
        yield server


@pytest.fixture(scope="module")
def mcp_http() -> Iterator[McpServer]:
    with mcp_server("streamable-http") as server:
        yield server


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


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


# --- (a) the loop -------------------------------------------------------------------------


def test_a_three_step_loop_completes_on_the_scripted_engine(
    make_server: Any, mcp: McpServer
) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    before = len(mcp.seen("started", "add"))
    prompt = f"CALLS=3 {call_directive('calc__add', {'a': 2, 'b': 3})} add them"
    with server.client() as client:
        events = list(
            client.responses.create(model="scripted", input=prompt, tools=[tool(mcp)], stream=True)
        )
        final = events[-1].response
        assert final.status == "completed", final
        kinds = [i.type for i in final.output]
        assert kinds == ["mcp_list_tools", "mcp_call", "mcp_call", "mcp_call", "message"]
        listing = final.output[0]
        assert {t.name for t in listing.tools} == {"add", "slow", "fail", "big"}
        for call in final.output[1:4]:
            assert (call.name, call.server_label, call.status) == ("add", "calc", "completed")
            assert call.output == "5" and call.error is None
            assert call.arguments == '{"a":2,"b":3}'
        # Every step's events, in order, in the stream.
        types = types_of(events)
        assert types[:6] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.mcp_list_tools.in_progress",
            "response.mcp_list_tools.completed",
            "response.output_item.done",
        ]
        assert types.count("response.mcp_call.completed") == 3
        assert types.count("response.output_item.added") == 5
        assert types.count("response.output_item.done") == 5
        assert types[-1] == "response.completed"
        indexes = [e.output_index for e in events if e.type == "response.output_item.added"]
        assert indexes == [0, 1, 2, 3, 4]
        # Usage sums every step: four prompts read, every token streamed.
        deltas = sum(
            e.type in ("response.output_text.delta", "response.mcp_call_arguments.delta")
            for e in events
        )
        assert final.usage.output_tokens == deltas
        assert client.responses.retrieve(final.id).model_dump() == final.model_dump()
    assert len(mcp.seen("started", "add")) == before + 3
    # A resumed stream replays every step's events.
    replayed = raw_events(server, final.id)
    assert [e["type"] for e in replayed] == types


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_calls_in_one_step(make_server: Any, mcp_http: McpServer, parallel: bool) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    prompt = f"PARALLEL=3 {call_directive('calc__slow', {'seconds': 0.5})} wait"
    with server.client() as client:
        started = time.monotonic()
        final = client.responses.create(
            model="scripted", input=prompt, tools=[tool(mcp_http)], parallel_tool_calls=parallel
        )
        took = time.monotonic() - started
    assert final.status == "completed", final
    calls = [i for i in final.output if i.type == "mcp_call"]
    assert [c.output for c in calls] == ["waited 0.5s"] * 3
    assert [i.type for i in final.output] == ["mcp_list_tools", *["mcp_call"] * 3, "message"]
    # At once (about 0.5 s), or one after the other (at least 1.5 s).
    assert took < 1.4 if parallel else took >= 1.5, took


def test_a_tool_error_is_an_mcp_call_error(make_server: Any, mcp_http: McpServer) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    prompt = f"{call_directive('calc__fail', {'message': 'no luck'})} try"
    with server.client() as client:
        final = client.responses.create(model="scripted", input=prompt, tools=[tool(mcp_http)])
    assert final.status == "completed", final
    [call] = [i for i in final.output if i.type == "mcp_call"]
    assert call.status == "failed" and call.output is None
    assert call.error is not None
    error = call.error.model_dump() if hasattr(call.error, "model_dump") else call.error
    assert error["type"] == "mcp_tool_execution_error"
    assert "no luck" in str(error["content"])
    assert final.output[-1].type == "message"


def test_max_tool_calls_bounds_the_loop(make_server: Any, mcp_http: McpServer) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    before = len(mcp_http.seen("started", "add"))
    prompt = f"CALLS=5 {call_directive('calc__add', {'a': 1, 'b': 1})} add"
    with server.client() as client:
        final = client.responses.create(
            model="scripted", input=prompt, tools=[tool(mcp_http)], max_tool_calls=2
        )
    assert final.status == "completed", final
    calls = [i for i in final.output if i.type == "mcp_call"]
    assert [c.status for c in calls] == ["completed", "completed"]
    assert final.output[-1].type == "message"
    assert final.max_tool_calls == 2
    assert len(mcp_http.seen("started", "add")) == before + 2


def test_a_big_output_and_a_slow_call_are_bounded(make_server: Any, mcp_http: McpServer) -> None:
    server: Server = make_server(
        "--scripted-rate", "0", "--scripted-length", "40",
        "--mcp-max-output", "100", "--mcp-timeout", "1",
    )  # fmt: skip
    with server.client() as client:
        big = client.responses.create(
            model="scripted",
            input=f"{call_directive('calc__big', {'size': 5000})} go",
            tools=[tool(mcp_http)],
        )
        started = time.monotonic()
        slow = client.responses.create(
            model="scripted",
            input=f"{call_directive('calc__slow', {'seconds': 20})} go",
            tools=[tool(mcp_http)],
        )
        took = time.monotonic() - started
    [call] = [i for i in big.output if i.type == "mcp_call"]
    assert call.status == "failed" and "mcp_max_output" in call.error.message
    [call] = [i for i in slow.output if i.type == "mcp_call"]
    assert call.status == "failed" and "timed out" in call.error.message
    assert took < 10
    assert big.status == slow.status == "completed"


def test_a_server_that_needs_a_header(make_server: Any) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    prompt = f"{call_directive('calc__add', {'a': 40, 'b': 2})} add"
    with mcp_server("streamable-http", TOKEN) as mcp, server.client() as client:
        good = client.responses.create(
            model="scripted",
            input=prompt,
            tools=[tool(mcp, headers={"Authorization": f"Bearer {TOKEN}"})],
        )
        bad = client.responses.create(model="scripted", input=prompt, tools=[tool(mcp)])
    [call] = [i for i in good.output if i.type == "mcp_call"]
    assert call.output == "42"
    assert "headers" not in good.tools[0].model_dump(exclude_none=True)  # never shown
    assert bad.status == "completed"
    assert [i.type for i in bad.output] == ["mcp_list_tools", "message"]
    assert bad.output[0].error


def test_tool_choice_names_an_mcp_tool(make_server: Any, mcp_http: McpServer) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    prompt = f"{call_directive('calc__add', {'a': 1, 'b': 2})} add"
    with server.client() as client:
        final = client.responses.create(
            model="scripted",
            input=prompt,
            tools=[tool(mcp_http)],
            tool_choice={"type": "mcp", "server_label": "calc", "name": "add"},
        )
        # Honoured once, then `auto`: the loop ends with an answer.
        assert [i.type for i in final.output] == ["mcp_list_tools", "mcp_call", "message"]
        assert final.output[1].output == "3"
        assert final.tool_choice.type == "mcp"  # echoed as given
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(
                model="scripted",
                input=prompt,
                tools=[tool(mcp_http)],
                tool_choice={"type": "mcp", "server_label": "nope"},
            )
        assert err.value.param == "tool_choice.server_label"


# --- (d) approvals ------------------------------------------------------------------------


def test_an_approval_round_trip(make_server: Any, mcp_http: McpServer) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    before = len(mcp_http.seen("started", "add"))
    asks = {k: v for k, v in tool(mcp_http).items() if k != "require_approval"}  # default: always
    prompt = f"{call_directive('calc__add', {'a': 20, 'b': 22})} add"
    with server.client() as client:
        first = client.responses.create(model="scripted", input=prompt, tools=[asks], stream=True)
        events = list(first)
        one = events[-1].response
        assert one.status == "completed", one
        assert [i.type for i in one.output] == ["mcp_list_tools", "mcp_approval_request"]
        request = one.output[1]
        assert (request.name, request.server_label) == ("add", "calc")
        assert request.arguments == '{"a":20,"b":22}'
        assert len(mcp_http.seen("started", "add")) == before  # nothing called yet
        answer = {"type": "mcp_approval_response", "approval_request_id": request.id}
        two = client.responses.create(
            model="scripted",
            previous_response_id=one.id,
            tools=[asks],
            input=[{**answer, "approve": True}],  # type: ignore[list-item]
        )
        assert two.status == "completed", two
        # The listing is reused (no new mcp_list_tools); the approved call runs first.
        assert [i.type for i in two.output] == ["mcp_call", "message"]
        call = two.output[0]
        assert (call.approval_request_id, call.output, call.status) == (
            request.id,
            "42",
            "completed",
        )
        assert len(mcp_http.seen("started", "add")) == before + 1
        # Refused: nothing is called, the model is told.
        three = client.responses.create(
            model="scripted",
            previous_response_id=one.id,
            tools=[asks],
            input=[{**answer, "approve": False, "reason": "not today"}],  # type: ignore[list-item]
        )
        assert [i.type for i in three.output] == ["message"]
        assert len(mcp_http.seen("started", "add")) == before + 1
        trace = server.trace(three.id)
        assert "not today" in str(trace["messages"])
        # An answer to no request is refused.
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(
                model="scripted",
                tools=[asks],
                input=[{**answer, "approval_request_id": "mcpr_nope", "approve": True}],  # type: ignore[list-item]
            )
        assert err.value.param == "input"


# --- (c) what is refused --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"server_url": "http://example.com/mcp"}, "tools[0].server_url"),
        ({"server_url": "http://0.0.0.0:8000/mcp"}, "tools[0].server_url"),
        ({"server_url": "http://localhost.example.com/mcp"}, "tools[0].server_url"),
        ({"server_url": "http://127.0.0.1/mcp", "tunnel_id": "tunnel_x"}, "tools[0].tunnel_id"),
        ({"server_url": "http://127.0.0.1/mcp", "server_label": "a b"}, "tools[0].server_label"),
        ({"server_url": None, "connector_id": "connector_gmail"}, "tools[0].connector_id"),
        ({"server_url": "ftp://127.0.0.1/mcp"}, "tools[0].server_url"),
        ({"server_url": None}, "tools[0].server_url"),
    ],
)
def test_refused_servers(client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    mcp = {"type": "mcp", "server_label": "calc", **fields}
    mcp = {k: v for k, v in mcp.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="scripted", input="hi", tools=[mcp])  # type: ignore[list-item]
    assert err.value.param == param


def test_an_operator_may_allow_a_host(make_server: Any, mcp_http: McpServer) -> None:
    server: Server = make_server("--mcp-host", "example.com")
    with server.client() as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="scripted", input="hi", tools=[tool(mcp_http)])
        assert err.value.param == "tools[0].server_url"
        # Allowed. (A warm-up: nothing runs, so nothing reaches beyond loopback.)
        far = {**tool(mcp_http), "server_url": "http://example.com/mcp"}
        warm = client.responses.create(
            model="scripted",
            input="hi",
            tools=[far],  # type: ignore[list-item]
            prompt_cache_options={"prewarm": True},  # type: ignore[call-arg]
        )
        assert warm.status == "completed" and warm.output == []


# --- (b) cancel inside the loop ------------------------------------------------------------


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


# --- (e) a real engine path: a chat upstream ----------------------------------------------


def test_a_loop_through_a_chat_upstream(
    make_server: Any, mcp_http: McpServer, fake: FakeUpstream
) -> None:
    server: Server = make_server("--upstream", f"fake={fake.url}", engine="none")
    fake.call_arguments = ['{"a": 20,', ' "b": 22}']
    with server.client() as client:
        events = list(
            client.responses.create(
                model="fake", input="CALL=calc__add go", tools=[tool(mcp_http)], stream=True
            )
        )
    final = events[-1].response
    assert final.status == "completed", final
    assert [i.type for i in final.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert final.output[1].output == "42"
    first, second = fake.calls[0].body, fake.calls[-1].body
    assert [t["function"]["name"] for t in first["tools"]] == [
        "calc__add", "calc__slow", "calc__fail", "calc__big",
    ]  # fmt: skip
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": final.output[1].id,
        "content": "42",
    }
    assert all(t in types_of(events) for t in MCP_EVENTS)


def test_a_loop_on_the_embedded_model(make_server: Any, mcp_http: McpServer) -> None:
    server: Server = make_server(engine="local")
    with server.client() as client:
        model = client.models.list().data[0].id
        final = client.responses.create(
            model=model,
            input="Please add the numbers 2 and 3.",
            tools=[tool(mcp_http, allowed_tools=["add"])],
            max_output_tokens=60,
        )
    kinds = [i.type for i in final.output]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"], final
    listing, call = final.output[0], final.output[1]
    assert [t.name for t in listing.tools] == ["add"]  # allowed_tools
    args = json.loads(call.arguments)  # a grammar: always valid JSON of the schema
    assert call.status == "completed" and call.output == str(args["a"] + args["b"])
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


# --- the Agents SDK's HostedMCPTool ------------------------------------------------------


@pytest.mark.parametrize("approval", ["never", "always"])
def test_the_agents_sdk_hosted_mcp_tool(
    make_server: Any, mcp_http: McpServer, approval: str
) -> None:
    agents = pytest.importorskip("agents")
    import anyio

    agents.set_tracing_disabled(True)  # the SDK would export traces to OpenAI's servers
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "12")
    before = len(mcp_http.seen("started", "add"))
    asked: list[Any] = []

    def approve(request: Any) -> Any:
        asked.append(request.data)
        return {"approve": True}

    hosted = agents.HostedMCPTool(
        tool_config=tool(mcp_http, require_approval=approval),  # type: ignore[arg-type]
        on_approval_request=approve,
    )
    prompt = f"{call_directive('calc__add', {'a': 4, 'b': 5})} add"

    async def run() -> Any:
        async with server.async_client() as client:
            agent = agents.Agent(
                name="tester",
                instructions="You are a helpful assistant.",
                model=agents.OpenAIResponsesModel("scripted", client),
                tools=[hosted],
            )
            result = agents.Runner.run_streamed(agent, prompt, max_turns=4)
            async for _ in result.stream_events():
                pass
            return result

    result = anyio.run(run)
    kinds = [item.type for item in result.new_items]
    assert "mcp_list_tools_item" in kinds and kinds[-1] == "message_output_item", kinds
    assert isinstance(result.final_output, str) and result.final_output
    assert len(mcp_http.seen("started", "add")) == before + 1
    assert len(asked) == (1 if approval == "always" else 0)
    calls = [i for r in result.raw_responses for i in r.output if i.type == "mcp_call"]
    assert [c.output for c in calls] == ["9"]
