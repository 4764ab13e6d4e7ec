"""Input items: their models, the items tether stores, and the turns engines are given.

Every item type of the spec round-trips (docs/fields.md, "Input items"): messages (text,
images, text files, refusals), function and custom tool calls and their outputs (a string
or content parts), reasoning items (the thinking of the assistant turn that follows them:
their `encrypted_content` when tether sealed it, else their `content` and `summary` as
given), item references (resolved by the lifecycle from stored items), compaction items.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    StrictStr,
    Tag,
    field_validator,
    model_validator,
)

from tether import compact, mcp_tools, turns
from tether.errors import bad_request
from tether.mcp_tools import (
    McpApprovalRequestInput,
    McpApprovalResponseInput,
    McpCallInput,
    McpListToolsInput,
)
from tether.turns import Message, Thought, ToolCallSpec
from tether.wire_tools import flat_name

# Item types an input list may hold; anything else is validated as a message (and its
# `type` refused there, naming `input[i].type`).
ITEM_TYPES = (
    "message",
    "function_call",
    "function_call_output",
    "compaction",
    "custom_tool_call",
    "custom_tool_call_output",
    "reasoning",
    "item_reference",
    *mcp_tools.INPUT_PREFIXES,
)
# What engines that cannot see images read where an image was.
IMAGE_PLACEHOLDER = "[image omitted: this model cannot see images]"
# Files whose bytes are text (given to the model as text); by MIME type, else by name.
_TEXT_TYPES = (
    "text/",
    "application/json",
    "application/xml",
    "application/yaml",
    "application/x-yaml",
    "application/javascript",
    "application/x-sh",
    "application/toml",
    "application/sql",
)
_TEXT_SUFFIXES = (
    ".txt",
    ".md",
    ".json",
    ".csv",
    ".tsv",
    ".xml",
    ".yaml",
    ".yml",
    ".toml",
    ".py",
    ".js",
    ".ts",
    ".rs",
    ".go",
    ".java",
    ".c",
    ".h",
    ".cpp",
    ".sh",
    ".html",
    ".css",
    ".sql",
    ".log",
    ".ini",
    ".cfg",
    ".rst",
    ".jsonl",
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


# --- content parts ----------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["input_text", "output_text"]
    text: StrictStr


class RefusalPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["refusal"]
    refusal: StrictStr


class ImagePart(BaseModel):
    """An image by URL or data URL; tether never fetches a URL (no network at run time)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["input_image"]
    image_url: StrictStr
    detail: Literal["low", "high", "auto", "original"] | None = None

    @field_validator("image_url")
    @classmethod
    def _url(cls, url: str) -> str:
        if not url.startswith(("data:image/", "https://", "http://")):
            raise ValueError("expected an http(s) URL or a data:image/... URL")
        return url


class FilePart(BaseModel):
    """A file given inline whose bytes are text (its text goes to the model). A file by
    id or URL, or a binary one, is refused: tether has no files API, fetches nothing,
    and would otherwise drop the file silently."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["input_file"]
    file_data: StrictStr | None = None
    filename: StrictStr | None = None
    file_id: None = None
    file_url: None = None
    detail: StrictStr | None = None

    @model_validator(mode="after")
    def _text(self) -> FilePart:
        if self.file_data is None:
            raise ValueError("only files given inline as text in 'file_data' are supported")
        file_text(self.file_data, self.filename)  # raises ValueError when not text
        return self


def file_text(data: str, filename: str | None) -> str:
    """The text of inline file data: a data URL of a text type, or base64 of a file whose
    name says it is text."""
    if data.startswith("data:"):
        head, sep, payload = data.partition(",")
        mime = head[5:].split(";")[0].lower()
        if not sep or not mime.startswith(_TEXT_TYPES):
            raise ValueError(
                f"file type {mime or 'unknown'!r} is not text; only text files are supported"
            )
        raw = _b64(payload) if head.endswith(";base64") else payload.encode()
    elif filename and filename.lower().endswith(_TEXT_SUFFIXES):
        raw = _b64(data)
    else:
        raise ValueError(
            "expected a data URL of a text type (data:text/plain;base64,...) or "
            "base64 with a text filename"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the file is not UTF-8 text") from None


def _b64(payload: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("file_data is not valid base64") from None


def _part_type(part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    # Tags with a `-`: `_is_type_tag` drops them from error locations.
    return {"input_image": "image-part", "input_file": "file-part", "refusal": "refusal-part"}.get(
        kind if isinstance(kind, str) else "", "text-part"
    )


Part = Annotated[
    Annotated[ContentPart, Tag("text-part")]
    | Annotated[ImagePart, Tag("image-part")]
    | Annotated[FilePart, Tag("file-part")]
    | Annotated[RefusalPart, Tag("refusal-part")],
    Discriminator(_part_type),
]


# --- items ------------------------------------------------------------------------------------


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
    namespace: StrictStr | None = None
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionCallOutputInput(BaseModel):
    """The output of a function call (a string, or text/image/file parts)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | list[Part]
    id: StrictStr | None = None
    status: StrictStr | None = None


class CustomToolCallInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["custom_tool_call"]
    call_id: StrictStr
    name: StrictStr
    input: StrictStr
    namespace: StrictStr | None = None
    id: StrictStr | None = None
    status: StrictStr | None = None


class CustomToolCallOutputInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["custom_tool_call_output"]
    call_id: StrictStr
    output: StrictStr | list[Part]
    id: StrictStr | None = None


class ReasoningInput(BaseModel):
    """A reasoning item from an earlier turn (kept as given). Its `encrypted_content`, when
    set, must be one tether sealed (`include: ["reasoning.encrypted_content"]`): checked
    here, so an altered or foreign one is refused (400, `input[i].encrypted_content`)
    before anything runs."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["reasoning"]
    summary: list[dict[str, Any]]
    id: StrictStr | None = None
    content: list[dict[str, Any]] | None = None
    encrypted_content: StrictStr | None = None
    status: StrictStr | None = None

    @field_validator("encrypted_content")
    @classmethod
    def _sealed(cls, token: str | None) -> str | None:
        if token is not None:
            Thought.unseal(token)
        return token


class ItemReference(BaseModel):
    """An earlier item by id (`type` may be omitted, as Open Responses allows)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["item_reference"] | None = "item_reference"
    id: StrictStr


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
    if isinstance(item, dict):
        kind = item.get("type")
        if kind is None and "role" not in item and "id" in item:
            return "item_reference"
    else:
        kind = getattr(item, "type", None)
    return kind if kind in ITEM_TYPES else "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallInput, Tag("function_call")]
    | Annotated[FunctionCallOutputInput, Tag("function_call_output")]
    | Annotated[CustomToolCallInput, Tag("custom_tool_call")]
    | Annotated[CustomToolCallOutputInput, Tag("custom_tool_call_output")]
    | Annotated[ReasoningInput, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")]
    | Annotated[CompactionInput, Tag("compaction")]
    | Annotated[McpApprovalResponseInput, Tag("mcp_approval_response")]
    | Annotated[McpApprovalRequestInput, Tag("mcp_approval_request")]
    | Annotated[McpCallInput, Tag("mcp_call")]
    | Annotated[McpListToolsInput, Tag("mcp_list_tools")],
    Discriminator(_item_type),
]


# --- stored items -----------------------------------------------------------------------------


def stored_items(items: str | list[Any] | None) -> list[dict[str, Any]]:
    """The request's input as stored items (what `GET .../input_items` lists). An item
    reference stays `{"type": "item_reference", "id"}` until the lifecycle resolves it."""
    if items is None:
        return []
    if isinstance(items, str):
        return [_message_item(InputMessage(role="user", content=items))]
    return [_stored(item) for item in items]


def _stored(item: Any) -> dict[str, Any]:
    if isinstance(item, InputMessage):
        return _message_item(item)
    if isinstance(item, ItemReference):
        return {"type": "item_reference", "id": item.id}
    prefix = {
        "function_call": "fc",
        "function_call_output": "fco",
        "compaction": "cmp",
        "custom_tool_call": "ctc",
        "custom_tool_call_output": "ctco",
        "reasoning": "rs",
        **mcp_tools.INPUT_PREFIXES,
    }[item.type]
    stored: dict[str, Any] = item.model_dump(exclude_none=True)
    stored["id"] = item.id or new_id(prefix)
    if isinstance(item, FunctionCallOutputInput | CustomToolCallOutputInput) and not isinstance(
        item.output, str
    ):
        stored["output"] = [_part(p, "user") for p in item.output]
    if item.type in ("function_call", "function_call_output", "custom_tool_call"):
        stored["status"] = "completed"
    return stored


def _message_item(msg: InputMessage) -> dict[str, Any]:
    parts = (
        [ContentPart(type="input_text", text=msg.content)]
        if isinstance(msg.content, str)
        else msg.content
    )
    item = {
        "id": new_id("msg"),
        "type": "message",
        "role": msg.role,
        "content": [_part(p, msg.role) for p in parts],
        "status": "completed",
    }
    if msg.phase is not None:
        item["phase"] = msg.phase
    return item


def _part(part: Any, role: str) -> dict[str, Any]:
    if isinstance(part, ImagePart):
        return {"type": "input_image", "image_url": part.image_url, "detail": part.detail or "auto"}
    if isinstance(part, FilePart | RefusalPart):
        return part.model_dump(exclude_none=True)
    if role == "assistant":
        # Stored as the SDK's item types: assistant turns are output messages.
        return {"type": "output_text", "text": part.text, "annotations": [], "logprobs": []}
    return {"type": "input_text", "text": part.text}


# --- the turns a run is given -----------------------------------------------------------------


