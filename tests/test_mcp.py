"""MCP tools (issue 17): the run lists a real MCP server's tools, the model calls them,
the run calls the server and generates again, in one response (the loop, its bounds and
errors, approvals, what is refused, every engine kind, the Agents SDK's HostedMCPTool;
cancels: test_mcp_cancel.py).

The MCP servers are real (`tests/mcp_server.py`, built with the `mcp` SDK) on loopback,
over streamable HTTP and SSE; tether is a real process, driven by the real `openai` SDK;
every event and response is checked against OpenAI's schema (`tests/spec.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from mcps import MCP_EVENTS, McpServer, mcp_server, tool, types_of
from upstreams import FakeUpstream, fake_upstream

from conftest import Server, raw_events
from test_codex import call_directive

TOKEN = "s3cret"


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
    before = len(mcp_http.seen(tool="slow"))
    with server.client() as client:
        final = client.responses.create(
            model="scripted", input=prompt, tools=[tool(mcp_http)], parallel_tool_calls=parallel
        )
    assert final.status == "completed", final
    calls = [i for i in final.output if i.type == "mcp_call"]
    assert [c.output for c in calls] == ["waited 0.5s"] * 3
    assert [i.type for i in final.output] == ["mcp_list_tools", *["mcp_call"] * 3, "message"]
    # As the server saw them: all three started before any finished, or one after another.
    order = [s["event"] for s in mcp_http.seen(tool="slow")[before:]]
    expected = ["started"] * 3 + ["finished"] * 3 if parallel else ["started", "finished"] * 3
    assert order == expected, order


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


def test_an_sse_server_at_any_path(make_server: Any) -> None:
    # Streamable HTTP is tried first; the SSE-only server refuses it; SSE works.
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "40")
    prompt = f"{call_directive('calc__add', {'a': 3, 'b': 4})} add"
    with mcp_server("sse-events") as mcp, server.client() as client:
        final = client.responses.create(model="scripted", input=prompt, tools=[tool(mcp)])
    assert [i.type for i in final.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert final.output[1].output == "7"


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


def test_a_three_step_loop_through_a_chat_upstream(
    make_server: Any, mcp_http: McpServer, fake: FakeUpstream
) -> None:
    server: Server = make_server("--upstream", f"fake={fake.url}", engine="none")
    fake.call_arguments = ['{"a": 20,', ' "b": 22}']
    before = len(fake.calls)
    with server.client() as client:
        events = list(
            client.responses.create(
                model="fake",
                input="CALLS=3 CALL=calc__add go",
                tools=[tool(mcp_http)],
                stream=True,
            )
        )
    final = events[-1].response
    assert final.status == "completed", final
    assert [i.type for i in final.output] == ["mcp_list_tools", *["mcp_call"] * 3, "message"]
    assert [i.output for i in final.output[1:4]] == ["42", "42", "42"]
    bodies = [c.body for c in fake.calls[before:]]
    assert len(bodies) == 4  # one generation a step, then the answer
    assert [sum(m["role"] == "tool" for m in b["messages"]) for b in bodies] == [0, 1, 2, 3]
    # Every step's tokens as the upstream reported them: a call is its opening chunk and
    # its two argument pieces (3), the answer "The result is 42" four words.
    assert final.usage.output_tokens == 3 * 3 + 4


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
