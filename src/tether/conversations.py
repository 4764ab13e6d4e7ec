"""Conversations (issue 18): durable threads of items a response can start from.

What a conversation holds (docs/contract.md §9): the items clients add
(`POST /v1/conversations`, `.../items`), and each turn's items — a response created
with `conversation` starts from the conversation's items, then its own input; its
terminal transition adds its input and output items, in the same commit
(`store.base.Conversations`). Two turns running at once on one conversation both start
from the items as they were at their create, and are added in the order they end.

Bodies are checked here (OpenAI's shapes and limits: 20 items a call, 16 metadata
keys); the routes are in `conversation_routes.py`.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import TypeAdapter, ValidationError

from tether import wire_input
from tether.errors import APIError, bad_request
from tether.store.base import Conversations, ConversationState
from tether.turns import Message
from tether.wire_items import InputItem, history, new_id, stored_items

MAX_ITEMS = 20  # a call adds at most this many (OpenAI's `maxItems`)
_ITEMS = TypeAdapter(list[InputItem])


def not_found(cid: str, param: str = "conversation_id") -> APIError:
    return APIError(404, f"Conversation with id '{cid}' not found.", param=param, code="not_found")


def item_not_found(item_id: str) -> APIError:
    return APIError(404, f"Item with id '{item_id}' not found.", param="item_id", code="not_found")


def conversation_id(value: Any) -> str | None:
    """The id of `conversation` in a create body: a string or `{"id": ...}`."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) <= {"id"}:
        value = value.get("id")
    if not isinstance(value, str) or not value:
        raise bad_request(
            "Invalid 'conversation': expected a conversation id or an object with its 'id'.",
            "conversation",
            "invalid_value",
        )
    return value


def parse_metadata(raw: Any, param: str = "metadata") -> dict[str, str]:
    """Metadata as OpenAI limits it: at most 16 string keys of 64 characters, values
    strings of at most 512."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise bad_request(
            f"Invalid '{param}': expected an object of strings.", param, "invalid_value"
        )
    if len(raw) > 16:
        raise bad_request(f"Invalid '{param}': at most 16 keys.", param, "invalid_value")
    if any(len(k) > 64 for k in raw):
        raise bad_request(
            f"Invalid '{param}': keys are at most 64 characters.", param, "invalid_value"
        )
    if any(len(v) > 512 for v in raw.values()):
        raise bad_request(
            f"Invalid '{param}': values are at most 512 characters.", param, "invalid_value"
        )
    return dict(raw)


def parse_items(raw: Any, param: str = "items") -> list[dict[str, Any]]:
    """Input items as a conversation keeps them (as a response's input items are stored,
    each with its id); item references still unresolved (`resolve`)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request(f"Invalid '{param}': expected an array of items.", param, "invalid_type")
    if len(raw) > MAX_ITEMS:
        raise bad_request(
            f"Invalid '{param}': at most {MAX_ITEMS} items at a time.",
            param,
            "array_above_max_length",
        )
    try:
        items = _ITEMS.validate_python(raw)
    except ValidationError as exc:
        err = wire_input._validation_error(exc)  # names `[i].content...`
        where = param + (err.param or "")
        message = err.message.replace(f"'{err.param}'", f"'{where}'", 1)
        raise bad_request(message, where, "invalid_value") from None
    wire_input._check_messages(items)
    return stored_items(items)


def resolve(
    items: list[dict[str, Any]], known: list[dict[str, Any]], param: str
) -> list[dict[str, Any]]:
    """Item references replaced by a copy of the conversation's item they name (with an
    id of its own: ids stay unique in a conversation); one that names nothing is refused."""
    by_id = {i["id"]: i for i in known}
    out = []
    for n, item in enumerate(items):
        if item.get("type") == "item_reference":
            target = by_id.get(item["id"])
            if target is None:
                raise bad_request(
                    f"Item with id '{item['id']}' not found.", f"{param}[{n}].id", "item_not_found"
                )
            prefix = str(target["id"]).split("_", 1)[0]
            item = {**target, "id": new_id(prefix)}
        out.append(item)
    return out


def new_conversation(metadata: dict[str, str]) -> dict[str, Any]:
    return {
        "id": new_id("conv"),
        "object": "conversation",
        "created_at": int(time.time()),
        "metadata": metadata,
    }


def locked(param: str) -> APIError:
    """OpenAI's answer to a turn (or a change of items) while a turn is in progress."""
    return APIError(
        400,
        "Another process is currently operating on this conversation. "
        "Please retry in a few seconds.",
        param=param,
        code="conversation_locked",
    )


async def state(store: Conversations, cid: str, tenant: str) -> ConversationState:
    """The items (and version) a turn of `cid` starts from (404 for an unknown
    conversation)."""
    found = await store.conversation_state(cid, tenant)
    if found is None:
        raise not_found(cid, "conversation")
    return found


def turn(
    state: ConversationState, inputs: list[dict[str, Any]]
) -> tuple[list[Message], list[dict[str, Any]]]:
    """A turn's prompt (the conversation's items, then its own input, references
    resolved) and its own input items (added to the conversation when it ends)."""
    own = [i for i in inputs if i.get("type") != "item_reference"]
    inputs = resolve(inputs, state.items + own, "input")
    return history(state.items) + history(inputs), inputs


def item_list(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A `ConversationItemList`."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }
