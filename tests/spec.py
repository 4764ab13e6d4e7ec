"""The specs as validators, and an httpx transport that checks every reply against them.

- The Open Responses OpenAPI document (`ResponseResource`, `CompactResource`, and per
  event `type` the streaming-event schema that the `text/event-stream` oneOf of
  `POST /responses` maps it to), resolved with a Draft 2020-12 registry.
- OpenAI's OpenAPI document for what Open Responses does not define: the error body
  (`ErrorResponse`), `input_items` pages (`ResponseItemList`), models; and, for every
  event and Response, OpenAI's schema as well (`ResponseStreamEvent`'s member of the
  event's type, `Response`). OpenAI-only vocabulary (custom and namespace tools, custom
  tool calls and their events) is checked against OpenAI's document only.

`ValidatingTransport` / `AsyncValidatingTransport` (the `Server.client()` fixtures use
them) check every JSON body and every SSE event that tether sends to a test, as it
passes, and fail the test at once on a mismatch (and again at teardown, in case the
client turned the failure into an error a test expected).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

try:  # the openai SDK's transport layer: httpx2 from openai 3.x, httpx before that
    import httpx2 as sdk_http
except ImportError:  # scripts/test-openai2's venv (openai 2.x)
    sdk_http = httpx
import jsonschema_rs
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

# Vendored with their licences and sources (tests/data/spec/SOURCES.md): a clone stands alone.
SPEC_DIR = Path(__file__).resolve().parent / "data" / "spec"
SPEC_PATH = SPEC_DIR / "openresponses" / "openapi.json"
SPEC_URI = "urn:openresponses:openapi"
OPENAI_URI = "urn:openai:openapi"


def _with_errata(spec: dict[str, Any]) -> dict[str, Any]:
    """The published document's one known generator error, corrected.

    `JsonSchemaResponseFormat.schema` is `anyOf: [{type: null}]` in the generated
    openapi.json (the object branch was lost), which would make every echoed
    `text.format` of type json_schema invalid; the spec's source
    (schema/components/schemas/JsonSchemaResponseFormat.json upstream) and OpenAI's
    document both have `anyOf: [{type: object}, {type: null}]`."""
    fixed = copy.deepcopy(spec)
    prop = fixed["components"]["schemas"]["JsonSchemaResponseFormat"]["properties"]
    assert prop["schema"] == {"anyOf": [{"type": "null"}]}, "erratum fixed upstream: drop it"
    prop["schema"] = {"anyOf": [{"type": "object"}, {"type": "null"}]}
    return fixed


SPEC: dict[str, Any] = _with_errata(json.loads(SPEC_PATH.read_text()))
REGISTRY: Registry[Any] = Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(SPEC))
RESOLVER = REGISTRY.resolver(SPEC_URI)


def spec_validator(pointer: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{SPEC_URI}#{pointer}"}, registry=REGISTRY)


def spec_schema(pointer: str) -> dict[str, Any]:
    schema: dict[str, Any] = RESOLVER.lookup(f"#{pointer}").contents
    return schema


def spec_errors(validator: Draft202012Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"[:300]
        for e in validator.iter_errors(instance)
    ]


RESOURCE = spec_validator("/components/schemas/ResponseResource")
RESOURCE_FIELDS = set(spec_schema("/components/schemas/ResponseResource")["properties"])
RESOURCE_REQUIRED = spec_schema("/components/schemas/ResponseResource")["required"]
COMPACT_RESOURCE = spec_validator("/components/schemas/CompactResource")

# How the spec maps an event `type` to its schema: the `text/event-stream` oneOf of the
# 200 reply of POST /responses, one schema per type, told apart by `properties.type.enum`
# (the `discriminator` has no `mapping`).
STREAM_POINTER = "/paths/~1responses/post/responses/200/content/text~1event-stream/schema"
STREAM_ONE_OF = spec_validator(STREAM_POINTER)
EVENT_SCHEMAS: dict[str, tuple[Draft202012Validator, set[str]]] = {}
EVENT_POINTERS: dict[str, str] = {}
for _branch in spec_schema(STREAM_POINTER)["oneOf"]:
    _pointer = _branch["$ref"].removeprefix("#")
    _schema = spec_schema(_pointer)
    _type = _schema["properties"]["type"]
    for _name in _type.get("enum", [_type.get("const")]):
        assert _name not in EVENT_SCHEMAS, f"two streaming-event schemas for {_name}"
        EVENT_SCHEMAS[_name] = (spec_validator(_pointer), set(_schema["properties"]))
        EVENT_POINTERS[_name] = _pointer


# --- OpenAI's document (loaded once, when first needed: 3 MB of YAML) ---------------------


@functools.cache
def _openai_doc() -> dict[str, Any]:
    """The document as JSON (YAML dates, in examples, become strings, as the document
    means them). Parsing the YAML takes seconds: the JSON is cached in the temporary
    directory, by the YAML's hash, so each test process reads it in milliseconds."""
    source = (SPEC_DIR / "openai" / "openapi.yaml").read_bytes()
    cache = Path(tempfile.gettempdir()) / (
        f"tether-openai-openapi-{hashlib.sha256(source).hexdigest()[:16]}.json"
    )
    with contextlib.suppress(OSError, ValueError):
        cached: dict[str, Any] = json.loads(cache.read_bytes())
        return cached
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    text = json.dumps(yaml.load(source, Loader=loader), default=str)
    with contextlib.suppress(OSError):
        partial = cache.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(cache)  # atomic: a concurrent reader sees all of it or none
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _openai_registry() -> Registry[Any]:
    return Registry().with_resource(OPENAI_URI, DRAFT202012.create_resource(_openai_doc()))


