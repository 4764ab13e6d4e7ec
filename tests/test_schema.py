"""Every response and event tether emits validates against both specs.

(a) The official SDK's types: the `client` fixtures validate strictly, and every raw JSON
    object read off the wire is validated again with the SDK's models (`Response`, the
    `ResponseStreamEvent` union, `ResponseItem`, `Model`).
(b) The Open Responses OpenAPI document (`ResponseResource`, and for each event the
    streaming-event schema the `text/event-stream` oneOf of `POST /responses` maps its
    `type` to), resolved with a Draft 2020-12 registry built from the whole document.

Every field tether emits must be defined by at least one of the two specs, and every SSE
body is checked byte by byte against docs/contract.md §4.1 and §4.3.
"""

from __future__ import annotations

import json
import time
import typing
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import Model
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from openai.types.responses.response_item_list import ResponseItemList
from pydantic import BaseModel, TypeAdapter

import spec
from spec import (
    EVENT_SCHEMAS,
    RESOURCE,
    RESOURCE_FIELDS,
    STREAM_ONE_OF,
    spec_errors,
    spec_schema,
    spec_validator,
)

from conftest import Server, served, wait_for

MODEL = "scripted"
FAST_LENGTH = 50

# --- the Open Responses OpenAPI document (validators shared with other tests: `spec`) ---

# Re-exported: other test modules import these from here.
__all__ = [
    "EVENT_SCHEMAS",
    "RESOURCE",
    "RESOURCE_FIELDS",
    "STREAM_ONE_OF",
    "check_event",
    "check_response",
    "check_stream",
    "spec_errors",
    "spec_schema",
    "spec_validator",
]


# --- the official SDK's types -------------------------------------------------------------

EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
ITEM_ADAPTER: TypeAdapter[Any] = TypeAdapter(ResponseItem)
SDK_EVENT_CLASSES: dict[str, type[BaseModel]] = {}
for _cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0]):
    for _name in typing.get_args(_cls.model_fields["type"].annotation):
        SDK_EVENT_CLASSES[_name] = _cls


def undefined_fields(value: Any, path: str = "") -> list[str]:
    """Dotted paths of fields the SDK model does not define (kept as pydantic extras)."""
    if isinstance(value, BaseModel):
        found = [f"{path}{key}" for key in value.model_extra or {}]
        for name in type(value).model_fields:
            found += undefined_fields(getattr(value, name), f"{path}{name}.")
        return found
    if isinstance(value, list):
        return [f for v in value for f in undefined_fields(v, f"{path.rstrip('.')}[].")]
    return []


# --- checks -----------------------------------------------------------------------------


def check_response(obj: dict[str, Any]) -> Response:
    """A Response object: the SDK's model and ResponseResource; no field outside both."""
    model = Response.model_validate(obj)
    view = spec.open_responses_view(obj)  # OpenAI-only vocabulary: OpenAI's schema only
    assert not spec_errors(RESOURCE, view), spec_errors(RESOURCE, view)
    unknown = [f for f in undefined_fields(model) if f not in RESOURCE_FIELDS]
    assert not unknown, f"fields in neither spec: {unknown}"
    return model


def openai_event_fields(kind: str) -> set[str]:
    """The fields OpenAI's document gives an event of type `kind`."""
    name = spec.openai_event_pointers()[kind].rsplit("/", 1)[1]
    return set(spec._openai_doc()["components"]["schemas"][name]["properties"])


