"""HTTP routes: parse, call the lifecycle, serialize. Nothing here decides a state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Message, Send

from tether import (
    bounds,
    compact,
    context,
    conversation_routes,
    metrics,
    playground,
    usage,
    wire,
    wire_items,
)
from tether.auth import principal
from tether.bodies import JSON, json_body
from tether.engines.base import Traced
from tether.errors import APIError, bad_request, model_not_found
from tether.lifecycle import Lifecycle
from tether.runspec import RunSpec
from tether.websocket import responses_socket


def lifecycle(request: Request) -> Lifecycle:
    lc: Lifecycle = request.app.state.lifecycle
    return lc


async def create_response(request: Request) -> Response:
    lc = lifecycle(request)
    body = await json_body(request, lc.settings.max_body_bytes)
    req = wire.parse_create(body, lc.settings.hosted_tools)
    who = principal(request)
    key = bounds.header_param(request.headers.get("idempotency-key"), "Idempotency-Key")
    record = await lc.create(req, who.tenant, key, key_id=who.key_id)
    if req.stream:
        return _event_stream(lc, who.tenant, record.id, -1, cancel_on_disconnect=not req.background)
    if req.background:
        return JSON(await lc.retrieve(record.id, who.tenant))
    return JSON(await _until_done_or_disconnect(request, lc, record.id))


async def compact_response(request: Request) -> Response:
    """`POST /v1/responses/compact`: the conversation (a previous response's, then
    `input`) as one compaction item a later create can take as input (`tether.compact`)."""
    lc = lifecycle(request)
    req = wire.parse_compact(await json_body(request, lc.settings.max_body_bytes))
    if req.model not in lc.models:
        raise model_not_found(req.model)
    tenant = principal(request).tenant
    turns = await lc.conversation(req.previous_response_id, tenant)
    turns += wire.history(
        await wire_items.resolve_references(
            wire.input_items(req), req.previous_response_id, lambda rid: lc.store.get(rid, tenant)
        )
    )
    tokens = compact.estimate_tokens(turns)
    return JSON(compact.resource(turns, wire.usage(tokens, 0)))


async def count_input_tokens(request: Request) -> Response:
    """`POST /v1/responses/input_tokens`: the prompt a create with this body would give
    the engine, counted with the engine's own tokenizer (`tether.context`); an engine
    that cannot count gets tether's estimate (`compact.estimate_tokens`)."""
    lc = lifecycle(request)
    body = await json_body(request, lc.settings.max_body_bytes)
    if isinstance(body, dict):
        body = {"input": [], **body}
    req = wire.parse_create(body)
    if req.model not in lc.models:
        raise model_not_found(req.model)
    turns, _ = await lc.turns(req, principal(request).tenant)
    # The prompt as a run would give it (tools flattened, the instructions leading).
    spec = RunSpec.of(req, turns, wire.echo_fields(req))
    gen = spec.generation("resp_count", req.model, False)
    tokens = await context.count(lc.engine, gen)
    if tokens is None:
        tokens = compact.estimate_tokens(gen.messages)
    return JSON({"object": "response.input_tokens", "input_tokens": tokens})


async def get_response(request: Request) -> Response:
    lc = lifecycle(request)
    rid = request.path_params["response_id"]
    tenant = principal(request).tenant
    params = request.query_params
    stream = bounds.bool_param(params.get("stream"), "stream")
    bounds.bool_param(params.get("include_obfuscation"), "include_obfuscation", True)
    after = bounds.int_param(params.get("starting_after"), "starting_after", -1)
    if not stream:
        return JSON(await lc.retrieve(rid, tenant))
    record = await lc.get(rid, tenant)
    await lc.check_streamable(record)
    return _event_stream(lc, tenant, rid, after, cancel_on_disconnect=False)


async def cancel_response(request: Request) -> Response:
    lc = lifecycle(request)
    return JSON(await lc.cancel(request.path_params["response_id"], principal(request).tenant))


async def delete_response(request: Request) -> Response:
    lc = lifecycle(request)
    rid = request.path_params["response_id"]
    await lc.delete(rid, principal(request).tenant)
    return JSON({"id": rid, "object": "response", "deleted": True})


