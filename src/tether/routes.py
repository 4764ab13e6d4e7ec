"""HTTP routes: parse, call the lifecycle, serialize. Nothing here decides a state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tether import wire
from tether.errors import APIError, bad_request
from tether.lifecycle import Lifecycle

TENANT = "default"


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def lifecycle(request: Request) -> Lifecycle:
    lc: Lifecycle = request.app.state.lifecycle
    return lc


async def create_response(request: Request) -> Response:
    lc = lifecycle(request)
    body = await _json_body(request, lc.settings.max_body_bytes)
    req = wire.parse_create(body)
    record = await lc.create(req, TENANT, request.headers.get("idempotency-key"))
    if req.stream:
        return _event_stream(lc, record.id, -1, cancel_on_disconnect=not req.background)
    if req.background:
        return JSON(await lc.retrieve(record.id, TENANT))
    return JSON(await _until_done_or_disconnect(request, lc, record.id))


async def get_response(request: Request) -> Response:
    lc = lifecycle(request)
    rid = request.path_params["response_id"]
    stream = request.query_params.get("stream", "false").lower() == "true"
    after = _starting_after(request.query_params.get("starting_after"))
    if not stream:
        return JSON(await lc.retrieve(rid, TENANT))
    record = await lc.get(rid, TENANT)
    await lc.check_streamable(record)
    return _event_stream(lc, rid, after, cancel_on_disconnect=False)


async def cancel_response(request: Request) -> Response:
    lc = lifecycle(request)
    return JSON(await lc.cancel(request.path_params["response_id"], TENANT))


async def delete_response(request: Request) -> Response:
    lc = lifecycle(request)
    rid = request.path_params["response_id"]
    await lc.delete(rid, TENANT)
    return JSON({"id": rid, "object": "response", "deleted": True})


async def list_input_items(request: Request) -> Response:
    lc = lifecycle(request)
    record = await lc.get(request.path_params["response_id"], TENANT)
    params = request.query_params
    limit = _int_param(params.get("limit"), "limit", 20)
    if not 1 <= limit <= 100:
        raise bad_request("Invalid 'limit': expected a value between 1 and 100.", "limit")
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
    return JSON({"object": "list", "data": page,
                 "first_id": page[0]["id"] if page else None,
                 "last_id": page[-1]["id"] if page else None,
                 "has_more": len(items) > limit})


async def list_models(request: Request) -> Response:
    engine = lifecycle(request).engine
    return JSON({"object": "list", "data": [_model(m.id, m.created, m.owned_by)
                                            for m in engine.models()]})


async def get_model(request: Request) -> Response:
    model_id = request.path_params["model_id"]
    for m in lifecycle(request).engine.models():
        if m.id == model_id:
            return JSON(_model(m.id, m.created, m.owned_by))
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model",
                   code="model_not_found")


async def health(request: Request) -> Response:
    return JSON({"status": "ok"})


async def engine_trace(request: Request) -> Response:
    """Debug only: what the scripted engine did for a response (tests, benchmarks)."""
    traces = getattr(lifecycle(request).engine, "traces", {})
    trace = traces.get(request.path_params["response_id"])
    if trace is None:
        raise APIError(404, "No engine trace for that response.", code="not_found")
    return JSON(trace.as_dict())


async def process_stats(request: Request) -> Response:
    """Debug only: open file descriptors, asyncio tasks and live runs (leak checks)."""
    import os

    return JSON({"open_fds": len(os.listdir("/proc/self/fd")),
                 "tasks": len(asyncio.all_tasks()),
                 "runs": len(lifecycle(request).runs)})


def _model(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


# --- helpers -------------------------------------------------------------------------------


async def _json_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise bad_request("The request body is not valid JSON.", None, "invalid_json") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.",
                    code="request_too_large")


def _int_param(raw: str | None, name: str, default: int) -> int:
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise bad_request(f"Invalid '{name}': expected an integer.", name,
                          "invalid_value") from None


def _starting_after(raw: str | None) -> int:
    after = _int_param(raw, "starting_after", -1)
    if raw is not None and after < 0:
        raise bad_request("Invalid 'starting_after': expected an integer >= 0.",
                          "starting_after", "invalid_value")
    return after


def _event_stream(lc: Lifecycle, rid: str, after: int, *,
                  cancel_on_disconnect: bool) -> EventSourceResponse:
    keepalive = lc.settings.keepalive
    return EventSourceResponse(
        _frames(lc, rid, after, cancel_on_disconnect), ping=keepalive, sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment="keepalive", sep="\n"),
    )


async def _frames(lc: Lifecycle, rid: str, after: int,
                  cancel_on_disconnect: bool) -> AsyncIterator[bytes]:
    """CONTRACT §2.4: a stream is a reader of the log, nothing more."""
    frames = wire.sse_frames
    ended = False
    try:
        async for entries in lc.follow(rid, TENANT, after):
            yield frames(entries)
        ended = True
        yield wire.DONE_FRAME
    finally:
        if not ended and cancel_on_disconnect:
            lc.spawn(_cancel_quietly(lc, rid))  # CONTRACT §4.7


async def _cancel_quietly(lc: Lifecycle, rid: str) -> None:
    with contextlib.suppress(APIError):
        await lc.cancel(rid, TENANT)


async def _until_done_or_disconnect(request: Request, lc: Lifecycle, rid: str) -> Any:
    """Wait for a synchronous response; a client that hangs up cancels it (CONTRACT §4.7)."""
    done = asyncio.ensure_future(lc.wait_done(rid, TENANT))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([done, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not done.done():
        done.cancel()
        await _cancel_quietly(lc, rid)
        return None
    return done.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


routes = [
    Route("/v1/responses", create_response, methods=["POST"]),
    Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
    Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
]
worker_routes = [Route("/health", health, methods=["GET"])]
debug_routes = [
    Route("/debug/engine/{response_id}", engine_trace, methods=["GET"]),
    Route("/debug/process", process_stats, methods=["GET"]),
]
