"""The wire format: request parsing, the Response object, stream events, SSE frames.

Responses and events are plain dicts built here (the per-token path never runs model
validation); tests check every one of them against the official SDK's types and the
Open Responses OpenAPI schemas.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictStr,
    Tag,
    ValidationError,
)

from tether.errors import APIError, bad_request
from tether.store.base import LogEntry

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
TERMINAL_STATES = frozenset({"completed", "incomplete", "failed", "cancelled"})
LIVE_STATES = ("queued", "in_progress")

# Parameters either spec defines that tether accepts and echoes without acting on them,
# each with the values that are safe to accept (anything else is refused, never misapplied).
_ECHOED = {"parallel_tool_calls", "service_tier", "user", "safety_identifier",
           "prompt_cache_key", "prompt_cache_retention", "max_tool_calls", "truncation"}
# Parameters either spec defines that tether does not support yet: refused unless null/empty.
_UNSUPPORTED = {"conversation", "prompt", "context_management", "moderation",
                "prompt_cache_options", "include", "reasoning",
                "presence_penalty", "frequency_penalty", "top_logprobs"}
# Item types an input list may hold; anything else is validated as a message (and its
# `type` refused there, naming `input[i].type`).
_ITEM_TYPES = ("message", "function_call", "function_call_output")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


# --- requests ---------------------------------------------------------------------------

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["input_text", "output_text"]
    text: StrictStr


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[ContentPart]


class FunctionCallInput(BaseModel):
    """A function call the model made, sent back as context."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionCallOutputInput(BaseModel):
    """The output of a function call, for the model to go on with."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


def _item_type(item: Any) -> str:
    kind = item.get("type") if isinstance(item, dict) else getattr(item, "type", None)
    return kind if kind in _ITEM_TYPES else "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallInput, Tag("function_call")]
    | Annotated[FunctionCallOutputInput, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(BaseModel):
    """Only function tools: the hosted tools (web search, files...) have no meaning here."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolChoiceFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    name: StrictStr


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class CreateRequest(BaseModel):
    """The subset of `POST /responses` that tether acts on; see `parse_create`."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: StrictStr
    input: StrictStr | list[InputItem]
    instructions: StrictStr | None = None
    previous_response_id: StrictStr | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    stream: StrictBool | None = False
    background: StrictBool | None = False
    store: StrictBool | None = True
    stream_options: dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    service_tier: StrictStr | None = None
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: StrictStr | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoiceFunction | None = None
    text: TextConfig | None = None

    def text_format(self) -> dict[str, Any] | None:
        """The `text.format` an engine must apply, or None for plain text."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        return fmt.model_dump(by_alias=True, exclude_none=True)

    def uses_tools(self) -> bool:
        return bool(self.tools) or self.tool_choice not in (None, "auto", "none")


