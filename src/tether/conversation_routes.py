"""HTTP routes of the Conversations API (`/v1/conversations`, OpenAI's eight operations):
parse, call the store, serialize. What a conversation is: `tether.conversations`."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tether import bounds
from tether import conversations as conv
from tether.auth import principal
from tether.bodies import JSON, json_body
from tether.errors import bad_request
from tether.store.base import ConversationLocked, Store, UnknownItem


def _store(request: Request) -> Store:
    store: Store = request.app.state.lifecycle.store
    return store


async def _body(request: Request, empty_ok: bool = False) -> dict[str, Any]:
    """The JSON object of the body; `empty_ok`: no body at all stands for `{}` (a create
    of a conversation needs none)."""
    headers = request.headers
    if (
        empty_ok
        and headers.get("content-length", "0") == "0"
        and "transfer-encoding" not in headers
    ):
        return {}
    body = await json_body(request, request.app.state.lifecycle.settings.max_body_bytes)
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


def _unknown(body: dict[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise bad_request(f"Unknown parameter: '{name}'.", name, "unknown_parameter")


def _include(request: Request) -> None:
    """`include` is accepted: every item is kept whole (logprobs, images, reasoning)."""
    for value in request.query_params.getlist("include") + request.query_params.getlist(
        "include[]"
    ):
        if not value:
            raise bad_request("Invalid 'include': empty value.", "include", "invalid_value")


async def create_conversation(request: Request) -> Response:
    body = await _body(request, empty_ok=True)
    _unknown(body, {"metadata", "items"})
    metadata = conv.parse_metadata(body.get("metadata"))
    items = conv.parse_items(body.get("items"))
    items = conv.resolve(items, [i for i in items if i.get("type") != "item_reference"], "items")
    conversation = conv.new_conversation(metadata)
    await _store(request).conversation_create(conversation, principal(request).tenant, items)
    return JSON(conversation)


async def get_conversation(request: Request) -> Response:
    cid = request.path_params["conversation_id"]
    found = await _store(request).conversation_get(cid, principal(request).tenant)
    if found is None:
        raise conv.not_found(cid)
    return JSON(found)


async def update_conversation(request: Request) -> Response:
    cid = request.path_params["conversation_id"]
    body = await _body(request)
    _unknown(body, {"metadata"})
    if "metadata" not in body:
        raise bad_request(
            "Missing required parameter: 'metadata'.", "metadata", "missing_required_parameter"
        )
    metadata = conv.parse_metadata(body["metadata"])
    found = await _store(request).conversation_update(cid, principal(request).tenant, metadata)
    if found is None:
        raise conv.not_found(cid)
    return JSON(found)


async def delete_conversation(request: Request) -> Response:
    cid = request.path_params["conversation_id"]
    if not await _store(request).conversation_delete(cid, principal(request).tenant):
        raise conv.not_found(cid)
    return JSON({"id": cid, "object": "conversation.deleted", "deleted": True})


async def create_items(request: Request) -> Response:
    _include(request)
    cid = request.path_params["conversation_id"]
    tenant = principal(request).tenant
    body = await _body(request)
    _unknown(body, {"items"})
    if body.get("items") is None:
        raise bad_request(
            "Missing required parameter: 'items'.", "items", "missing_required_parameter"
        )
    items = conv.parse_items(body["items"])
    store = _store(request)
    if any(i.get("type") == "item_reference" for i in items):
        known = await store.conversation_items(cid, tenant)
        if known is None:
            raise conv.not_found(cid)
        own = [i for i in items if i.get("type") != "item_reference"]
        items = conv.resolve(items, known + own, "items")
    try:
        added = await store.conversation_add(cid, tenant, items)
    except ConversationLocked:
        raise conv.locked("conversation_id") from None
    if not added:
        raise conv.not_found(cid)
    return JSON(conv.item_list(items, False))


async def list_items(request: Request) -> Response:
    _include(request)
    cid = request.path_params["conversation_id"]
    params = request.query_params
    limit = bounds.int_param(params.get("limit"), "limit", 20, 1, 100)
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("Invalid 'order': expected 'asc' or 'desc'.", "order", "invalid_value")
    after = params.get("after")
    try:
        items = await _store(request).conversation_items(
            cid, principal(request).tenant, after, limit + 1, order == "desc"
        )
    except UnknownItem:
        raise bad_request(
            f"Invalid 'after': no item '{after}'.", "after", "invalid_value"
        ) from None
    if items is None:
        raise conv.not_found(cid)
    return JSON(conv.item_list(items[:limit], len(items) > limit))


async def get_item(request: Request) -> Response:
    _include(request)
    cid, item_id = request.path_params["conversation_id"], request.path_params["item_id"]
    store, tenant = _store(request), principal(request).tenant
    item = await store.conversation_item(cid, tenant, item_id)
    if item is None:
        if await store.conversation_get(cid, tenant) is None:
            raise conv.not_found(cid)
        raise conv.item_not_found(item_id)
    return JSON(item)


async def delete_item(request: Request) -> Response:
    """Deletes one item; answers the conversation (as OpenAI does)."""
    cid, item_id = request.path_params["conversation_id"], request.path_params["item_id"]
    store, tenant = _store(request), principal(request).tenant
    found = await store.conversation_get(cid, tenant)
    if found is None:
        raise conv.not_found(cid)
    try:
        removed = await store.conversation_remove(cid, tenant, item_id)
    except ConversationLocked:
        raise conv.locked("conversation_id") from None
    if not removed:
        raise conv.item_not_found(item_id)
    return JSON(found)


routes: list[BaseRoute] = [
    Route("/v1/conversations", create_conversation, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}", get_conversation, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}", update_conversation, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}", delete_conversation, methods=["DELETE"]),
    Route("/v1/conversations/{conversation_id}/items", create_items, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}/items", list_items, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}/items/{item_id}", get_item, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}/items/{item_id}", delete_item, methods=["DELETE"]),
]