def parts_text(parts: list[dict[str, Any]]) -> str:
    """Parts as text: an image is a placeholder (engines that see images get the image
    itself through the turn's `parts`), a text file its name and text."""
    texts = []
    for part in parts:
        kind = part.get("type")
        if kind == "input_image":
            texts.append(f"\n{IMAGE_PLACEHOLDER}\n")
        elif kind == "input_file":
            name = part.get("filename") or "file"
            texts.append(f"\n[{name}]\n{file_text(part['file_data'], part.get('filename'))}\n")
        elif kind == "refusal":
            texts.append(part.get("refusal", ""))
        else:
            texts.append(part.get("text", ""))
    text = "".join(texts)
    return (
        text.strip("\n")
        if any(p.get("type") in ("input_image", "input_file") for p in parts)
        else text
    )


def item_text(item: dict[str, Any]) -> str:
    return parts_text(item.get("content", []))


def _parts(item: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"type": "image", "url": p["image_url"], "detail": p.get("detail", "auto")}
        if p.get("type") == "input_image"
        else {"type": "text", "text": parts_text([p])}
        for p in item.get("content", [])
    ]


def _output_text(output: str | list[dict[str, Any]]) -> str:
    return output if isinstance(output, str) else parts_text(output)


def history(items: list[dict[str, Any]]) -> list[Message]:
    """Stored items (input items, or a previous response's output) as the turns a run
    is given: an assistant turn carries the tool calls it made (`tool_calls`), a `tool`
    turn a call's output (`call_id`), a turn with images its `parts`. A compaction item
    is the conversation it carries. A reasoning item is the thinking of the assistant turn
    it precedes (`Message.reasoning`); one that no assistant turn follows (a reply that
    never came) is left out: a chat message cannot carry thinking alone."""
    out: list[Message] = []
    thoughts: list[Thought] = []  # reasoning items waiting for their assistant turn
    for item in items:
        kind = item.get("type")
        if kind == "reasoning":
            thoughts.append(thought_of(item))
            continue
        if kind == "message":
            images = any(p.get("type") == "input_image" for p in item.get("content", []))
            out.append(
                Message(item["role"], item_text(item), parts=_parts(item) if images else None)
            )
        elif kind in ("function_call", "custom_tool_call"):
            arguments = (
                item["arguments"]
                if kind == "function_call"
                else orjson.dumps({"input": item["input"]}).decode()
            )
            call = ToolCallSpec(
                item["call_id"], flat_name(item.get("namespace"), item["name"]), arguments
            )
            if not out or out[-1].role != "assistant":
                out.append(Message("assistant", ""))
            out[-1].tool_calls.append(call)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out.append(Message("tool", _output_text(item["output"]), call_id=item["call_id"]))
        elif kind == "mcp_call":  # a call the server made: the call, then its result
            call = ToolCallSpec(
                item["id"], flat_name(item["server_label"], item["name"]), item["arguments"]
            )
            if not out or out[-1].role != "assistant":
                out.append(Message("assistant", ""))
            out[-1].tool_calls.append(call)
            out.append(Message("tool", mcp_tools.output_text(item), call_id=item["id"]))
        elif kind == "compaction":
            out += turns.decode(compact.unseal(item["encrypted_content"]))
        if thoughts and out and out[-1].role == "assistant":
            out[-1].reasoning += thoughts
        thoughts = []
    return out


def thought_of(item: dict[str, Any]) -> Thought:
    """A reasoning item's thinking: what tether sealed in its `encrypted_content`, else
    its `content` and `summary` as given. (A request's tokens were checked when it was
    parsed; a stored item's may predate a new install key: its content is the same.)"""
    token = item.get("encrypted_content")
    if isinstance(token, str):
        with contextlib.suppress(ValueError):
            return Thought.unseal(token)
    text = "".join(p.get("text", "") for p in item.get("content") or () if isinstance(p, dict))
    summary = [p.get("text", "") for p in item.get("summary") or () if isinstance(p, dict)]
    return Thought(text, summary)


async def resolve_references(
    items: list[dict[str, Any]], previous_id: str | None, get: Callable[[str], Awaitable[Any]]
) -> list[dict[str, Any]]:
    """Item references replaced by the items they name: this request's own items, then
    the items of the previous responses (input and output; `get(id)` reads a stored
    response of the tenant), newest first. One that names nothing is refused."""
    wanted = {i["id"] for i in items if i.get("type") == "item_reference"}
    if not wanted:
        return items
    found = {i["id"]: i for i in items if i.get("id") in wanted and i["type"] != "item_reference"}
    hops = 0
    while previous_id is not None and wanted - found.keys() and hops < 1000:
        prev = await get(previous_id)
        if prev is None:
            break
        for item in prev.input_items + prev.snapshot["output"]:
            if item.get("id") in wanted:
                found.setdefault(item["id"], item)
        previous_id, hops = prev.snapshot.get("previous_response_id"), hops + 1
    return _resolve(items, found)


def _resolve(items: list[dict[str, Any]], found: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, item in enumerate(items):
        if item.get("type") == "item_reference":
            target = found.get(item["id"])
            if target is None:
                raise bad_request(
                    f"Item with id '{item['id']}' not found.", f"input[{i}].id", "item_not_found"
                )
            item = target
        out.append(item)
    return out