def parse_create(body: Any) -> CreateRequest:
    """Validate a create body, naming the offending parameter in every refusal."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    for name in ("model", "input"):
        if body.get(name) is None:
            raise bad_request(
                f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
            )
    for name, value in body.items():
        if name in CreateRequest.model_fields:
            continue
        if name in _UNSUPPORTED:
            if value is None or value == [] or _is_default(name, value):
                continue
            raise bad_request(
                f"Parameter '{name}' is not supported by this server yet.",
                name,
                "unsupported_parameter",
            )
        raise bad_request(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
    try:
        req = CreateRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if req.metadata is not None and len(req.metadata) > 16:
        raise bad_request("Invalid 'metadata': at most 16 keys.", "metadata", "invalid_value")
    if req.metadata is not None and any(len(k) > 64 for k in req.metadata):
        raise bad_request("Invalid 'metadata': keys are at most 64 characters.", "metadata",
                          "invalid_value")
    return req


def _is_default(name: str, value: Any) -> bool:
    if name in ("presence_penalty", "frequency_penalty", "top_logprobs"):
        return bool(value == 0)
    if name == "tool_choice":
        return value in ("auto", "none")
    if name == "text":
        fmt = value.get("format") if isinstance(value, dict) else None
        return isinstance(value, dict) and (fmt is None or fmt == {"type": "text"})
    if name == "reasoning":
        return isinstance(value, dict) and all(v is None for v in value.values())
    return False


def _validation_error(exc: ValidationError) -> APIError:
    # In a union the deepest location is the branch the caller meant.
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    param = ""
    for part in err["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not _is_type_tag(str(part)):
            param += ("." if param else "") + str(part)
    return bad_request(f"Invalid value for '{param}': {err['msg']}.", param, "invalid_value")


def _is_type_tag(part: str) -> bool:
    """Pydantic names union branches in error locations (`str`, `list[...]`, model
    class names, discriminator tags)."""
    tags = {"str", "bool", "int", "float", "dict", "list", "none", *_ITEM_TYPES}
    return part in tags or part[:1].isupper() or any(c in part for c in "[-")


def input_items(req: CreateRequest) -> list[dict[str, Any]]:
    """The request's input as stored items (what `GET .../input_items` lists)."""
    messages: list[InputMessage | FunctionCallInput | FunctionCallOutputInput]
    if isinstance(req.input, str):
        messages = [InputMessage(role="user", content=req.input)]
    else:
        messages = list(req.input)
    items: list[dict[str, Any]] = []
    for msg in messages:
        if isinstance(msg, FunctionCallInput):
            items.append({"id": msg.id or new_id("fc"), "type": "function_call",
                          "call_id": msg.call_id, "name": msg.name,
                          "arguments": msg.arguments, "status": "completed"})
            continue
        if isinstance(msg, FunctionCallOutputInput):
            items.append({"id": msg.id or new_id("fco"), "type": "function_call_output",
                          "call_id": msg.call_id, "output": msg.output,
                          "status": "completed"})
            continue
        texts = [msg.content] if isinstance(msg.content, str) else [p.text for p in msg.content]
        # Stored as the SDK's item types: assistant turns are output messages.
        if msg.role == "assistant":
            parts = [{"type": "output_text", "text": t, "annotations": []} for t in texts]
        else:
            parts = [{"type": "input_text", "text": t} for t in texts]
        items.append(
            {"id": new_id("msg"), "type": "message", "role": msg.role,
             "content": parts, "status": "completed"}
        )
    return items


def item_text(item: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in item.get("content", []))


