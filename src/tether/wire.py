"""The wire format: the Response object, stream events, SSE frames (requests: `wire_input`).

Responses and events are plain dicts built here (the per-token path never runs model
validation); tests check every one of them against the official SDK's types and the
Open Responses OpenAPI schemas.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tether.store.base import LogEntry

# Request parsing lives in `wire_input`; these names stay importable from here.
from tether.wire_input import (
    CompactRequest,
    CreateRequest,
    history,
    input_items,
    item_text,
    new_id,
    parse_compact,
    parse_create,
)

__all__ = [
    "CompactRequest",
    "CreateRequest",
    "history",
    "input_items",
    "item_text",
    "new_id",
    "parse_compact",
    "parse_create",
]

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
LIVE_STATES = ("queued", "in_progress")


# --- the Response object -----------------------------------------------------------------


def echo_fields(req: CreateRequest) -> dict[str, Any]:
    """The parts of a Response that repeat the request, fixed at creation (what each
    field does: docs/fields.md)."""
    reasoning = req.reasoning
    return (
        {
            "object": "response",
            "model": req.model,
            "instructions": req.instructions,
            "previous_response_id": req.previous_response_id,
            "tools": req.toolset().echo,
            "tool_choice": (
                req.tool_choice.model_dump(exclude_none=True)
                if isinstance(req.tool_choice, BaseModel)
                else req.tool_choice or "auto"
            ),
            "truncation": req.truncation or "disabled",
            "parallel_tool_calls": True
            if req.parallel_tool_calls is None
            else req.parallel_tool_calls,
            "text": {"format": _echo_format(req.text_format())}
            | ({"verbosity": req.text.verbosity} if req.text and req.text.verbosity else {}),
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "presence_penalty": req.presence_penalty or 0.0,
            "frequency_penalty": req.frequency_penalty or 0.0,
            "top_logprobs": req.top_logprobs or 0,
            "reasoning": None
            if reasoning is None
            else {
                "effort": reasoning.effort,
                "summary": reasoning.summary or reasoning.generate_summary,
            },
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls,
            "store": True if req.store is None else req.store,
            "background": bool(req.background),
            # What was used: tether has one tier (OpenAI answers `auto` with `default` too).
            "service_tier": "default",
            "metadata": req.metadata or {},
            "safety_identifier": req.safety_identifier,
            "prompt_cache_key": req.prompt_cache_key,
        }
        | ({"user": req.user} if req.user is not None else {})
        | _cache_echo(req)
        | _conversation_echo(req)
        | _notes(req)
    )


def _cache_echo(req: CreateRequest) -> dict[str, Any]:
    """The prompt-cache fields, echoed only when given (OpenAI's Response has them, Open
    Responses' does not); the options as applied: their defaults filled in."""
    echo: dict[str, Any] = {}
    if req.prompt_cache_retention is not None:
        echo["prompt_cache_retention"] = req.prompt_cache_retention
    options = req.prompt_cache_options
    if options is not None:
        echo["prompt_cache_options"] = {
            "ttl": options.get("ttl", "30m"),
            "mode": options.get("mode", "implicit"),
        }
    return echo


def _conversation_echo(req: CreateRequest) -> dict[str, Any]:
    """`conversation: {"id"}` for a turn of a conversation (OpenAI's Response has it; the
    store reads it at the terminal transition: `store.conversations.turn_of`)."""
    cid = req.conversation_id()
    return {"conversation": {"id": cid}} if cid is not None else {}


def _notes(req: CreateRequest) -> dict[str, Any]:
    """tether's note on what it left out (hosted tools, with `hosted_tools = "drop"`)."""
    dropped = req.toolset().dropped
    return {"tether": {"dropped_tools": dropped}} if dropped else {}


def _echo_format(fmt: dict[str, Any] | None) -> dict[str, Any]:
    """`text.format` as a Response shows it: a json_schema format has every field the
    spec requires (`description`, `strict`), filled with their defaults."""
    if fmt is None:
        return {"type": "text"}
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    return {
        "type": "json_schema",
        "name": fmt["name"],
        "description": fmt.get("description"),
        "schema": fmt["schema"],
        "strict": bool(fmt.get("strict", False)),
    }


def usage(input_tokens: int, output_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    """A Response's usage; reasoning tokens are a part of the output tokens (as OpenAI
    counts them), so never more than they."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": max(0, min(reasoning_tokens, output_tokens))},
        "total_tokens": input_tokens + output_tokens,
    }


def snapshot(
    echo: dict[str, Any],
    *,
    id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
    completed_at: int | None = None,
) -> dict[str, Any]:
    return {
        "id": id,
        **echo,
        "created_at": created_at,
        "status": status,
        "completed_at": completed_at,
        "output": output or [],
        "usage": usage,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
    }


# --- stream events -----------------------------------------------------------------------


def lifecycle_event(kind: str, response: dict[str, Any]) -> dict[str, Any]:
    return {"type": f"response.{kind}", "response": response}


def error_event(code: str, message: str) -> dict[str, Any]:
    """docs/contract.md §6.1: flat fields (OpenAI) and the nested object (Open Responses)."""
    err = {"type": "server_error", "code": code, "message": message, "param": None}
    return {"type": "error", "code": code, "message": message, "param": None, "error": err}


DONE_FRAME = b"data: [DONE]\n\n"


def sse_frame(kind: str, data: bytes) -> bytes:
    """docs/contract.md §4.1: one event, one write, `\\n` line ends, no `id:`/`retry:`."""
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def sse_frames(entries: list[LogEntry]) -> bytes:
    """The frames of logged events (built once, when logged, for every reader)."""
    return b"".join([entry.frame for entry in entries])