@functools.cache
def openai_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"{OPENAI_URI}#/components/schemas/{name}"}, registry=_openai_registry()
    )


# --- the same documents, for the checks of every reply ------------------------------------
# jsonschema-rs (Draft 2020-12, the same registry of documents): about a hundred times
# faster than jsonschema, so that checking every event keeps the tests' timing (200
# concurrent streams in test_lifecycle_load) as it was.

_FAST_REGISTRY = jsonschema_rs.Registry([(SPEC_URI, SPEC)])


@functools.cache
def _fast_openai_registry() -> Any:
    return jsonschema_rs.Registry([(OPENAI_URI, _openai_doc())])


@functools.cache
def fast_validator(uri: str) -> Any:
    """A jsonschema-rs validator of `uri` (`SPEC_URI#/pointer` or `OPENAI_URI#/pointer`)."""
    registry = _FAST_REGISTRY if uri.startswith(SPEC_URI) else _fast_openai_registry()
    return jsonschema_rs.Draft202012Validator({"$ref": uri}, registry=registry)


def fast_errors(validator: Any, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}"[:300]
        for e in validator.iter_errors(instance)
    ]


# --- OpenAI's streaming events, and what Open Responses does not define ---------------------


@functools.cache
def openai_event_pointers() -> dict[str, str]:
    """Event `type` -> the pointer of its schema among the members of OpenAI's
    `ResponseStreamEvent` (each member's `properties.type.enum`)."""
    schemas = _openai_doc()["components"]["schemas"]
    found: dict[str, str] = {}
    for branch in schemas["ResponseStreamEvent"]["anyOf"]:
        name = branch["$ref"].rsplit("/", 1)[1]
        for kind in schemas[name]["properties"]["type"]["enum"]:
            found[kind] = f"{OPENAI_URI}#/components/schemas/{name}"
    return found


