"""The server-side tool loop of a response with MCP tools: many engine steps, one run.

`run()` lists each server's tools (an `mcp_list_tools` item; one the conversation already
holds is reused, as OpenAI does), gives them to the engine as functions (`LABEL__TOOL`),
and generates. When a step ends with calls of those tools (`mcp_call` items, streamed as
the engine made them), it calls the servers, appends the results to the conversation and
generates again, until the engine answers without calling one, `max_tool_calls` calls
were made, or a call needs an approval (`mcp_approval_request`: the response ends; the
next request's `mcp_approval_response` runs the call first thing, `approved`).

All of it runs in the run's cancel scope (`run.drive`): a cancel lands in the engine (at
its next token step), in a call (the SDK sends the server `notifications/cancelled`, and
leaving the connections closes them) or between steps, and `run()` ends at once; the open
`mcp_call` closes `incomplete` in the run's ending like any open item. Every event goes
to the log as it comes, so a resumed stream replays every step.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from tether import mcp_tools
from tether.engines.base import Engine, Generation, Message, ToolCallSpec
from tether.errors import bad_request
from tether.mcp_tools import McpFailure
from tether.run import Progress, Steps
from tether.runspec import RunSpec
from tether.store.base import Record
from tether.wire_input import CreateRequest
from tether.wire_mcp import ListToolsItem, McpCallItem
from tether.wire_tools import flat_name

if TYPE_CHECKING:
    from tether.config import Settings


@dataclass(slots=True)
class ToolLoop:
    """What a run with MCP tools needs besides its generation request."""

    servers: list[dict[str, Any]]  # `mcp_tools.server`
    timeout: float  # seconds a connection, a listing or a call may take
    max_output: int  # characters of a call's output (more: an error)
    max_calls: int | None = None  # `max_tool_calls`
    parallel: bool = True  # `parallel_tool_calls`: a step's calls run at once
    #: server label -> its tools, from an `mcp_list_tools` item earlier in the conversation
    listed: dict[str, list[dict[str, Any]]] | None = None
    #: approved calls to make first (`mcp_approval_response`s of this request)
    approved: list[dict[str, Any]] | None = None


def steps(spec: RunSpec, settings: Settings) -> Steps | None:
    """The tool loop of a run of `spec`; None: it has no MCP tools (one engine step)."""
    if not spec.mcp and not spec.approved:
        return None
    loop = ToolLoop(
        spec.mcp,
        settings.mcp_timeout,
        settings.mcp_max_output,
        spec.forward.get("max_tool_calls"),
        spec.forward.get("parallel_tool_calls") is not False,
        spec.listed,
        spec.approved,
    )
    return partial(run, loop=loop)


async def chained(
    spec: RunSpec,
    items: list[dict[str, Any]],
    req: CreateRequest,
    hosts: list[str],
    get: Callable[[str], Awaitable[Record | None]],
) -> RunSpec:
    """`spec` of a create (`req`, its input `items`) with what the conversation says
    about its MCP servers: listings to reuse (the previous response's, or sent back as
    input) and this request's answers to approval requests (`mcp_approval_response`),
    each with the call it approves. Refused (400): a server whose host the operator did
    not allow (`hosts`), an answer to a request the conversation does not hold."""
    mcp_tools.check_hosts(spec.mcp, hosts)
    previous_id = req.previous_response_id
    answers = [i for i in items if i.get("type") == "mcp_approval_response"]
    if not spec.mcp and not answers:
        return spec
    prev = await get(previous_id) if previous_id is not None else None
    listed: dict[str, list[dict[str, Any]]] = {}
    pool = list(items)
    if prev is not None:
        listed.update(RunSpec.decode(prev.run).listed)
        pool = [*prev.snapshot.get("output", []), *items]
    requests = {}
    for item in pool:
        if item.get("type") == "mcp_list_tools" and not item.get("error"):
            listed[item["server_label"]] = item["tools"]
        elif item.get("type") == "mcp_approval_request":
            requests[item["id"]] = item
    approved = []
    for answer in answers:
        request = requests.get(answer["approval_request_id"])
        if request is None:
            raise bad_request(
                f"No approval request '{answer['approval_request_id']}' in this "
                "conversation: an mcp_approval_response answers one of the previous "
                "response's (or the input's) mcp_approval_request items.",
                "input",
                "invalid_value",
            )
        approved.append(
            {
                "approval_request_id": request["id"],
                "approve": answer["approve"],
                "reason": answer.get("reason"),
                "server_label": request["server_label"],
                "name": request["name"],
                "arguments": request["arguments"],
            }
        )
    labels = {s["label"] for s in spec.mcp}
    listed = {label: tools for label, tools in listed.items() if label in labels}
    return replace(spec, listed=listed, approved=approved)


async def run(engine: Engine, request: Generation, progress: Progress, loop: ToolLoop) -> None:
    """Generate `request` with the tools of `loop.servers` (see the module docstring)."""
    if progress.tool_names is None:
        progress.tool_names = {}
    async with AsyncExitStack() as connections:
        clients: dict[str, Any] = {}
        for server in loop.servers:
            client = await _listed(connections, server, request, progress, loop)
            if client is not None:
                clients[server["label"]] = client
        request.tool_choice = _choice(request.tool_choice, progress)
        made = await _approved(clients, request, progress, loop)
        while True:
            await engine.generate(request, progress.take)
            calls = sorted(progress.calls.items())
            mine = [(i, c) for i, c in calls if isinstance(c, McpCallItem)]
            if progress.reason != "stop" or not mine:
                return
            # The response is not over: a cancel from here on must end it `cancelled`.
            progress.reason = None
            text = "".join(progress.message.text) if progress.opened else ""
            await progress.close_text()
            turn = Message("assistant", text)
            turns = [turn]
            budget = len(mine) if loop.max_calls is None else max(0, loop.max_calls - made)
            outputs = await _call_all(clients, mine[:budget], progress, loop)
            made += min(budget, len(mine))
            for index, call in mine[budget:]:  # (after the others: items close in order)
                call.error = {
                    "type": "mcp_protocol_error",
                    "code": -32600,
                    "message": f"Not called: this response reached max_tool_calls "
                    f"({loop.max_calls}).",
                }
                await _finish(progress, index, call)
            for (_, call), output in zip(mine, outputs + [None] * len(mine), strict=False):
                flat = flat_name(call.server_label, call.name)
                turn.tool_calls.append(ToolCallSpec(call.id, flat, "".join(call.arguments)))
                shown = output if output is not None else mcp_tools.error_text(call.error or {})
                turns.append(Message("tool", shown, call_id=call.id))
            if len(mine) != len(calls):
                # The client's own function calls, or approvals: the response ends here
                # (with the MCP calls made) and the client answers them.
                progress.reason = "stop"
                return
            request.messages = [*request.messages, *turns]
            if _forced(request.tool_choice):
                request.tool_choice = "auto"  # it was honoured: a forced choice would loop
            if loop.max_calls is not None and made >= loop.max_calls:
                _withdraw(request, progress)
            progress.next_step()


async def _listed(
    connections: AsyncExitStack,
    server: dict[str, Any],
    request: Generation,
    progress: Progress,
    loop: ToolLoop,
) -> Any:
    """Connect to `server` and list its tools (an `mcp_list_tools` item, unless the
    conversation has one); its tools the model may see are offered to the engine. None:
    the server could not be reached (the item says why)."""
    label = server["label"]
    reused = (loop.listed or {}).get(label)
    item: ListToolsItem | None = None
    if reused is None:
        item = ListToolsItem(progress.next_index(), label)
        progress.extra.append(item)
        await progress.put(item.opened())
    await _load_sdk()
    from tether import mcp_client  # (loaded: at once)

    try:
        client = await connections.enter_async_context(
            mcp_client.connect(server, loop.timeout, loop.max_output)
        )
        tools = reused
        if tools is None:
            tools = await mcp_client.list_tools(client, label, loop.timeout)
    except McpFailure as exc:
        if item is None:
            return None  # a listing reused, a server gone: its calls will fail
        await progress.put(item.failed(str(exc)))
        _closed(progress, item)
        return None
    tools = [t for t in tools if mcp_tools.visible(server, t["name"], t.get("annotations"))]
    if item is not None:
        await progress.put(item.listed(tools))
        _closed(progress, item)
    names = progress.tool_names
    assert names is not None
    for tool in tools:
        flat = flat_name(label, tool["name"])
        approval = mcp_tools.needs_approval(server, tool["name"], tool.get("annotations"))
        names[flat] = {"name": tool["name"], "mcp": label, "approval": approval}
        request.tools.append(
            {
                "type": "function",
                "name": flat,
                "description": tool.get("description"),
                "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
                "strict": False,
            }
        )
    return client


async def _load_sdk() -> None:
    """Import `tether.mcp_client` at the first MCP tool this process meets: the `mcp` SDK
    takes a second of CPU to import, which every start of every server would pay, most of
    them for nothing. Imported in a thread, so the event loop's streams go on meanwhile;
    a cancel lands at once (the import finishes in the background)."""
    name = "tether.mcp_client"
    if name not in sys.modules:
        await anyio.to_thread.run_sync(importlib.import_module, name, abandon_on_cancel=True)


def _closed(progress: Progress, item: ListToolsItem) -> None:
    progress.extra.remove(item)
    progress.close(item)


async def _approved(
    clients: dict[str, Any], request: Generation, progress: Progress, loop: ToolLoop
) -> int:
    """Make the calls this request approved (each an `mcp_call` with its
    `approval_request_id`) and give their results to the engine; a refused one is
    told to the model as refused. The number of calls made."""
    answers = loop.approved or []
    if not answers:
        return 0
    turn = Message("assistant", "")
    turns = [turn]
    made = 0
    for answer in answers:
        flat = flat_name(answer["server_label"], answer["name"])
        call_id = answer["approval_request_id"]
        turn.tool_calls.append(ToolCallSpec(call_id, flat, answer["arguments"]))
        if not answer["approve"]:
            why = answer.get("reason") or "no reason given"
            turns.append(Message("tool", f"The user refused this call ({why}).", call_id=call_id))
            continue
        call = McpCallItem(
            progress.next_index(), call_id, answer["name"], answer["server_label"],
            approval_request_id=call_id,
        )  # fmt: skip
        progress.calls[-1 - made] = call  # open (an ending closes it), under no engine index
        events = call.opened()
        delta = call.delta(answer["arguments"])
        if delta is not None:
            events.append(delta)
        await progress.put(events)
        output = await _call(clients, call, progress, loop)
        await _finish(progress, -1 - made, call)
        made += 1
        shown = output if output is not None else mcp_tools.error_text(call.error or {})
        turns.append(Message("tool", shown, call_id=call_id))
    request.messages = [*request.messages, *turns]
    return made


async def _call_all(
    clients: dict[str, Any],
    calls: list[tuple[int, McpCallItem]],
    progress: Progress,
    loop: ToolLoop,
) -> list[str | None]:
    """Make a step's calls (at once, with `parallel_tool_calls`): their outputs, None
    for one that failed (its `error` is set). The items close in output order (a
    response's output is in that order, also when a cancel ends it mid-step: a call
    that ended after an earlier one still in flight is then `incomplete` too)."""
    outputs: list[str | None] = [None] * len(calls)
    if not (loop.parallel and len(calls) > 1):
        for k, (index, call) in enumerate(calls):
            outputs[k] = await _call(clients, call, progress, loop)
            await _finish(progress, index, call)
        return outputs
    ended = [anyio.Event() for _ in calls]

    async def one(k: int) -> None:
        outputs[k] = await _call(clients, calls[k][1], progress, loop)
        ended[k].set()

    async with anyio.create_task_group() as group:
        for k in range(len(calls)):
            group.start_soon(one, k)
        for k, (index, call) in enumerate(calls):
            await ended[k].wait()
            await _finish(progress, index, call)
    return outputs


async def _call(
    clients: dict[str, Any], call: McpCallItem, progress: Progress, loop: ToolLoop
) -> str | None:
    """Call the server (a cancel of the run lands here and goes on up)."""
    await _load_sdk()
    from tether import mcp_client  # (loaded: at once)

    await progress.put(call.calling())
    client = clients.get(call.server_label)
    try:
        if client is None:
            raise McpFailure(
                {"type": "http_error", "code": 502,
                 "message": f"The MCP server {call.server_label} could not be reached."}
            )  # fmt: skip
        output = await mcp_client.call_tool(
            client, call.name, "".join(call.arguments), loop.timeout, loop.max_output
        )
    except McpFailure as exc:
        call.error = exc.error
        return None
    call.output = output
    return output


async def _finish(progress: Progress, index: int, call: McpCallItem) -> None:
    if not call.args_done:
        await progress.put(call.calling())
    await progress.put(call.finished())
    progress.calls.pop(index, None)
    progress.close(call, "failed" if call.error is not None else "completed")


def _choice(choice: Any, progress: Progress) -> Any:
    """A `tool_choice` of an MCP server (`{"type": "mcp", "server_label", "name"?}`) as
    engines take it, now that its tools are known: that tool, or any of the server's."""
    if not (isinstance(choice, dict) and choice.get("type") == "mcp"):
        return choice
    label = choice["server_label"]
    flats = [f for f, shown in (progress.tool_names or {}).items() if shown.get("mcp") == label]
    named = flat_name(label, choice["name"]) if choice.get("name") else None
    if named in flats:
        return {"type": "function", "name": named}
    if not flats:
        return "auto"  # the server could not be listed (its item says why)
    tools = [{"type": "function", "name": f} for f in flats]
    return {"type": "allowed_tools", "tools": tools, "mode": "required"}


def _forced(choice: Any) -> bool:
    if choice == "required":
        return True
    if isinstance(choice, dict):
        return choice.get("type") == "function" or choice.get("mode") == "required"
    return False


def _withdraw(request: Generation, progress: Progress) -> None:
    """`max_tool_calls` reached: the engine is offered no MCP tool any more."""
    names = progress.tool_names or {}
    request.tools = [t for t in request.tools if "mcp" not in names.get(t.get("name", ""), {})]
    choice = request.tool_choice
    if isinstance(choice, dict) or choice == "required":
        request.tool_choice = "auto"