def check_event(event: dict[str, Any], one_of: bool = True) -> BaseModel:
    """One stream event: its SDK class and its Open Responses schema."""
    kind = event["type"]
    assert kind in SDK_EVENT_CLASSES, f"{kind} is not an SDK event type"
    SDK_EVENT_CLASSES[kind].model_validate(event)  # the clear error, if any
    model: BaseModel = EVENT_ADAPTER.validate_python(event, strict=False)
    assert type(model) is SDK_EVENT_CLASSES[kind]
    # Both documents' schemas of its type (OpenAI-only vocabulary: OpenAI's only).
    spec.check_event_schemas("check_event", kind, event)
    view = spec.open_responses_view(event)
    if view is None or kind in spec.OPENAI_ONLY_EVENTS:
        return model
    ours = spec.OPEN_RESPONSES_NAMES.get(kind, kind)  # named differently by the two
    view = {**view, "type": ours}
    _, fields = EVENT_SCHEMAS[ours]
    if one_of:
        # The whole oneOf, as a client without the discriminator sees it: one branch.
        assert not spec_errors(STREAM_ONE_OF, view), (kind, spec_errors(STREAM_ONE_OF, view))
    allowed = fields | openai_event_fields(kind) | {f"response.{f}" for f in RESOURCE_FIELDS}
    unknown = [f for f in undefined_fields(model) if f not in allowed]
    assert not unknown, f"{kind}: fields in neither spec: {unknown}"
    if "response" in event:
        check_response(event["response"])
    return model


def check_stream(events: list[dict[str, Any]], first_seq: int = 0) -> None:
    """Every event validates; sequence numbers are contiguous (contract §2.1)."""
    seen: set[str] = set()
    for event in events:
        # The whole oneOf is slow (24 branches): once per type is enough, since the
        # branches' `type` enums are disjoint (checked when the map is built).
        check_event(event, one_of=event["type"] not in seen)
        seen.add(event["type"])
    seqs = [e["sequence_number"] for e in events]
    assert seqs == list(range(first_seq, first_seq + len(events))), seqs
    if first_seq == 0 and events:
        # contract §2.2: created first, exactly one terminal event, last.
        assert events[0]["type"] == "response.created"
        terminal = [e["type"] for e in events if e["type"] in TERMINAL]
        assert terminal == [events[-1]["type"]], terminal


TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


class SSEReader:
    """Reads an SSE body frame by frame, checking the framing of every byte.

    contract §4.1: `event: <type>\\ndata: <one-line JSON>\\n\\n`, `\\n` line ends, no `id:`
    or `retry:`; comment lines (keepalives) allowed. contract §4.3: `data: [DONE]` last.
    """

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        self._chunks = response.iter_bytes()
        self._buf = b""
        self.raw = b""
        self.events: list[dict[str, Any]] = []
        self.done = False

    def _more(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self.raw += chunk
        self._buf += chunk
        return True

    def next(self) -> dict[str, Any] | None:
        """The next event, or None after `data: [DONE]` (then the body must end)."""
        assert not self.done
        while True:
            while b"\n\n" not in self._buf:
                assert self._more(), f"body ended without data: [DONE]: {self._buf!r}"
            frame, self._buf = self._buf.split(b"\n\n", 1)
            assert b"\r" not in frame, frame
            lines = frame.split(b"\n")
            assert all(lines), f"empty line inside a frame: {frame!r}"
            for line in lines:
                assert not line.startswith((b"id:", b"retry:")), frame
            if all(line.startswith(b":") for line in lines):
                continue  # a keepalive comment (contract §4.2)
            if lines == [b"data: [DONE]"]:
                while self._more():
                    pass
                assert self._buf == b"", f"bytes after [DONE]: {self._buf!r}"
                assert self.raw.endswith(b"data: [DONE]\n\n")
                self.done = True
                return None
            assert len(lines) == 2, f"expected event: and data: lines: {frame!r}"
            assert lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), frame
            event: dict[str, Any] = json.loads(lines[1][len(b"data: ") :])
            assert lines[0][len(b"event: ") :].decode() == event["type"], frame
            self.events.append(event)
            return event

    def until(self, predicate: Callable[[list[dict[str, Any]]], bool]) -> None:
        while not predicate(self.events):
            assert self.next() is not None, "stream ended first"

    def rest(self) -> list[dict[str, Any]]:
        while self.next() is not None:
            pass
        return self.events