def openai_view(obj: dict[str, Any]) -> dict[str, Any]:
    """An event or a Response as OpenAI's document can check it: its errata, where the
    document contradicts OpenAI's own API and examples, corrected.

    - `Response.usage` is typed as an object, but a live response has none yet:
      OpenAI sends `"usage": null` (its own `response.created` examples do), as Open
      Responses requires. A null `usage` is left out of the check.
    - `text.format.description` of a `json_schema` format: a string, where OpenAI echoes
      null when none was given (and Open Responses requires the field, nullable).

    And Open Responses-only vocabulary, checked against Open Responses only: the
    `allowed_tools` mode `none` (OpenAI's has `auto` and `required`)."""
    response = (
        obj.get("response")
        if "response" in obj
        else (obj if obj.get("object") == "response" else None)
    )
    if not isinstance(response, dict):
        return obj
    trimmed = response
    if "usage" in response and response["usage"] is None:
        trimmed = {k: v for k, v in response.items() if k != "usage"}
    fmt = (response.get("text") or {}).get("format") or {}
    if "description" in fmt and fmt["description"] is None:
        trimmed = {
            **trimmed,
            "text": {
                **response["text"],
                "format": {k: v for k, v in fmt.items() if k != "description"},
            },
        }
    choice = response.get("tool_choice")
    if isinstance(choice, dict) and choice.get("mode") == "none":
        trimmed = {**trimmed, "tool_choice": {**choice, "mode": "auto"}}
    if trimmed is response:
        return obj
    return {**obj, "response": trimmed} if "response" in obj else trimmed


# OpenAI-only vocabulary (custom tools, namespaces): Open Responses defines neither tool
# type nor the `custom_tool_call` item and its events. They are checked against OpenAI's
# document only; the rest of the same object against both.
# MCP (`mcp` tools, their items and events) is OpenAI's vocabulary too.
OPENAI_ONLY_EVENTS = frozenset(
    {
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.mcp_call.failed",
        "response.mcp_list_tools.in_progress",
        "response.mcp_list_tools.completed",
        "response.mcp_list_tools.failed",
    }
)
OPENAI_ONLY_ITEMS = frozenset(
    {
        "custom_tool_call",
        "custom_tool_call_output",
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
    }
)
# Events the two documents name differently, with the same fields: tether sends OpenAI's
# name (what the SDKs read); the Open Responses check uses its own name's schema.
OPEN_RESPONSES_NAMES = {
    "response.reasoning_text.delta": "response.reasoning.delta",
    "response.reasoning_text.done": "response.reasoning.done",
}


def open_responses_view(obj: dict[str, Any]) -> dict[str, Any] | None:
    """`obj` (an event or a Response) without the OpenAI-only vocabulary, for the Open
    Responses check; None when nothing of it is Open Responses' to check."""
    item = obj.get("item")
    if isinstance(item, dict) and item.get("type") in OPENAI_ONLY_ITEMS:
        return None
    response = (
        obj.get("response")
        if "response" in obj
        else (obj if obj.get("object") == "response" else None)
    )
    if not isinstance(response, dict) or not _has_openai_only(response):
        return obj
    trimmed = {
        **response,
        "tools": [t for t in response["tools"] if t.get("type") == "function"],
        "output": [i for i in response["output"] if i.get("type") not in OPENAI_ONLY_ITEMS],
    }
    choice = response.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "custom":
        trimmed["tool_choice"] = {"type": "function", "name": choice["name"]}
    elif isinstance(choice, dict) and choice.get("type") == "mcp":
        trimmed["tool_choice"] = "required"  # (an MCP server's tool: OpenAI's vocabulary)
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        trimmed["tool_choice"] = {
            **choice,
            "tools": [
                {"type": "function", "name": t.get("name")} for t in choice.get("tools") or []
            ],
        }
    return {**obj, "response": trimmed} if "response" in obj else trimmed


def _has_openai_only(response: dict[str, Any]) -> bool:
    choice = response.get("tool_choice")
    return (
        any(t.get("type") != "function" for t in response.get("tools") or [])
        or any(i.get("type") in OPENAI_ONLY_ITEMS for i in response.get("output") or [])
        or (
            isinstance(choice, dict)
            and (
                choice.get("type") == "custom"
                or any(t.get("type") == "custom" for t in choice.get("tools") or [])
            )
        )
    )


# `DELETE /responses/{id}`: OpenAI's document gives the 200 no schema; this is its shape.
DELETED = jsonschema_rs.Draft202012Validator(
    {
        "type": "object",
        "required": ["id", "object", "deleted"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "deleted": {"const": True},
        },
    }
)


# --- what each reply must be ----------------------------------------------------------------

