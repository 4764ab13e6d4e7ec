"""The OpenAI Agents SDK (openai-agents, pinned), unchanged, against a real `tether serve`
(issue 13's acceptance): a function tool's two-step loop with `Runner.run_streamed` on the
scripted engine, the embedded model and a chat upstream; `output_type=` on the embedded
model; `result.cancel()` mid-stream.

The SDK talks to tether through the validating `AsyncOpenAI` of conftest (every reply
checked against the specs); the tests then read the stored responses and the engine's
trace through tether's API.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from upstreams import FakeUpstream, fake_upstream

from conftest import Server, raw_events

if importlib.util.find_spec("agents") is None:
    _REASON = "openai-agents 0.24.0 is not installed (scripts/install installs it)"
    if os.environ.get("CI") == "true":
        raise ImportError(_REASON)  # a collection error: CI fails instead of skipping
    pytest.skip(_REASON, allow_module_level=True)

from agents import (  # only once the SDK is known to be there
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    RawResponsesStreamEvent,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from test_codex import call_directive

set_tracing_disabled(True)  # the SDK would export traces to OpenAI's servers

pytestmark = pytest.mark.anyio
WEATHER = "Sunny in {city}, 21 C"


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


class Calls:
    """The function tool `get_weather` and what the SDK called it with."""

    def __init__(self) -> None:
        self.cities: list[str] = []
        calls = self

        @function_tool
        def get_weather(city: str) -> str:
            """The current weather in a city."""
            calls.cities.append(city)
            return WEATHER.format(city=city)

        self.tool = get_weather


@pytest.fixture
async def openai_client(request: Any) -> AsyncIterator[Any]:
    made: list[Any] = []

    def make(server: Server) -> Any:
        made.append(server.async_client())
        return made[-1]

    yield make
    for client in made:
        await client.close()


def agent(client: Any, model: str, **kwargs: Any) -> Agent[Any]:
    return Agent(
        name="tester",
        instructions="You are a helpful assistant.",
        model=OpenAIResponsesModel(model, client),
        **kwargs,
    )


async def run_streamed(agent_: Agent[Any], prompt: str) -> tuple[Any, list[Any]]:
    """Run to the end, streaming: (the result, its raw Responses events)."""
    result = Runner.run_streamed(agent_, prompt, max_turns=4)
    raw = [e.data async for e in result.stream_events() if isinstance(e, RawResponsesStreamEvent)]
    return result, raw


async def check_tool_loop(server: Server, result: Any, calls: Calls) -> list[Any]:
    """Two model steps: a function call (the SDK ran it once), then a message that
    answers its output; both stored completed, the output among the second's input."""
    assert calls.cities and len(calls.cities) == 1, calls.cities
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"], kinds
    assert isinstance(result.final_output, str) and result.final_output
    ids = [r.response_id for r in result.raw_responses]
    assert len(ids) == 2 and all(ids)
    async with server.async_client() as client:
        first, second = [await client.responses.retrieve(i) for i in ids]
        assert first.status == second.status == "completed"
        [call] = [i for i in first.output if i.type == "function_call"]
        assert call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": calls.cities[0]}
        inputs = [i async for i in client.responses.input_items.list(second.id, order="asc")]
    [output] = [i for i in inputs if i.type == "function_call_output"]
    assert output.call_id == call.call_id
    assert output.output == WEATHER.format(city=calls.cities[0])
    assert second.output[-1].type == "message"
    return [first, second]


def check_exact_usage(server: Server, response: Any) -> None:
    """The usage counts exactly the tokens the engine produced (its trace)."""
    trace = server.trace(response.id)
    assert response.usage.output_tokens == trace["produced"]


# --- a two-step tool loop on every engine -----------------------------------------------------


async def test_tool_loop_on_the_scripted_engine(make_server: Any, openai_client: Any) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "12")
    calls = Calls()
    runner = agent(openai_client(server), "scripted", tools=[calls.tool])
    result, raw = await run_streamed(
        runner, f"{call_directive('get_weather', {'city': 'Paris'})} What is the weather?"
    )
    assert calls.cities == ["Paris"]
    for response in await check_tool_loop(server, result, calls):
        check_exact_usage(server, response)
    assert [e.type for e in raw].count("response.function_call_arguments.done") == 1
    [done] = [e for e in raw if e.type == "response.function_call_arguments.done"]
    assert done.name == "get_weather"


@pytest.mark.parametrize("choice", [None, "get_weather"])
async def test_tool_loop_on_the_embedded_model(
    make_server: Any, openai_client: Any, choice: str | None
) -> None:
    server: Server = make_server(engine="local")
    client = openai_client(server)
    model = (await client.models.list()).data[0].id
    calls = Calls()
    # The SDK's default (`auto`: the model chooses to call), or the tool named; either
    # way the call is valid JSON of the schema (a grammar). After the call the SDK resets
    # `tool_choice`, so the second step answers in text.
    runner = agent(
        client, model, tools=[calls.tool], model_settings=ModelSettings(tool_choice=choice)
    )
    result, _ = await run_streamed(runner, "What is the weather in Paris?")
    for response in await check_tool_loop(server, result, calls):
        check_exact_usage(server, response)


async def test_tool_loop_through_a_chat_upstream(
    make_server: Any, fake: FakeUpstream, openai_client: Any
) -> None:
    server: Server = make_server("--upstream", f"fake={fake.url}", engine="none")
    calls = Calls()
    runner = agent(openai_client(server), "fake", tools=[calls.tool])
    result, _ = await run_streamed(runner, "CALL=get_weather What is the weather?")
    assert calls.cities == ["Paris"]
    await check_tool_loop(server, result, calls)
    assert result.final_output == "The result is " + WEATHER.format(city="Paris")
    first, second = (c.body for c in fake.calls)
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather"]
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_fake1",
        "content": WEATHER.format(city="Paris"),
    }


