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

from tether.store.common import LIVE

# Terminal states whose turns are added to their conversation.
TURN_STATES = frozenset({"completed", "incomplete", "cancelled"})

# A conversation row with no turn in progress: none set, or (defensively: the terminal
# transition clears it in its commit) one whose response is seen terminal. Not "not seen
# live": a PostgreSQL statement that waited for a concurrent create's row lock re-checks
# the new row, but its subquery does not see that create's response, just committed.
FREE = f"(turn IS NULL OR EXISTS (SELECT 1 FROM responses r WHERE r.id = turn AND NOT r.{LIVE}))"


def conversation_object(cid: str, created_at: float, metadata: bytes) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "conversation",
        "created_at": int(created_at),
        "metadata": orjson.loads(metadata),
    }


def turn_of(snapshot: dict[str, Any]) -> str | None:
    """The conversation a response is a turn of, if any."""
    conversation = snapshot.get("conversation")
    cid = conversation.get("id") if isinstance(conversation, dict) else None
    return cid if isinstance(cid, str) else None


def turn_items(
    input_items: list[dict[str, Any]], snapshot: dict[str, Any], status: str
) -> list[dict[str, Any]]:
    """The items a turn ending in `status` adds: its input, then its output as its
    terminal snapshot shows it; none for a failed turn."""
    if status not in TURN_STATES:
        return []
    return [*input_items, *snapshot.get("output", [])]


def item_rows(items: list[dict[str, Any]]) -> tuple[list[str], list[bytes]]:
    """Items as the columns they are stored in: their ids and their JSON."""
    return [str(i["id"]) for i in items], [orjson.dumps(i) for i in items]