_RESPONSE = re.compile(r"^/v1/responses/(?!compact$)[^/]+$")
_CANCEL = re.compile(r"^/v1/responses/[^/]+/cancel$")
_ITEMS = re.compile(r"^/v1/responses/[^/]+/input_items$")
_CONVERSATION = re.compile(r"^/v1/conversations/[^/]+$")
_CONVERSATION_ITEMS = re.compile(r"^/v1/conversations/[^/]+/items$")
_CONVERSATION_ITEM = re.compile(r"^/v1/conversations/[^/]+/items/[^/]+$")


def body_schema(method: str, path: str, status: int) -> str | None:
    """The name of the schema of a JSON reply, or None for routes neither spec defines."""
    if not path.startswith("/v1/"):
        return None
    if status >= 400:
        return "ErrorResponse"
    if method == "POST" and path == "/v1/responses/compact":
        return "CompactResource"
    if (
        (method == "POST" and path == "/v1/responses")
        or (method == "GET" and _RESPONSE.match(path))
        or (method == "POST" and _CANCEL.match(path))
    ):
        return "ResponseResource"
    if method == "DELETE" and _RESPONSE.match(path):
        return "DeletedResponse"
    if method == "GET" and _ITEMS.match(path):
        return "ResponseItemList"
    # The Conversations API: OpenAI's document only (Open Responses has none).
    if (method == "POST" and path == "/v1/conversations") or (
        method in ("GET", "POST") and _CONVERSATION.match(path)
    ):
        return "ConversationResource"
    if method == "DELETE" and _CONVERSATION.match(path):
        return "DeletedConversationResource"
    if _CONVERSATION_ITEMS.match(path):
        return "ConversationItemList"
    if _CONVERSATION_ITEM.match(path):
        return "ConversationItem" if method == "GET" else "ConversationResource"
    if method == "GET" and path == "/v1/models":
        return "ListModelsResponse"
    if method == "GET" and path.startswith("/v1/models/"):
        return "Model"
    return None


def body_validator(name: str) -> Any:
    """The (fast) validator of a reply schema named by `body_schema`."""
    if name == "DeletedResponse":
        return DELETED
    if name in ("ResponseResource", "CompactResource"):
        return fast_validator(f"{SPEC_URI}#/components/schemas/{name}")
    return fast_validator(f"{OPENAI_URI}#/components/schemas/{name}")


class SpecViolation(AssertionError):
    pass


#: every violation seen in this test (the conftest fixture fails the test at teardown)
VIOLATIONS: list[str] = []
#: what was checked, by schema name and by event type (so a test can tell it was)
CHECKED: Counter[str] = Counter()


def violation(message: str) -> SpecViolation:
    VIOLATIONS.append(message)
    return SpecViolation(message)


class BodyCheck:
    """Collects a JSON body as it passes; checks it once it is complete."""

    def __init__(self, where: str, schema: str) -> None:
        self.where = where
        self.schema = schema
        self.chunks: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def end(self) -> None:
        try:
            body = json.loads(b"".join(self.chunks))
        except ValueError:
            raise violation(f"{self.where}: the body is not JSON") from None
        view = open_responses_view(body) if self.schema == "ResponseResource" else body
        if self.schema.endswith("ItemList") and body.get("data") == []:
            # An empty page's `first_id`/`last_id` are null (as OpenAI answers them);
            # the document types them as strings.
            view = {**body, "first_id": "", "last_id": ""}
        errors = fast_errors(body_validator(self.schema), view)
        if self.schema == "ResponseResource":  # and OpenAI's Response
            errors += fast_errors(
                fast_validator(f"{OPENAI_URI}#/components/schemas/Response"), openai_view(body)
            )
        if errors:
            raise violation(f"{self.where}: not a {self.schema}: {errors[:5]}")
        CHECKED[self.schema] += 1


