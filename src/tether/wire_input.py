"""Requests on the wire: create and compact bodies (JSON or form), input items, history.

Every refusal names the offending parameter (`input[2].content[0].image_url`), with
OpenAI's error shape. `wire` re-exports what other modules use from here.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictStr,
    Tag,
    ValidationError,
    field_validator,
)

from tether import compact
from tether.errors import APIError, bad_request

# Parameters either spec defines that tether accepts and echoes without acting on them,
# each with the values that are safe to accept (anything else is refused, never misapplied).
_ECHOED = {"parallel_tool_calls", "service_tier", "user", "safety_identifier",
           "prompt_cache_key", "prompt_cache_retention", "max_tool_calls", "truncation"}
# Parameters either spec defines that tether does not support yet: refused unless null/empty.
_UNSUPPORTED = {"conversation", "prompt", "context_management", "moderation",
                "prompt_cache_options", "include", "reasoning",
                "presence_penalty", "frequency_penalty", "top_logprobs"}
# Upper bound of the counts a body gives (`max_output_tokens`, `max_tool_calls`): an int32,
# what every engine and store holds; larger numbers are refused, not overflowed.
MAX_COUNT = 2**31 - 1
# Item types an input list may hold; anything else is validated as a message (and its
# `type` refused there, naming `input[i].type`).
_ITEM_TYPES = ("message", "function_call", "function_call_output", "compaction")
# What engines that cannot see images read where an image was.
IMAGE_PLACEHOLDER = "[image omitted: this model cannot see images]"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


# --- input items --------------------------------------------------------------------------

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["input_text", "output_text"]
    text: StrictStr


class ImagePart(BaseModel):
    """An image by URL or data URL; tether never fetches a URL (no network at run time)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["input_image"]
    image_url: StrictStr
    detail: Literal["low", "high", "auto"] | None = None

    @field_validator("image_url")
    @classmethod
    def _url(cls, url: str) -> str:
        if not url.startswith(("data:image/", "https://", "http://")):
            raise ValueError("expected an http(s) URL or a data:image/... URL")
        return url


def _part_type(part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    # Tags with a `-`: `_is_type_tag` drops them from error locations.
    return "image-part" if kind == "input_image" else "text-part"


Part = Annotated[
    Annotated[ContentPart, Tag("text-part")] | Annotated[ImagePart, Tag("image-part")],
    Discriminator(_part_type),
]


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[Part]
    phase: Literal["commentary", "final_answer"] | None = None


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


class CompactionInput(BaseModel):
    """A compaction item (`POST /responses/compact`): the conversation it carries is
    checked here, so a request with an altered token is refused before anything runs."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["compaction"]
    encrypted_content: StrictStr
    id: StrictStr | None = None

    @field_validator("encrypted_content")
    @classmethod
    def _sealed(cls, token: str) -> str:
        compact.unseal(token)
        return token


def _item_type(item: Any) -> str:
    kind = item.get("type") if isinstance(item, dict) else getattr(item, "type", None)
    return kind if kind in _ITEM_TYPES else "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallInput, Tag("function_call")]
    | Annotated[FunctionCallOutputInput, Tag("function_call_output")]
    | Annotated[CompactionInput, Tag("compaction")],
    Discriminator(_item_type),
]


# --- tools and formats ----------------------------------------------------------------------

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


class AllowedTools(BaseModel):
    """`{"type": "allowed_tools", "tools": [...], "mode": ...}`: a hard limit on the tools
    the model may call this time (Open Responses), without changing `tools`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["allowed_tools"]
    tools: Annotated[list[ToolChoiceFunction], Field(min_length=1, max_length=128)]
    mode: Literal["none", "auto", "required"] = "auto"


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


# --- create ---------------------------------------------------------------------------------

class CreateRequest(BaseModel):
    """The subset of `POST /responses` that tether acts on; see `parse_create`."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: StrictStr
    input: StrictStr | list[InputItem]
    instructions: StrictStr | None = None
    previous_response_id: StrictStr | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
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
    max_tool_calls: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: (Literal["auto", "none", "required"] | ToolChoiceFunction | AllowedTools
                  | None) = None
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
    _check_messages(req.input)
    _check_tool_choice(req)
    _check_text_format(req)
    return req


def _check_messages(items: str | list[Any]) -> None:
    """Roles and what they may carry: images only from the user, `phase` only on the
    assistant's turns (as both specs' item params define them)."""
    for i, msg in enumerate([] if isinstance(items, str) else items):
        if not isinstance(msg, InputMessage):
            continue
        if msg.phase is not None and msg.role != "assistant":
            raise bad_request(f"Invalid 'input[{i}].phase': only assistant messages have a "
                              "phase.", f"input[{i}].phase", "invalid_value")
        parts = [] if isinstance(msg.content, str) else msg.content
        for j, part in enumerate(parts):
            if isinstance(part, ImagePart) and msg.role != "user":
                raise bad_request(f"Invalid 'input[{i}].content[{j}].type': images are only "
                                  "accepted in user messages.",
                                  f"input[{i}].content[{j}].type", "invalid_value")


def _check_tool_choice(req: CreateRequest) -> None:
    """A named tool must be one of `tools` (OpenAI refuses the request otherwise)."""
    names = {t.name for t in req.tools or []}
    choice = req.tool_choice
    if isinstance(choice, ToolChoiceFunction) and choice.name not in names:
        raise bad_request(f"Invalid 'tool_choice.name': no function '{choice.name}' in "
                          "'tools'.", "tool_choice.name", "invalid_value")
    if isinstance(choice, AllowedTools):
        for i, tool in enumerate(choice.tools):
            if tool.name not in names:
                raise bad_request(f"Invalid 'tool_choice.tools[{i}].name': no function "
                                  f"'{tool.name}' in 'tools'.",
                                  f"tool_choice.tools[{i}].name", "invalid_value")


def _check_text_format(req: CreateRequest) -> None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return
    for name, value in (("name", fmt.name), ("schema", fmt.schema_)):
        if value is None:
            raise bad_request(f"Missing required parameter: 'text.format.{name}'.",
                              f"text.format.{name}", "missing_required_parameter")


def _is_default(name: str, value: Any) -> bool:
    if name in ("presence_penalty", "frequency_penalty", "top_logprobs"):
        return bool(value == 0)
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


# --- compact --------------------------------------------------------------------------------

class CompactRequest(BaseModel):
    """`POST /responses/compact` (CompactResponseMethodPublicBody)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: StrictStr
    input: StrictStr | list[InputItem] | None = None
    previous_response_id: StrictStr | None = None
    # Accepted, used for nothing: compaction runs no model (see `tether.compact`).
    instructions: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None


