"""What tether does with each field of a create request: the one table the code follows
(docs/fields.md is this table in prose; a test checks that they agree).

A field is *applied* (tether or the engine acts on it), *forwarded* (to upstreams that
understand it: `chat` names it in a chat-completions body, `responses` passes it to a
Responses upstream), *echoed* (accepted, repeated in the Response as OpenAI repeats it,
no effect here), *accepted* (no effect and not echoed, as on OpenAI), or *refused* (a 400
naming it unless it is null/empty: accepting it would silently give a wrong result).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Decision = Literal["applied", "forwarded", "echoed", "accepted", "refused"]


@dataclass(frozen=True, slots=True)
class Field:
    decision: Decision
    chat: str | None = None  # its name in a chat-completions body, when forwarded there
    responses: bool = False  # passed through to Responses upstreams
    why: str = ""


FIELDS: dict[str, Field] = {
    "model": Field("applied"),
    "input": Field("applied"),
    "instructions": Field("applied"),
    "previous_response_id": Field("applied"),
    "conversation": Field("applied"),
    "max_output_tokens": Field("applied"),
    "temperature": Field("applied"),
    "top_p": Field("applied"),
    "metadata": Field("applied"),
    "stream": Field("applied"),
    "stream_options": Field("accepted", why="tether never obfuscates deltas"),
    "background": Field("applied"),
    "store": Field("applied"),
    "tools": Field("applied"),
    "tool_choice": Field("applied"),
    "text": Field("applied", why="format applied; verbosity forwarded (chat: `verbosity`)"),
    "include": Field(
        "applied",
        responses=True,
        why="logprobs arrays always present; reasoning items sealed on request",
    ),
    "parallel_tool_calls": Field("forwarded", chat="parallel_tool_calls", responses=True),
    "user": Field("forwarded", chat="user", responses=True),
    "safety_identifier": Field("forwarded", chat="safety_identifier", responses=True),
    "prompt_cache_key": Field("forwarded", chat="prompt_cache_key", responses=True),
    "prompt_cache_retention": Field("forwarded", responses=True),
    "prompt_cache_options": Field(
        "forwarded", responses=True, why="`prewarm: true` warms up: no output is generated"
    ),
    "reasoning": Field(
        "forwarded", responses=True, why="chat: `effort` as `reasoning_effort`; echoed"
    ),
    "presence_penalty": Field("forwarded", chat="presence_penalty", responses=True),
    "frequency_penalty": Field("forwarded", chat="frequency_penalty", responses=True),
    "top_logprobs": Field("forwarded", responses=True),
    "max_tool_calls": Field(
        "applied", responses=True, why="bounds the MCP calls of a response's tool loop"
    ),
    "truncation": Field("forwarded", responses=True),
    "context_management": Field(
        "forwarded",
        responses=True,
        why="server-side compaction; without it the context is used whole",
    ),
    "access_programs": Field(
        "forwarded", responses=True, why="OpenAI's access programs; no effect elsewhere"
    ),
    "background_options": Field(
        "applied",
        why="`completion_window`: `soonest` runs at once; `2h`/`8h` wait for idle capacity "
        "and start before a deadline (docs/scheduling.md); `continuation_id` accepted",
    ),
    "image": Field("forwarded", responses=True, why="image context options"),
    "service_tier": Field("echoed", why="echoes the tier used: always `default`"),
    "client_metadata": Field("accepted", why="Codex's client telemetry ids"),
    "prompt": Field(
        "refused",
        why="a stored prompt template tether cannot resolve: its "
        "instructions would be silently missing",
    ),
    "moderation": Field(
        "refused", why="tether runs no moderation: unmoderated output would pass as moderated"
    ),
}

REFUSED = frozenset(name for name, f in FIELDS.items() if f.decision == "refused")


def forwarded(body: dict[str, Any]) -> dict[str, Any]:
    """The fields an upstream engine may forward, by their Responses name, as given
    (None and absent fields left out)."""
    out = {
        name: body[name]
        for name, f in FIELDS.items()
        if (f.chat or f.responses) and body.get(name) is not None
    }
    text = body.get("text")
    if isinstance(text, dict) and text.get("verbosity") is not None:
        out["verbosity"] = text["verbosity"]
    return out
