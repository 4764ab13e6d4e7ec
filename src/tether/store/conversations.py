"""What both stores share for conversations (issue 18): the conversation object, which
turns add items, and the items a turn adds. The SQL lives with each store
(`sqlite_conversations.py`, `pg_conversations.py`).

A turn is a response whose snapshot names a conversation (`"conversation": {"id"}`).
Its terminal transition adds its input items, then its output items as the terminal
snapshot has them (a cancelled turn's open items closed `incomplete`: what its streams and
its cancel reply showed), in the same commit. A `failed` turn adds nothing: the turn did
not happen, and a client retrying it does not find its input twice (docs/contract.md §9).
"""

from __future__ import annotations

from typing import Any

import orjson

# Terminal states whose turns are added to their conversation.
TURN_STATES = frozenset({"completed", "incomplete", "cancelled"})


def conversation_object(cid: str, created_at: float, metadata: bytes) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "conversation",
        "created_at": int(created_at),
        "metadata": orjson.loads(metadata),
    }


def turn_of(snapshot: dict[str, Any], status: str) -> str | None:
    """The conversation a terminal response in `status` adds its items to, if any."""
    conversation = snapshot.get("conversation")
    if not isinstance(conversation, dict) or status not in TURN_STATES:
        return None
    cid = conversation.get("id")
    return cid if isinstance(cid, str) else None


def turn_items(input_items: list[dict[str, Any]], snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """The items a turn adds: its input, then its output as its terminal snapshot shows it."""
    return [*input_items, *snapshot.get("output", [])]


def item_rows(items: list[dict[str, Any]]) -> tuple[list[str], list[bytes]]:
    """Items as the columns they are stored in: their ids and their JSON."""
    return [str(i["id"]) for i in items], [orjson.dumps(i) for i in items]