def parse_compact(body: Any) -> CompactRequest:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    if body.get("model") is None:
        raise bad_request("Missing required parameter: 'model'.", "model",
                          "missing_required_parameter")
    for name in body:
        if name not in CompactRequest.model_fields:
            raise bad_request(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
    if body.get("input") is None and body.get("previous_response_id") is None:
        raise bad_request("Missing required parameter: 'input' (or 'previous_response_id').",
                          "input", "missing_required_parameter")
    try:
        req = CompactRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_messages(req.input or [])
    return req


# --- stored items and the turns a run is given ----------------------------------------------

def input_items(req: CreateRequest | CompactRequest) -> list[dict[str, Any]]:
    """The request's input as stored items (what `GET .../input_items` lists)."""
    if req.input is None:
        return []
    if isinstance(req.input, str):
        return [_message_item(InputMessage(role="user", content=req.input))]
    items: list[dict[str, Any]] = []
    for msg in req.input:
        if isinstance(msg, FunctionCallInput):
            items.append({"id": msg.id or new_id("fc"), "type": "function_call",
                          "call_id": msg.call_id, "name": msg.name,
                          "arguments": msg.arguments, "status": "completed"})
        elif isinstance(msg, FunctionCallOutputInput):
            items.append({"id": msg.id or new_id("fco"), "type": "function_call_output",
                          "call_id": msg.call_id, "output": msg.output,
                          "status": "completed"})
        elif isinstance(msg, CompactionInput):
            items.append({"id": msg.id or new_id("cmp"), "type": "compaction",
                          "encrypted_content": msg.encrypted_content})
        else:
            items.append(_message_item(msg))
    return items


def _message_item(msg: InputMessage) -> dict[str, Any]:
    parts = [ContentPart(type="input_text", text=msg.content)] if isinstance(
        msg.content, str) else msg.content
    content: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, ImagePart):
            content.append({"type": "input_image", "image_url": part.image_url,
                            "detail": part.detail or "auto"})
        elif msg.role == "assistant":
            # Stored as the SDK's item types: assistant turns are output messages.
            content.append({"type": "output_text", "text": part.text, "annotations": [],
                            "logprobs": []})
        else:
            content.append({"type": "input_text", "text": part.text})
    item = {"id": new_id("msg"), "type": "message", "role": msg.role, "content": content,
            "status": "completed"}
    if msg.phase is not None:
        item["phase"] = msg.phase
    return item


def item_text(item: dict[str, Any]) -> str:
    """A message's text; an image is a placeholder (engines that see images get the
    image itself through the turn's `parts`)."""
    parts = item.get("content", [])
    text = "".join(f"\n{IMAGE_PLACEHOLDER}\n" if part.get("type") == "input_image"
                   else part.get("text", "") for part in parts)
    return text.strip("\n") if any(p.get("type") == "input_image" for p in parts) else text


def _parts(item: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "image", "url": p["image_url"], "detail": p.get("detail", "auto")}
            if p.get("type") == "input_image" else {"type": "text", "text": p.get("text", "")}
            for p in item.get("content", [])]


def history(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored items (input items, or a previous response's output) as the turns a run
    is given: `{"role", "text"}`, plus `tool_calls` on the assistant turn that made
    function calls, `call_id` on a `tool` turn carrying a call's output, and `parts`
    on a turn with images. A compaction item is the conversation it carries."""
    turns: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type")
        if kind == "message":
            turn = {"role": item["role"], "text": item_text(item)}
            if any(p.get("type") == "input_image" for p in item.get("content", [])):
                turn["parts"] = _parts(item)
            turns.append(turn)
        elif kind == "function_call":
            call = {"call_id": item["call_id"], "name": item["name"],
                    "arguments": item["arguments"]}
            if not turns or turns[-1]["role"] != "assistant":
                turns.append({"role": "assistant", "text": ""})
            turns[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            turns.append({"role": "tool", "text": item["output"], "call_id": item["call_id"]})
        elif kind == "compaction":
            turns += compact.unseal(item["encrypted_content"])
    return turns