class SSECheck:
    """Checks an SSE body frame by frame as it passes: `event:` equals the JSON `type`,
    each event validates against its streaming-event schema, sequence numbers go up by
    one, and `data: [DONE]` ends the body (when it ends by itself)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.buf = b""
        self.last_seq: int | None = None
        self.done = False

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        while b"\n\n" in self.buf:
            frame, self.buf = self.buf.split(b"\n\n", 1)
            self._frame(frame)

    def _frame(self, frame: bytes) -> None:
        lines = frame.split(b"\n")
        if all(line.startswith(b":") for line in lines):
            return  # a keepalive comment
        if self.done:
            raise violation(f"{self.where}: a frame after data: [DONE]: {frame[:200]!r}")
        if lines == [b"data: [DONE]"]:
            self.done = True
            CHECKED["[DONE]"] += 1
            return
        if (
            len(lines) != 2
            or not lines[0].startswith(b"event: ")
            or not lines[1].startswith(b"data: ")
        ):
            raise violation(f"{self.where}: not an `event:` + `data:` frame: {frame[:200]!r}")
        try:
            event = json.loads(lines[1][6:])
        except ValueError:
            raise violation(f"{self.where}: data is not JSON: {frame[:200]!r}") from None
        self._event(lines[0][7:].decode(), event)

    def _event(self, name: str, event: Any) -> None:
        kind = event.get("type") if isinstance(event, dict) else None
        if name != kind:
            raise violation(f"{self.where}: event name {name!r} is not the type {kind!r}")
        check_event_schemas(self.where, kind, event)
        seq = event["sequence_number"]
        if self.last_seq is not None and seq != self.last_seq + 1:
            raise violation(f"{self.where}: sequence {seq} after {self.last_seq}")
        self.last_seq = seq
        CHECKED[kind] += 1

    def end(self) -> None:
        if self.buf.strip() or not self.done:
            raise violation(
                f"{self.where}: the body ended without data: [DONE] ({self.buf[:200]!r} left)"
            )


def check_event_schemas(where: str, kind: Any, event: dict[str, Any]) -> None:
    """An event against Open Responses' schema of its type (OpenAI-only vocabulary left
    out) and OpenAI's (`ResponseStreamEvent`'s member of its type)."""
    ours = OPEN_RESPONSES_NAMES.get(kind, kind)
    if ours not in EVENT_SCHEMAS and kind not in OPENAI_ONLY_EVENTS:
        raise violation(f"{where}: {kind!r} is not an Open Responses event")
    view = None if kind in OPENAI_ONLY_EVENTS else open_responses_view(event)
    if view is not None:
        if ours != kind:
            view = {**view, "type": ours}
        errors = fast_errors(fast_validator(f"{SPEC_URI}#{EVENT_POINTERS[ours]}"), view)
        if errors:
            raise violation(f"{where}: {kind}: {errors[:5]}")
    pointer = openai_event_pointers().get(kind)
    if pointer is None:
        raise violation(f"{where}: {kind!r} is not an OpenAI event")
    errors = fast_errors(fast_validator(pointer), openai_view(event))
    if errors:
        raise violation(f"{where}: {kind} (OpenAI): {errors[:5]}")
    CHECKED[f"openai:{kind}"] += 1


Check = BodyCheck | SSECheck


def check_for(request: Any, response: Any) -> Check | None:
    """The check of a reply (an httpx or httpx2 request and response), if any applies."""
    if request.method == "HEAD" or response.status_code in (204, 304):
        return None
    where = f"{request.method} {request.url.path} -> {response.status_code}"
    kind = response.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        return SSECheck(where) if request.url.path.startswith("/v1/") else None
    if not kind.startswith("application/json"):
        return None
    schema = body_schema(request.method, request.url.path, response.status_code)
    return None if schema is None else BodyCheck(where, schema)


#: ports of the tether servers the tests started (`conftest.Server` registers them):
#: every reply from one of them is checked, whatever client the test used (`install`)
TETHER_PORTS: set[int] = set()
# Set on a request a `ValidatingTransport` checks, so that the hook does not check it twice.
_MARK = "tether.spec_checked"


class _Streams:
    """The lib's byte-stream types that pass a body through a check unchanged, as
    incremental as before. Only a body read to its end is checked whole (a client may
    stop reading early; a body cut by a dying server raises before its end)."""

    def __init__(self, lib: Any) -> None:
        class Checked(lib.SyncByteStream):  # type: ignore[misc, name-defined]
            def __init__(self, stream: Any, check: Check) -> None:
                self.stream = stream
                self.check = check

            def __iter__(self) -> Iterator[bytes]:
                for chunk in self.stream:
                    self.check.feed(chunk)
                    yield chunk
                self.check.end()

            def close(self) -> None:
                self.stream.close()

        class AsyncChecked(lib.AsyncByteStream):  # type: ignore[misc, name-defined]
            def __init__(self, stream: Any, check: Check) -> None:
                self.stream = stream
                self.check = check

            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in self.stream:
                    self.check.feed(chunk)
                    yield chunk
                self.check.end()

            async def aclose(self) -> None:
                await self.stream.aclose()

        self.sync = Checked
        self.async_ = AsyncChecked

    def wrap(self, request: Any, response: Any, is_async: bool) -> Any:
        check = check_for(request, response)
        if check is not None:
            response.stream = (self.async_ if is_async else self.sync)(response.stream, check)
        return response


def _transports(lib: Any) -> tuple[type[Any], type[Any]]:
    """Transports for `lib` (httpx2, the openai SDK's; or httpx) that check every reply,
    from any server (tests of the checks use mock transports)."""
    streams = _Streams(lib)

    class Transport(lib.BaseTransport):  # type: ignore[misc, name-defined]
        def __init__(self, inner: Any = None) -> None:
            self.inner = inner or lib.HTTPTransport()

        def handle_request(self, request: Any) -> Any:
            request.extensions[_MARK] = True
            return streams.wrap(request, self.inner.handle_request(request), False)

        def close(self) -> None:
            self.inner.close()

    class AsyncTransport(lib.AsyncBaseTransport):  # type: ignore[misc, name-defined]
        def __init__(self, inner: Any = None) -> None:
            self.inner = inner or lib.AsyncHTTPTransport()

        async def handle_async_request(self, request: Any) -> Any:
            request.extensions[_MARK] = True
            response = await self.inner.handle_async_request(request)
            return streams.wrap(request, response, True)

        async def aclose(self) -> None:
            await self.inner.aclose()

    return Transport, AsyncTransport


#: for the SDK (`openai.DefaultHttpxClient(transport=ValidatingTransport())`) and httpx2
ValidatingTransport, AsyncValidatingTransport = _transports(sdk_http)
#: for tests that speak raw httpx (`httpx.Client(transport=HttpxValidatingTransport())`)
HttpxValidatingTransport, HttpxAsyncValidatingTransport = _transports(httpx)


def install() -> None:
    """Check every reply of a tether server the tests started, whatever the client: the
    HTTP transports of httpx and httpx2 (the SDK's) pass them through the checks. Once
    per process; replies of other servers (fake upstreams, cutting proxies) pass as is.
    OpenAI's document is loaded now, not in the middle of a timed test."""
    _fast_openai_registry()
    for lib in {httpx, sdk_http}:
        streams = _Streams(lib)
        sync, async_ = lib.HTTPTransport, lib.AsyncHTTPTransport
        if getattr(sync.handle_request, "_spec_hook", False):
            continue

        def ours(request: Any) -> bool:
            return request.url.port in TETHER_PORTS and not request.extensions.get(_MARK)

        def hooked(original: Any, streams: _Streams = streams) -> Any:
            def handle_request(self: Any, request: Any) -> Any:
                response = original(self, request)
                return streams.wrap(request, response, False) if ours(request) else response

            handle_request._spec_hook = True  # type: ignore[attr-defined]
            return handle_request

        def async_hooked(original: Any, streams: _Streams = streams) -> Any:
            async def handle_async_request(self: Any, request: Any) -> Any:
                response = await original(self, request)
                return streams.wrap(request, response, True) if ours(request) else response

            return handle_async_request

        sync.handle_request = hooked(sync.handle_request)
        async_.handle_async_request = async_hooked(async_.handle_async_request)
