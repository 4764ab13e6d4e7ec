"""Compaction (`POST /v1/responses/compact`): a conversation packed into one opaque item.

tether does not summarize: engines differ, and a summary would lose what a later turn may
need. A compaction item carries the whole conversation (the turns a run would be given)
as a signed token, so the window a client keeps is one item whatever the conversation's
length, and a later `POST /v1/responses` with that item in `input` sees exactly the
conversation that was compacted, in order.

The token is a sealed one (`tether.seal`, kind `tc1`): signed with the install's key,
so a changed token is refused with 400; not secret (the content is the client's own
conversation, which it already holds).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from tether import seal as sealing
from tether import turns as codec
from tether.turns import Message

VERSION = "tc1"
configure = sealing.configure  # the install's key (one for every kind of sealed token)


def seal(turns: list[dict[str, Any]]) -> str:
    """A token carrying `turns` (encoded: `tether.turns.encode`)."""
    return sealing.seal(VERSION, turns)


def unseal(token: str) -> list[dict[str, Any]]:
    """The turns a token carries, encoded (`tether.turns.decode` reads them); ValueError
    if it is not one this install sealed."""
    turns = sealing.unseal(VERSION, token, "compaction token")
    if not isinstance(turns, list):
        raise ValueError("the compaction token is corrupt")
    return turns


def estimate_tokens(turns: list[Message]) -> int:
    """About 4 characters a token: compaction runs no tokenizer (no engine is involved)."""
    return sum(len(t.text) for t in turns) // 4 + len(turns)


def resource(turns: list[Message], usage: dict[str, Any]) -> dict[str, Any]:
    """The `CompactResource`: one compaction item holding the whole conversation.

    Only the compaction item, not the user messages beside it as OpenAI's window has:
    the SDK types `output` as output items (assistant messages only), and one item
    replays the conversation without duplicating any of it."""
    item = {
        "id": f"cmp_{secrets.token_hex(24)}",
        "type": "compaction",
        "encrypted_content": seal(codec.encode(turns)),
    }
    return {
        "id": f"resp_{secrets.token_hex(24)}",
        "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [item],
        "usage": usage,
    }
