"""Requests on the wire: create and compact bodies (JSON or form).

Every refusal names the offending parameter (`input[2].content[0].image_url`), with
OpenAI's error shape. What each create field does is `wire_fields.FIELDS`; input items
are `wire_items`, tools `wire_tools`. `wire` re-exports what other modules use from here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from tether import wire_fields, wire_tools
from tether.errors import APIError, bad_request
from tether.mcp_tools import McpTool
from tether.wire_items import (
    IMAGE_PLACEHOLDER,
    ITEM_TYPES,
    ImagePart,
    InputItem,
    InputMessage,
    history,
    item_text,
    new_id,
    stored_items,
)
from tether.wire_tools import (
    CustomTool,
    FunctionTool,
    HostedRule,
    NamespaceTool,
    ToolChoice,
    Toolset,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "CompactRequest",
    "CreateRequest",
    "history",
    "input_items",
    "item_text",
    "new_id",
    "parse_compact",
    "parse_create",
]

# Upper bound of the counts a body gives (`max_output_tokens`, `max_tool_calls`): an int32,
# what every engine and store holds; larger numbers are refused, not overflowed.
MAX_COUNT = 2**31 - 1


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


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class BackgroundOptions(BaseModel):
    """`background_options` (OpenAI): the completion window (`tether.schedule`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    completion_window: Literal["soonest", "2h", "8h"] | None = None
    # Accepted: OpenAI uses it to prioritise related requests; one queue here.
    continuation_id: StrictStr | None = None


# --- create ---------------------------------------------------------------------------------


class CreateRequest(BaseModel):
    """`POST /responses`, every field (what each does: `wire_fields.FIELDS`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: StrictStr
    input: StrictStr | list[InputItem]
    instructions: StrictStr | None = None
    previous_response_id: StrictStr | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    stream: StrictBool | None = False
    background: StrictBool | None = False
    store: StrictBool | None = True
    stream_options: dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    service_tier: StrictStr | None = None
    user: StrictStr | None = None
    safety_identifier: Annotated[str, Field(max_length=64, strict=True)] | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: StrictStr | None = None
    prompt_cache_options: dict[str, Any] | None = None
    max_tool_calls: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[StrictStr] | None = None
    reasoning: Reasoning | None = None
    context_management: list[dict[str, Any]] | None = None
    access_programs: dict[str, Any] | None = None
    background_options: BackgroundOptions | None = None
    image: dict[str, Any] | None = None
    client_metadata: dict[str, Any] | None = None
    tools: list[FunctionTool | CustomTool | NamespaceTool | McpTool] | None = None
    tool_choice: ToolChoice | None = None
    text: TextConfig | None = None
    # Refused unless null (wire_fields.REFUSED); typed loosely so a null passes.
    prompt: None = None
    moderation: None = None
    #: a conversation id, or `{"id": ...}` (checked by `parse_create`: `conversation_id`)
    conversation: StrictStr | dict[str, Any] | None = None
    #: derived at parse time: the tools as echoed and as engines get them
    _toolset: Toolset | None = None
    #: the body's forwardable fields (wire_fields.forwarded)
    _forward: dict[str, Any] | None = None

    def text_format(self) -> dict[str, Any] | None:
        """The `text.format` an engine must apply, or None for plain text."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        return fmt.model_dump(by_alias=True, exclude_none=True)

    def uses_tools(self) -> bool:
        return bool(self.tools) or self.tool_choice not in (None, "auto", "none")

    def toolset(self) -> Toolset:
        if self._toolset is None:
            self._toolset = wire_tools.toolset(self.tools, [])
        return self._toolset

    def engine_tool_choice(self) -> Any:
        """`tool_choice` as engines get it (tool names flattened)."""
        choice = self.tool_choice
        tools = self.toolset()
        labels = frozenset(s["label"] for s in tools.mcp)
        return (
            wire_tools.resolve_choice(choice, tools.names, labels)
            if isinstance(choice, BaseModel)
            else choice
        )

    def prewarm(self) -> bool:
        """`prompt_cache_options.prewarm`: prepare without generating (OpenAI: it sets
        `generate` to false)."""
        return bool((self.prompt_cache_options or {}).get("prewarm"))

    def forward(self) -> dict[str, Any]:
        return self._forward or {}

    def window(self) -> str:
        """The completion window: `soonest`, `2h` or `8h` (`tether.schedule`)."""
        options = self.background_options
        return (options.completion_window if options is not None else None) or "soonest"

    def conversation_id(self) -> str | None:
        """The conversation this response is a turn of (`tether.conversations`)."""
        value = self.conversation
        return value.get("id") if isinstance(value, dict) else value


def parse_create(body: Any, hosted_tools: HostedRule = "refuse") -> CreateRequest:
    """Validate a create body, naming the offending parameter in every refusal."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    for name in ("model", "input"):
        if body.get(name) is None:
            raise bad_request(
                f"Missing required parameter: '{name}'.", name, "missing_required_parameter"
            )
    for name, value in body.items():
        if name in wire_fields.REFUSED and value not in (None, "", [], {}):
            why = wire_fields.FIELDS[name].why
            raise bad_request(
                f"Parameter '{name}' is not supported by this server: {why}.",
                name,
                "unsupported_parameter",
            )
        if name not in CreateRequest.model_fields:
            raise bad_request(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
    fields = {k: v for k, v in body.items() if k not in wire_fields.REFUSED}
    dropped: list[str] = []
    try:
        if fields.get("tools") is not None:
            wire_tools.parse_tools(fields["tools"], hosted_tools)  # hosted: refused here
            dropped = wire_tools.dropped_types(fields["tools"])
            fields["tools"] = [
                t for t in fields["tools"] if not (isinstance(t, dict) and t.get("type") in dropped)
            ]
        req = CreateRequest.model_validate(fields)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if req.metadata is not None and len(req.metadata) > 16:
        raise bad_request("Invalid 'metadata': at most 16 keys.", "metadata", "invalid_value")
    if req.metadata is not None and any(len(k) > 64 for k in req.metadata):
        raise bad_request(
            "Invalid 'metadata': keys are at most 64 characters.", "metadata", "invalid_value"
        )
    _check_messages(req.input)
    _check_conversation(req)
    req._toolset = wire_tools.toolset(req.tools, dropped)
    req.engine_tool_choice()  # a named tool must be offered (OpenAI refuses it otherwise)
    _check_text_format(req)
    _check_window(req)
    req._forward = wire_fields.forwarded(body)
    return req


def _check_messages(items: str | list[Any]) -> None:
    """Roles and what they may carry: images only from the user, `phase` only on the
    assistant's turns (as both specs' item params define them)."""
    for i, msg in enumerate([] if isinstance(items, str) else items):
        if not isinstance(msg, InputMessage):
            continue
        if msg.phase is not None and msg.role != "assistant":
            raise bad_request(
                f"Invalid 'input[{i}].phase': only assistant messages have a phase.",
                f"input[{i}].phase",
                "invalid_value",
            )
        parts = [] if isinstance(msg.content, str) else msg.content
        for j, part in enumerate(parts):
            if isinstance(part, ImagePart) and msg.role != "user":
                raise bad_request(
                    f"Invalid 'input[{i}].content[{j}].type': images are only "
                    "accepted in user messages.",
                    f"input[{i}].content[{j}].type",
                    "invalid_value",
                )


def _check_window(req: CreateRequest) -> None:
    """OpenAI's rule: the `2h` and `8h` windows are for background responses that are not
    streamed (a stream would hold a connection open for hours)."""
    window = req.window()
    if window == "soonest":
        return
    param = "background_options.completion_window"
    if not req.background:
        raise bad_request(
            f"The '{window}' completion window requires 'background': true.",
            param,
            "invalid_value",
        )
    if req.stream:
        raise bad_request(
            f"The '{window}' completion window cannot be used with 'stream': true.",
            param,
            "invalid_value",
        )


def _check_conversation(req: CreateRequest) -> None:
    """`conversation`: an id or `{"id"}`; never with `previous_response_id` (OpenAI's
    400: the two are exclusive ways to give the context)."""
    value = req.conversation
    if value is None:
        return
    if isinstance(value, dict) and not (set(value) == {"id"} and isinstance(value["id"], str)):
        param = "conversation.id" if "id" not in value else "conversation"
        raise bad_request(
            "Invalid 'conversation': expected a conversation id or an object with its 'id'.",
            param,
            "invalid_value",
        )
    if not req.conversation_id():
        raise bad_request("Invalid 'conversation': empty id.", "conversation", "invalid_value")
    if req.previous_response_id is not None:
        raise bad_request(
            "Mutually exclusive parameters: Ensure you are only providing one of: "
            "'previous_response_id' or 'conversation'.",
            "conversation",
            "mutually_exclusive_parameters",
        )


def _check_text_format(req: CreateRequest) -> None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return
    for name, value in (("name", fmt.name), ("schema", fmt.schema_)):
        if value is None:
            raise bad_request(
                f"Missing required parameter: 'text.format.{name}'.",
                f"text.format.{name}",
                "missing_required_parameter",
            )


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
    tags = {"str", "bool", "int", "float", "dict", "list", "none", *ITEM_TYPES}
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
        raise bad_request(
            "Missing required parameter: 'model'.", "model", "missing_required_parameter"
        )
    for name in body:
        if name not in CompactRequest.model_fields:
            raise bad_request(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
    if body.get("input") is None and body.get("previous_response_id") is None:
        raise bad_request(
            "Missing required parameter: 'input' (or 'previous_response_id').",
            "input",
            "missing_required_parameter",
        )
    try:
        req = CompactRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_messages(req.input or [])
    return req


# --- stored items ------------------------------------------------------------------------


def input_items(req: CreateRequest | CompactRequest) -> list[dict[str, Any]]:
    """The request's input as stored items (what `GET .../input_items` lists)."""
    return stored_items(req.input)