# --- structured output ------------------------------------------------------------------------


class City(BaseModel):
    name: str
    country: str


async def test_output_type_on_the_embedded_model(make_server: Any, openai_client: Any) -> None:
    server: Server = make_server(engine="local")
    client = openai_client(server)
    model = (await client.models.list()).data[0].id
    result = await Runner.run(
        agent(client, model, output_type=City), "Name a city in France.", max_turns=1
    )
    assert isinstance(result.final_output, City)
    [raw] = result.raw_responses
    async with server.async_client() as check:
        stored = await check.responses.retrieve(raw.response_id)
    assert stored.status == "completed"
    assert stored.text.format.type == "json_schema"
    assert City.model_validate_json(stored.output_text) == result.final_output
    check_exact_usage(server, stored)


# --- result.cancel() mid-stream ---------------------------------------------------------------


async def test_cancel_mid_stream_ends_the_response_cancelled(
    make_server: Any, openai_client: Any
) -> None:
    server: Server = make_server("--scripted-rate", "20", "--scripted-length", "2000")
    result = Runner.run_streamed(agent(openai_client(server), "scripted"), "Tell a story.")
    rid, deltas = "", 0
    async for event in result.stream_events():
        if not isinstance(event, RawResponsesStreamEvent):
            continue
        if event.data.type == "response.created":
            rid = event.data.response.id
        deltas += event.data.type == "response.output_text.delta"
        if deltas == 5:
            result.cancel()  # closes the stream; tether's cancel-on-disconnect stops the run
    assert rid and deltas >= 5
    response = await settled(server, rid)
    assert response.status == "cancelled"
    check_exact_usage(server, response)
    events = raw_events(server, rid)
    assert events[-1]["type"] == "response.failed"
    logged = sum(e["type"] == "response.output_text.delta" for e in events)
    assert response.usage.output_tokens == logged
    trace = server.trace(rid)
    assert trace["aborted_at"] is not None and not trace["finished"]


async def settled(server: Server, rid: str, timeout: float = 30.0) -> Any:
    """The response once terminal (the server has no push API for a status)."""
    deadline = time.monotonic() + timeout
    async with server.async_client() as client:
        while (response := await client.responses.retrieve(rid)).status in (
            "queued",
            "in_progress",
        ):
            assert time.monotonic() < deadline, f"{rid} is still {response.status}"
            await anyio.sleep(0.02)  # poll interval of a wait with a deadline
    return response


# --- a conversation session (issue 18) --------------------------------------------------------


async def test_openai_conversations_session_runs_two_turns(
    make_server: Any, openai_client: Any
) -> None:
    # The SDK's own session on tether's Conversations API: each run reads the
    # conversation's items as its history and adds its new items to it.
    from agents.memory import OpenAIConversationsSession

    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "6")
    client = openai_client(server)
    session = OpenAIConversationsSession(openai_client=client)
    runner = agent(client, "scripted")
    first = await Runner.run(runner, "My name is Ada.", session=session)
    second = await Runner.run(runner, "What is my name?", session=session)
    assert isinstance(first.final_output, str) and first.final_output
    prompt = [m["text"] for m in server.trace(second.raw_responses[0].response_id)["messages"]]
    assert prompt[-3:] == ["My name is Ada.", first.final_output, "What is my name?"]
    items = await session.get_items()
    texts = [
        "".join(p.get("text", "") for p in i["content"]) for i in items if i["type"] == "message"
    ]
    assert texts == ["My name is Ada.", first.final_output, "What is my name?", second.final_output]
    conversation = await client.conversations.retrieve(session.session_id)
    assert conversation.id == session.session_id
    await session.clear_session()


async def test_server_managed_conversation_runs_two_turns(
    make_server: Any, openai_client: Any
) -> None:
    # `conversation_id=`: the SDK sends `conversation` on each create and sends only the
    # new input; tether keeps the thread.
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "6")
    client = openai_client(server)
    cid = (await client.conversations.create()).id
    runner = agent(client, "scripted")
    first = await Runner.run(runner, "My name is Ada.", conversation_id=cid)
    second = await Runner.run(runner, "What is my name?", conversation_id=cid)
    rid = second.raw_responses[0].response_id
    prompt = [m["text"] for m in server.trace(rid)["messages"]]
    assert prompt[-3:] == ["My name is Ada.", first.final_output, "What is my name?"]
    assert (await client.responses.retrieve(rid)).conversation.id == cid
    items = [i async for i in client.conversations.items.list(cid, order="asc")]
    assert [i.type for i in items] == ["message"] * 4


async def test_tool_loop_in_a_server_managed_conversation(
    make_server: Any, openai_client: Any
) -> None:
    # The tool loop's steps are turns of the conversation: the call, its output, the answer.
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "6")
    client = openai_client(server)
    cid = (await client.conversations.create()).id
    calls = Calls()
    runner = agent(client, "scripted", tools=[calls.tool])
    prompt = f"{call_directive('get_weather', {'city': 'Paris'})} What is the weather?"
    result = await Runner.run(runner, prompt, conversation_id=cid, max_turns=4)
    assert calls.cities == ["Paris"] and isinstance(result.final_output, str)
    items = [i async for i in client.conversations.items.list(cid, order="asc")]
    kinds = [i.type for i in items]
    assert kinds == ["message", "function_call", "function_call_output", "message"], kinds
    assert items[2].output == WEATHER.format(city="Paris")  # type: ignore[union-attr]