def history(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored items (input items, or a previous response's output) as the turns a run
    is given: `{"role", "text"}`, plus `tool_calls` on the assistant turn that made
    function calls, and `call_id` on a `tool` turn carrying a call's output."""
    turns: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type")
        if kind == "message":
            turns.append({"role": item["role"], "text": item_text(item)})
        elif kind == "function_call":
            call = {"call_id": item["call_id"], "name": item["name"],
                    "arguments": item["arguments"]}
            if not turns or turns[-1]["role"] != "assistant":
                turns.append({"role": "assistant", "text": ""})
            turns[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            turns.append({"role": "tool", "text": item["output"], "call_id": item["call_id"]})
    return turns


# --- the Response object -----------------------------------------------------------------


def echo_fields(req: CreateRequest) -> dict[str, Any]:
    """The parts of a Response that repeat the request, fixed at creation."""
    return {
        "object": "response",
        "model": req.model,
        "instructions": req.instructions,
        "previous_response_id": req.previous_response_id,
        "tools": [{"type": "function", "name": t.name, "description": t.description,
                   "parameters": t.parameters, "strict": True if t.strict is None else t.strict}
                  for t in req.tools or []],
        "tool_choice": (req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel)
                        else req.tool_choice or "auto"),
        "truncation": req.truncation or "disabled",
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "text": {"format": req.text_format() or {"type": "text"}}
        | ({"verbosity": req.text.verbosity} if req.text and req.text.verbosity else {}),
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "top_logprobs": 0,
        "reasoning": None,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "store": True if req.store is None else req.store,
        "background": bool(req.background),
        "service_tier": req.service_tier or "default",
        "metadata": req.metadata or {},
        "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key,
        "user": req.user,
    }


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
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
    """CONTRACT §6.1: flat fields (OpenAI) and the nested object (Open Responses)."""
    err = {"type": "server_error", "code": code, "message": message, "param": None}
    return {"type": "error", "code": code, "message": message, "param": None, "error": err}


@dataclass(slots=True)
class MessageItem:
    """The one assistant message a run streams; builds its events in order."""

    output_index: int = 0
    id: str = field(default_factory=lambda: new_id("msg"))
    text: list[str] = field(default_factory=list)

    def item(self, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [self.part()]
        return {"id": self.id, "type": "message", "role": "assistant",
                "status": status, "content": content}

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": "".join(self.text), "annotations": [],
                "logprobs": []}

    def opened(self) -> list[dict[str, Any]]:
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            {"type": "response.output_item.added", "output_index": self.output_index,
             "item": self.item("in_progress")},
            {"type": "response.content_part.added", "item_id": self.id,
             "output_index": self.output_index, "content_index": 0, "part": empty},
        ]

    def delta(self, text: str) -> dict[str, Any]:
        self.text.append(text)
        return {"type": "response.output_text.delta", "item_id": self.id,
                "output_index": self.output_index, "content_index": 0, "delta": text,
                "logprobs": []}

    def live(self) -> dict[str, Any]:
        """The item as a retrieve of a live response shows it."""
        return self.item("in_progress") | {"content": [self.part()]}

    def closed(self, status: str) -> list[dict[str, Any]]:
        part = self.part()
        return [
            {"type": "response.output_text.done", "item_id": self.id,
             "output_index": self.output_index, "content_index": 0, "text": part["text"],
             "logprobs": []},
            {"type": "response.content_part.done", "item_id": self.id,
             "output_index": self.output_index, "content_index": 0, "part": part},
            {"type": "response.output_item.done", "output_index": self.output_index,
             "item": self.item(status)},
        ]


@dataclass(slots=True)
class FunctionCallItem:
    """A function call a run streams: its arguments arrive in pieces."""

    output_index: int
    call_id: str
    name: str
    id: str = field(default_factory=lambda: new_id("fc"))
    arguments: list[str] = field(default_factory=list)

    def item(self, status: str) -> dict[str, Any]:
        return {"id": self.id, "type": "function_call", "status": status,
                "call_id": self.call_id, "name": self.name,
                "arguments": "".join(self.arguments)}

    def live(self) -> dict[str, Any]:
        return self.item("in_progress")

    def opened(self) -> list[dict[str, Any]]:
        item = self.item("in_progress") | {"arguments": ""}
        return [{"type": "response.output_item.added", "output_index": self.output_index,
                 "item": item}]

    def delta(self, text: str) -> dict[str, Any]:
        self.arguments.append(text)
        return {"type": "response.function_call_arguments.delta", "item_id": self.id,
                "output_index": self.output_index, "delta": text}

    def closed(self, status: str) -> list[dict[str, Any]]:
        return [
            {"type": "response.function_call_arguments.done", "item_id": self.id,
             "output_index": self.output_index, "arguments": "".join(self.arguments)},
            {"type": "response.output_item.done", "output_index": self.output_index,
             "item": self.item(status)},
        ]


OpenItem = MessageItem | FunctionCallItem


def replay(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[OpenItem]]:
    """Rebuild output from a log: (closed items, items still open)."""
    open_items: dict[str, OpenItem] = {}
    done: list[dict[str, Any]] = []
    for ev in events:
        kind = ev["type"]
        if kind == "response.output_item.added":
            item = ev["item"]
            if item["type"] == "function_call":
                open_items[item["id"]] = FunctionCallItem(
                    ev["output_index"], item["call_id"], item["name"], item["id"])
            else:
                open_items[item["id"]] = MessageItem(ev["output_index"], item["id"])
        elif kind == "response.output_text.delta":
            msg = open_items[ev["item_id"]]
            assert isinstance(msg, MessageItem)
            msg.text.append(ev["delta"])
        elif kind == "response.function_call_arguments.delta":
            call = open_items[ev["item_id"]]
            assert isinstance(call, FunctionCallItem)
            call.arguments.append(ev["delta"])
        elif kind == "response.output_item.done":
            open_items.pop(ev["item"]["id"], None)
            done.append(ev["item"])
    return done, list(open_items.values())


# --- SSE ---------------------------------------------------------------------------------

DONE_FRAME = b"data: [DONE]\n\n"


def sse_frame(kind: str, data: bytes) -> bytes:
    """CONTRACT §4.1: one event, one write, `\\n` line ends, no `id:`/`retry:`."""
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def sse_frames(entries: list[LogEntry]) -> bytes:
    """The frames of logged events, each built once however many readers share it."""
    frames = []
    for entry in entries:
        frame = entry.frame
        if frame is None:
            frame = entry.frame = sse_frame(entry.type, entry.data)
        frames.append(frame)
    return b"".join(frames)