def read_sse(response: httpx.Response) -> list[dict[str, Any]]:
    return SSEReader(response).rest()


def deltas(events: list[dict[str, Any]]) -> int:
    return sum(e["type"] == "response.output_text.delta" for e in events)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One scripted server for this module: 1000 tokens/s, 50 tokens per response."""
    with served(
        tmp_path_factory.mktemp("schema"),
        "--engine",
        "scripted",
        "--debug-routes",
        "--scripted-rate",
        "1000",
        "--scripted-length",
        str(FAST_LENGTH),
    ) as server:
        yield server


@pytest.fixture
def fast_client(fast: Server) -> Iterator[openai.OpenAI]:
    with fast.client() as c:
        yield c


@pytest.fixture
def http(fast: Server) -> Iterator[httpx.Client]:
    # Raw bytes for the checks below, and the specs' checks as they pass (`spec`).
    with httpx.Client(
        base_url=fast.base_url, timeout=10, transport=spec.HttpxValidatingTransport()
    ) as c:
        yield c


def get_json(http: httpx.Client, path: str) -> dict[str, Any]:
    r = http.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    data: dict[str, Any] = r.json()
    return data


def wait_terminal(http: httpx.Client, rid: str) -> dict[str, Any]:
    """Poll a background response, validating every live snapshot on the way."""

    def poll() -> dict[str, Any] | None:
        obj = get_json(http, f"/responses/{rid}")
        check_response(obj)
        return obj if obj["status"] not in ("queued", "in_progress") else None

    result: dict[str, Any] = wait_for(poll, what=f"{rid} to end")
    return result


def test_spec_maps_every_event_type_tether_emits() -> None:
    emitted = {
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
        "response.incomplete",
        "response.failed",
        "error",
    }
    assert emitted <= set(EVENT_SCHEMAS)
    assert emitted <= set(SDK_EVENT_CLASSES)


# --- the four create modes (contract §5.1) ---------------------------------------------


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_create_modes_validate(
    fast: Server, fast_client: openai.OpenAI, http: httpx.Client, stream: bool, background: bool
) -> None:
    body = {
        "model": MODEL,
        "input": "hello",
        "stream": stream,
        "background": background,
        "metadata": {"case": "modes"},
    }
    if stream:
        with http.stream("POST", "/responses", json=body) as r:
            events = read_sse(r)
        check_stream(events)
        kinds = [e["type"] for e in events]
        # contract §2.2
        assert events[0]["response"]["status"] == ("queued" if background else "in_progress")
        assert ("response.queued" in kinds) is background
        assert kinds[-1] == "response.completed"
        rid = events[0]["response"]["id"]
        final = get_json(http, f"/responses/{rid}")
        assert final == events[-1]["response"]
    else:
        r = http.post("/responses", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        first = r.json()
        check_response(first)
        assert first["status"] == ("queued" if background else "completed")
        final = wait_terminal(http, first["id"]) if background else first
    assert check_response(final).status == "completed"
    assert final["background"] is background
    assert final["metadata"] == {"case": "modes"}
    assert final["usage"]["output_tokens"] == FAST_LENGTH

    # The same mode through the strict SDK client: it must parse every object and event.
    if stream:
        sdk_events = list(
            fast_client.responses.create(
                model=MODEL, input="hello", stream=True, background=background
            )
        )
        assert sdk_events[-1].type == "response.completed"
        assert [e.sequence_number for e in sdk_events] == list(range(len(sdk_events)))
    else:
        created = fast_client.responses.create(model=MODEL, input="hello", background=background)
        assert created.status == ("queued" if background else "completed")


def test_incomplete_validates(fast_client: openai.OpenAI, http: httpx.Client) -> None:
    # contract §1.3
    body = {"model": MODEL, "input": "hello", "max_output_tokens": 5}
    with http.stream("POST", "/responses", json={**body, "stream": True}) as r:
        events = read_sse(r)
    check_stream(events)
    assert events[-1]["type"] == "response.incomplete"
    assert deltas(events) == 5
    r = http.post("/responses", json=body)
    final = check_response(r.json())
    assert final.status == "incomplete"
    assert final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete"  # type: ignore[union-attr]
    sdk = fast_client.responses.create(model=MODEL, input="hello", max_output_tokens=5)
    assert sdk.status == "incomplete" and sdk.usage is not None
    assert sdk.usage.output_tokens == 5


def test_cancelled_background_stream_validates(server: Server, client: openai.OpenAI) -> None:
    # contract §3.2, §3.4 — at the default 100 tokens/s, so the cancel lands mid-run
    body = {"model": MODEL, "input": "tell me a story", "background": True, "stream": True}
    with httpx.Client(
        base_url=server.base_url, timeout=10, transport=spec.HttpxValidatingTransport()
    ) as http:
        with http.stream("POST", "/responses", json=body) as r:
            reader = SSEReader(r)
            reader.until(lambda evs: deltas(evs) >= 3)
            rid = reader.events[0]["response"]["id"]
            raw = client.responses.with_raw_response.cancel(rid)
            reply = raw.parse()  # strict SDK parse
            reply_json = raw.http_response.json()
            events = reader.rest()
        check_response(reply_json)
        assert reply.status == "cancelled"
        check_stream(events)
        kinds = [e["type"] for e in events]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.failed",
        ]
        assert events[-2]["item"]["status"] == "incomplete"
        terminal = events[-1]["response"]
        assert terminal["status"] == "cancelled" and terminal["error"] is None
        assert "error" not in kinds
        assert terminal == reply_json

        # The log replays the same events (contract §2.4, §4.4).
        with http.stream("GET", f"/responses/{rid}", params={"stream": "true"}) as r:
            assert read_sse(r) == events
        retrieved = get_json(http, f"/responses/{rid}")
        check_response(retrieved)
        assert retrieved == reply_json
    replayed = list(client.responses.retrieve(rid, stream=True))  # strict SDK parse
    assert replayed[-1].type == "response.failed"
    assert replayed[-1].response.status == "cancelled"


def test_failed_validates(fast: Server, fast_client: openai.OpenAI, http: httpx.Client) -> None:
    # contract §6.1: the scripted engine raises after 3 tokens
    body = {"model": MODEL, "input": "please FAIL_AT=3 now", "stream": True}
    with http.stream("POST", "/responses", json=body) as r:
        events = read_sse(r)
    check_stream(events)
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["error", "response.failed"]
    assert kinds.count("error") == 1
    error = events[-2]
    # Both shapes: flat (OpenAI) and nested (Open Responses).
    assert error["code"] == "server_error" and error["param"] is None
    assert isinstance(error["message"], str) and error["message"]
    assert error["error"] == {
        "type": "server_error",
        "code": error["code"],
        "message": error["message"],
        "param": None,
    }
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": error["message"]}
    assert deltas(events) == 3
    assert failed["usage"]["output_tokens"] == 3
    retrieved = fast_client.responses.retrieve(failed["id"])  # strict SDK parse
    assert retrieved.error is not None and retrieved.error.code == "server_error"
    assert check_response(get_json(http, f"/responses/{failed['id']}")).status == "failed"

    # The SDK raises on the nested `error` key by design (contract §6.1).
    with pytest.raises(openai.APIError):
        for _ in fast_client.responses.create(model=MODEL, input="FAIL_AT=3", stream=True):
            pass
    # Without a stream, the failure is a 200 with a failed Response (not an HTTP error).
    sync = fast_client.responses.create(model=MODEL, input="FAIL_AT=3")
    assert sync.status == "failed" and sync.error is not None
    assert check_response(
        http.post("/responses", json={"model": MODEL, "input": "FAIL_AT=3"}).json()
    )


def test_replay_validates(fast_client: openai.OpenAI, http: httpx.Client) -> None:
    # contract §4.4
    body = {"model": MODEL, "input": "hello", "background": True, "stream": True}
    with http.stream("POST", "/responses", json=body) as r:
        events = read_sse(r)
    check_stream(events)
    rid = events[0]["response"]["id"]
    with http.stream("GET", f"/responses/{rid}", params={"stream": "true"}) as r:
        assert read_sse(r) == events
    with http.stream(
        "GET", f"/responses/{rid}", params={"stream": "true", "starting_after": "3"}
    ) as r:
        tail = read_sse(r)
    check_stream(tail, first_seq=4)
    assert tail == events[4:]
    sdk = list(fast_client.responses.retrieve(rid, stream=True, starting_after=3))
    assert [e.sequence_number for e in sdk] == list(range(4, len(events)))
    # The SDK's own resume helper replays from 0 and filters itself.
    with fast_client.responses.stream(response_id=rid, starting_after=3) as helper:
        helped = list(helper)
        final = helper.get_final_response()
    assert [e.sequence_number for e in helped] == list(range(4, len(events)))
    assert final.id == rid and final.status == "completed"


def test_replay_past_the_end_is_an_empty_stream(http: httpx.Client) -> None:
    # contract §4.4: nothing after N, and the response is over: just `data: [DONE]`, now.
    r = http.post("/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 2})
    rid = r.json()["id"]
    with http.stream("GET", f"/responses/{rid}", params={"stream": "true"}) as r:
        last = read_sse(r)[-1]["sequence_number"]
    started = time.monotonic()
    try:
        with http.stream(
            "GET",
            f"/responses/{rid}",
            params={"stream": "true", "starting_after": str(last)},
            timeout=3,
        ) as r:
            assert read_sse(r) == []
    except httpx.ReadTimeout:
        pytest.fail("a replay past the end of a finished response hung instead of ending")
    assert time.monotonic() - started < 2


# --- the other endpoints ----------------------------------------------------------------


def test_input_items_validate(fast_client: openai.OpenAI, http: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "input_text", "text": "no lists"}]},
        {"type": "message", "role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "again"}]},
    ]
    created = http.post(
        "/responses", json={"model": MODEL, "input": messages, "max_output_tokens": 2}
    ).json()
    rid = created["id"]
    for order in ("asc", "desc"):
        page = get_json(http, f"/responses/{rid}/input_items?order={order}")
        ResponseItemList.model_validate(page)
        assert page["object"] == "list" and page["has_more"] is False
        assert len(page["data"]) == len(messages)
        for item in page["data"]:
            ITEM_ADAPTER.validate_python(item, strict=False)
            assert item["type"] == "message" and item["id"]
        roles = [item["role"] for item in page["data"]]
        expected = [m["role"] for m in messages]
        assert roles == (expected if order == "asc" else expected[::-1])
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
    limited = get_json(http, f"/responses/{rid}/input_items?limit=2")
    ResponseItemList.model_validate(limited)
    assert len(limited["data"]) == 2 and limited["has_more"] is True
    # The strict SDK, following the cursor across pages.
    sdk_items = list(fast_client.responses.input_items.list(rid, limit=2, order="asc"))
    assert [i.role for i in sdk_items] == [m["role"] for m in messages]  # type: ignore[union-attr]


def test_models_validate(fast_client: openai.OpenAI, http: httpx.Client) -> None:
    page = get_json(http, "/models")
    assert page["object"] == "list" and page["data"]
    for model in page["data"]:
        Model.model_validate(model)
        one = get_json(http, f"/models/{model['id']}")
        assert Model.model_validate(one) == Model.model_validate(model)
    ids = [m.id for m in fast_client.models.list()]  # strict SDK parse
    assert MODEL in ids
    assert fast_client.models.retrieve(MODEL).id == MODEL