async def list_input_items(request: Request) -> Response:
    lc = lifecycle(request)
    record = await lc.get(request.path_params["response_id"], principal(request).tenant)
    params = request.query_params
    limit = bounds.int_param(params.get("limit"), "limit", 20, 1, 100)
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("Invalid 'order': expected 'asc' or 'desc'.", "order")
    items = record.input_items if order == "asc" else record.input_items[::-1]
    after = params.get("after")
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise bad_request(f"Invalid 'after': no input item '{after}'.", "after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return JSON(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


async def list_models(request: Request) -> Response:
    engine = lifecycle(request).engine
    return JSON(
        {"object": "list", "data": [_model(m.id, m.created, m.owned_by) for m in engine.models()]}
    )


async def get_model(request: Request) -> Response:
    model_id = request.path_params["model_id"]
    for m in lifecycle(request).engine.models():
        if m.id == model_id:
            return JSON(_model(m.id, m.created, m.owned_by))
    raise model_not_found(model_id)


async def get_usage(request: Request) -> Response:
    """tether extension: the caller's usage ledger (README, Usage ledger)."""
    lc = lifecycle(request)
    tenant = principal(request).tenant
    params = request.query_params
    key_id = params.get("key_id")
    if key_id is not None and request.app.state.keyring.tenant_of(key_id) != tenant:
        # Another tenant's key is as unknown as a key that does not exist (docs/contract.md §7).
        raise APIError(404, f"No API key with id '{key_id}'.", param="key_id", code="not_found")
    rows = await lc.store.usage(tenant)
    return JSON(usage.report(tenant, rows, key_id, params.get("model"), params.get("status")))


async def health(request: Request) -> Response:
    return JSON({"status": "ok"})


async def engine_trace(request: Request) -> Response:
    """Debug only: what the scripted engine did for a response (tests, benchmarks)."""
    engine = lifecycle(request).engine
    traces = engine.traces if isinstance(engine, Traced) else {}
    trace = traces.get(request.path_params["response_id"])
    if trace is None:
        raise APIError(404, "No engine trace for that response.", code="not_found")
    return JSON(trace.as_dict())


async def process_stats(request: Request) -> Response:
    """Debug only: open file descriptors, asyncio tasks and live runs (leak checks)."""
    import os

    return JSON(
        {
            "open_fds": len(os.listdir("/proc/self/fd")),
            "tasks": len(asyncio.all_tasks()),
            "runs": len(lifecycle(request).runs),
        }
    )


def _model(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


# --- helpers -------------------------------------------------------------------------------


class _EventStream(EventSourceResponse):
    """sse-starlette's response, without a cancel scope per write when no send timeout is
    set (tether sets none): `move_on_after(None)` can never fire, and entering and leaving
    it was a measurable part of a stream's CPU (one write per batch of log entries)."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def _event_stream(
    lc: Lifecycle, tenant: str, rid: str, after: int, *, cancel_on_disconnect: bool
) -> EventSourceResponse:
    keepalive = lc.settings.keepalive
    return _EventStream(
        _frames(lc, tenant, rid, after, cancel_on_disconnect),
        ping=keepalive,
        sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment="keepalive", sep="\n"),
    )


async def _frames(
    lc: Lifecycle, tenant: str, rid: str, after: int, cancel_on_disconnect: bool
) -> AsyncIterator[bytes]:
    """docs/contract.md §2.4: a stream is a reader of the log, nothing more."""
    frames = wire.sse_frames
    ended = False
    try:
        async for entries in lc.follow(rid, tenant, after):
            yield frames(entries)
        ended = True
        yield wire.DONE_FRAME
    finally:
        if not ended and cancel_on_disconnect:
            lc.spawn(lc.cancel_quietly, rid, tenant)  # docs/contract.md §4.7


async def _until_done_or_disconnect(request: Request, lc: Lifecycle, rid: str) -> Any:
    """Wait for a synchronous response; a client that hangs up cancels it
    (docs/contract.md §4.7). The wait and a watch for the hang-up race in one task group:
    whichever ends first cancels the group's scope, so the other stops."""
    tenant = principal(request).tenant
    snapshot: dict[str, Any] | None = None
    failure: Exception | None = None
    async with anyio.create_task_group() as race:
        race.start_soon(_cancel_on_disconnect, request, race.cancel_scope)
        try:
            snapshot = await lc.wait_done(rid, tenant)
        except Exception as exc:
            # Raised after the group: raised inside, it would reach the route's error
            # handlers wrapped in an ExceptionGroup.
            failure = exc
        race.cancel_scope.cancel()  # done (or failed): stop watching
    if failure is not None:
        raise failure
    if snapshot is None:  # the client hung up first: the wait was cancelled
        await lc.cancel_quietly(rid, tenant)
    return snapshot


async def _cancel_on_disconnect(request: Request, scope: anyio.CancelScope) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


routes: list[BaseRoute] = [
    Route("/v1/responses", create_response, methods=["POST"]),
    WebSocketRoute("/v1/responses", responses_socket),  # WebSocket mode
    # Before the `{response_id}` routes, so that `compact` is never taken for an id.
    Route("/v1/responses/compact", compact_response, methods=["POST"]),
    Route("/v1/responses/input_tokens", count_input_tokens, methods=["POST"]),
    Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
    Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
    *conversation_routes.routes,  # the Conversations API (issue 18)
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/usage", get_usage, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics.endpoint, methods=["GET"]),  # this process's own
    *playground.routes,  # the page at / (issue 7): API server only, not workers
]
worker_routes: list[BaseRoute] = [
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics.endpoint, methods=["GET"]),
]
debug_routes: list[BaseRoute] = [
    Route("/debug/engine/{response_id}", engine_trace, methods=["GET"]),
    Route("/debug/process", process_stats, methods=["GET"]),
]
