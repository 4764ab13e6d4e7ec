"""WebSocket mode on /v1/responses, with the `websockets` client against `tether serve`.

Open Responses 2026-04-24 "WebSocket Transport": the same events as SSE, one response in
flight per connection, continuation (a store:false response only on its own socket),
error envelopes that keep the socket open, the 60-minute limit; and tether's cancel
contract (docs/contract.md §3-§4) over the socket. Every message received is validated against
the spec (streaming-event schemas and the SDK's types, or WebSocketErrorEvent).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tether.engines.scripted import scripted_text

from conftest import Server, raw_events, wait_for
from test_schema import check_event, spec_errors, spec_validator

MODEL = "scripted"
LENGTH = 20  # tokens of a fast server's response
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
CREATE_EVENT = spec_validator("/components/schemas/WebSocketResponseCreateEvent")
ERROR_EVENT = spec_validator("/components/schemas/WebSocketErrorEvent")


class Socket:
    """A client connection that validates every message it receives: error envelopes
    (`status`, no `sequence_number`) go to `errors`, stream events to `events`."""

    def __init__(self, server: Server, headers: dict[str, str] | None = None) -> None:
        self.ws: ClientConnection = connect(
            f"ws://127.0.0.1:{server.port}/v1/responses",
            additional_headers=headers,
            open_timeout=10,
            legacy=True,
        )  # connected now, closed by close()
        self.events: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.read = 0  # events before this index belong to turns already returned
        self._types: set[str] = set()

    def send(self, message: Any) -> None:
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def create(self, **body: Any) -> None:
        message = {"type": "response.create", "model": MODEL, **body}
        assert not spec_errors(CREATE_EVENT, message), spec_errors(CREATE_EVENT, message)
        self.send(message)

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(self.ws.recv(timeout=timeout))
        if "status" in message and "sequence_number" not in message:
            assert not spec_errors(ERROR_EVENT, message), spec_errors(ERROR_EVENT, message)
            assert message["type"] == "error" and set(message) == {"type", "status", "error"}
            self.errors.append(message)
        else:
            # The whole oneOf once per type (it is slow); the type's own schema always.
            check_event(message, one_of=message["type"] not in self._types)
            self._types.add(message["type"])
            self.events.append(message)
        return message

    def error(self) -> dict[str, Any]:
        """The next error envelope (stream events meanwhile are kept)."""
        seen = len(self.errors)
        while len(self.errors) == seen:
            self.recv()
        return self.errors[-1]

    def until(self, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        """Read until `done(events of the current turn)`; returns them."""
        while not done(self.events[self.read :]):
            self.recv()
        return self.events[self.read :]

    def turn(self) -> list[dict[str, Any]]:
        """The current response's events, to its terminal event: as over SSE, contiguous
        from 0, `response.created` first, one terminal event, last (docs/contract.md §2.1-2.2)."""
        events = self.until(lambda evs: any(e["type"] in TERMINAL for e in evs))
        end = next(i for i, e in enumerate(events) if e["type"] in TERMINAL) + 1
        events = events[:end]
        self.read += end
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[0]["type"] == "response.created"
        return events

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def deltas(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "response.output_text.delta"]


def has_deltas(n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: len(deltas(events)) >= n


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture
def fast(make_server: Callable[..., Server]) -> Server:
    return make_server(
        "--scripted-rate", "0", "--scripted-length", str(LENGTH), "--max-body-bytes", "20000"
    )


@pytest.fixture
def sock(fast: Server) -> Iterator[Socket]:
    s = Socket(fast)
    yield s
    s.close()


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        yield c


def test_a_response_streams_the_events_of_its_sse_log(fast: Server, sock: Socket) -> None:
    sock.create(input="hi", metadata={"k": "v"})
    events = sock.turn()
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * LENGTH,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    rid = events[0]["response"]["id"]
    assert events == raw_events(fast, rid)  # the same objects, byte for byte as JSON
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == scripted_text(LENGTH)
    assert final["background"] is False and final["store"] is True
    assert final["metadata"] == {"k": "v"}
    assert httpx.get(f"{fast.base_url}/responses/{rid}").json() == final


def test_responses_run_one_after_another_on_one_socket(sock: Socket) -> None:
    sock.create(input="one")
    first = sock.turn()
    sock.create(input="two", max_output_tokens=16)
    second = sock.turn()
    assert first[0]["response"]["id"] != second[0]["response"]["id"]
    assert first[-1]["type"] == "response.completed"
    assert second[-1]["type"] == "response.incomplete"
    assert "".join(e["delta"] for e in deltas(second)) == scripted_text(16)
    assert sock.errors == []


def test_continuation_carries_the_context(fast: Server, sock: Socket) -> None:
    # The scripted engine counts the words of everything it is given as input tokens:
    # the prior input and output are in a continuation's context, sent only once.
    sock.create(input="alpha beta gamma")
    first = sock.turn()[-1]["response"]
    assert first["usage"]["input_tokens"] == 3
    sock.create(
        input=[{"type": "message", "role": "user", "content": "delta epsilon"}],
        previous_response_id=first["id"],
    )
    second = sock.turn()[-1]["response"]
    assert second["previous_response_id"] == first["id"]
    assert second["usage"]["input_tokens"] == 3 + LENGTH + 2
    items = httpx.get(f"{fast.base_url}/responses/{second['id']}/input_items").json()
    assert [i["content"][0]["text"] for i in items["data"]] == ["delta epsilon"]
    # store:true: after a reconnect the chain goes on from the persisted response.
    sock.close()
    other = Socket(fast)
    other.create(input="zeta", previous_response_id=second["id"])
    third = other.turn()[-1]["response"]
    other.close()
    assert third["status"] == "completed"
    assert third["usage"]["input_tokens"] == 3 + LENGTH + 2 + LENGTH + 1


def test_store_false_continues_on_its_socket_only(fast: Server, sock: Socket) -> None:
    sock.create(input="one two", store=False)
    first = sock.turn()[-1]["response"]
    assert first["store"] is False
    sock.create(input="three", store=False, previous_response_id=first["id"])
    second = sock.turn()[-1]["response"]
    assert second["usage"]["input_tokens"] == 2 + LENGTH + 1
    sock.close()
    # After a reconnect there is no persisted fallback for a store:false response.
    other = Socket(fast)
    other.create(input="four", store=False, previous_response_id=second["id"])
    error = other.error()
    assert error["status"] == 404
    assert error["error"]["code"] == "previous_response_not_found"
    assert error["error"]["param"] == "previous_response_id"
    assert second["id"] in error["error"]["message"]
    # The recovery the spec describes: a new chain with the full context as input.
    text = scripted_text(LENGTH)
    context = [
        {"type": "message", "role": "user", "content": "one two"},
        {"type": "message", "role": "assistant", "content": text},
        {"type": "message", "role": "user", "content": "three"},
        {"type": "message", "role": "assistant", "content": text},
        {"type": "message", "role": "user", "content": "four"},
    ]
    other.create(input=context, store=False)
    recovered = other.turn()[-1]["response"]
    assert recovered["status"] == "completed"
    assert recovered["usage"]["input_tokens"] == 2 + LENGTH + 1 + LENGTH + 1
    # Nor can a store:false response made over HTTP be continued over a socket.
    made = httpx.post(
        f"{fast.base_url}/responses",
        timeout=10,
        json={"model": MODEL, "input": "x", "store": False},
    ).json()
    other.create(input="y", previous_response_id=made["id"])
    assert other.error()["error"]["code"] == "previous_response_not_found"
    other.close()


def test_a_failed_continuation_evicts_its_previous_response(sock: Socket) -> None:
    # The spec: a continuation turn failing with a 4xx or 5xx evicts the referenced id.
    sock.create(input="one", store=False)
    refused = sock.turn()[-1]["response"]["id"]
    sock.create(input="x", store=False, previous_response_id=refused, temperature=5)
    assert sock.error()["status"] == 400
    sock.create(input="x", store=False, previous_response_id=refused)
    assert sock.error()["error"]["code"] == "previous_response_not_found"
    # A turn that is accepted but then fails (500-class, response.failed) evicts too.
    sock.create(input="one", store=False)
    failing = sock.turn()[-1]["response"]["id"]
    sock.create(input="FAIL_AT=2", store=False, previous_response_id=failing)
    events = sock.turn()
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["status"] == "failed"
    sock.create(input="x", store=False, previous_response_id=failing)
    assert sock.error()["error"]["code"] == "previous_response_not_found"
    # A cancelled continuation is not a failure: its previous response stays usable.
    sock.create(input="one", store=False)
    kept = sock.turn()[-1]["response"]["id"]
    sock.create(input="LINGER=30", store=False, previous_response_id=kept)
    rid = sock.until(has_deltas(LENGTH))[0]["response"]["id"]
    sock.send({"type": "tether:response.cancel", "response_id": rid})
    assert sock.turn()[-1]["response"]["status"] == "cancelled"
    sock.create(input="x", store=False, previous_response_id=kept)
    assert sock.turn()[-1]["response"]["status"] == "completed"


BAD_BODIES = [
    {"model": MODEL, "input": "x", "temperature": 5},
    {"model": MODEL, "input": "x", "frobnicate": 1},
    {"model": MODEL},
    {"model": "no-such-model", "input": "x"},
    {"model": MODEL, "input": [{"type": "message", "role": "robot", "content": "x"}]},
]


def test_bad_bodies_get_the_errors_http_gives(fast: Server, sock: Socket) -> None:
    for body in BAD_BODIES:
        reply = httpx.post(f"{fast.base_url}/responses", json=body, timeout=10)
        assert reply.status_code in (400, 404)
        sock.send({"type": "response.create", **body})
        error = sock.error()
        assert (error["status"], error["error"]) == (reply.status_code, reply.json()["error"])
    sock.create(input="still usable")
    assert sock.turn()[-1]["type"] == "response.completed"


def test_background_is_refused_and_stream_ignored(sock: Socket) -> None:
    # The spec: `background` must not be sent, whatever its value (the schema allows none).
    for value in (True, False, None, {}):
        message = {"type": "response.create", "model": MODEL, "input": "x", "background": value}
        assert spec_errors(CREATE_EVENT, message)
        sock.send(message)
        error = sock.error()
        assert error["status"] == 400
        assert (error["error"]["code"], error["error"]["param"]) == (
            "unsupported_parameter",
            "background",
        )
    assert sock.events == []
    # `stream` (and `stream_options`) are transport fields the socket ignores: Codex sends
    # `"stream": true` on every turn (issue 13), so they are accepted and change nothing.
    for name, value in (("stream", True), ("stream", False), ("stream_options", {})):
        sock.send({"type": "response.create", "model": MODEL, "input": "x", name: value})
        events = sock.turn()
        assert events[-1]["type"] == "response.completed"
        assert len(deltas(events)) == LENGTH
    assert sock.errors == [{"type": "error", "status": 400, "error": sock.errors[0]["error"]}] * 4


def test_generate_false_warms_up_and_can_be_chained_from(
    make_server: Callable[..., Server],
) -> None:
    # OpenAI's WebSocket mode: `generate: false` returns a response id without generating
    # output; the next turn chains from it with previous_response_id.
    server = make_server("--scripted-rate", "0", "--scripted-length", "5", "--debug-routes")
    with Socket(server) as sock:
        _warm_up_and_chain(sock, server)


def _warm_up_and_chain(sock: Socket, server: Server) -> None:
    sock.send(
        {
            "type": "response.create",
            "model": MODEL,
            "generate": False,
            "store": False,
            "instructions": "be brief",
            "input": "remember: the code is 42",
        }
    )
    warm = sock.turn()
    assert [e["type"] for e in warm] == ["response.created", "response.completed"]
    done = warm[-1]["response"]
    assert done["output"] == [] and done["usage"]["output_tokens"] == 0
    sock.create(input="and now?", previous_response_id=done["id"])
    events = sock.turn()
    assert events[-1]["type"] == "response.completed"
    trace = server.trace(events[0]["response"]["id"])
    assert "remember: the code is 42" in str(trace["messages"])
    sock.send({"type": "response.create", "model": MODEL, "input": "x", "generate": "no"})
    assert sock.error()["error"]["param"] == "generate"


def test_bad_messages_get_error_envelopes(sock: Socket) -> None:
    cases: list[tuple[Any, int, str, str | None]] = [
        ("{not json", 400, "invalid_json", None),
        ("[1, 2]", 400, "invalid_json", None),
        ({"model": MODEL, "input": "x"}, 400, "missing_required_parameter", "type"),
        ({"type": "response.update"}, 400, "invalid_value", "type"),
        ({"type": "tether:response.cancel"}, 400, "response_not_in_flight", "response_id"),
        ({"type": "tether:response.cancel", "id": "x"}, 400, "unknown_parameter", "id"),
        (
            {"type": "response.create", "model": MODEL, "input": "x" * 20000},
            413,
            "request_too_large",
            None,
        ),
    ]
    for message, status, code, param in cases:
        sock.send(message)
        error = sock.error()
        assert (error["status"], error["error"]["code"], error["error"]["param"]) == (
            status,
            code,
            param,
        ), message
    sock.ws.send(
        json.dumps(
            {"type": "response.create", "model": MODEL, "input": "binary frames work too"}
        ).encode()
    )
    assert sock.turn()[-1]["type"] == "response.completed"


def test_one_response_in_flight_per_socket(server: Server) -> None:
    sock = Socket(server)  # 100 tokens/s, 200 tokens: 2 s per response
    sock.create(input="first", max_output_tokens=50)
    rid = sock.until(has_deltas(1))[0]["response"]["id"]
    sock.create(input="second")
    error = sock.error()
    assert error["status"] == 409
    assert error["error"]["code"] == "response_already_in_flight"
    assert rid in error["error"]["message"]
    sock.send({"type": "tether:response.cancel", "response_id": "resp_other"})
    assert sock.error()["error"]["code"] == "response_not_in_flight"
    # Neither message disturbed the response in flight, nor the socket.
    first = sock.turn()
    assert first[-1]["type"] == "response.incomplete" and len(deltas(first)) == 50
    sock.create(input="third", max_output_tokens=16)
    assert sock.turn()[-1]["type"] == "response.incomplete"
    sock.close()


def check_cancelled(server: Server, events: list[dict[str, Any]]) -> dict[str, Any]:
    """docs/contract.md §3.4, §4: the stream ends with response.failed, status cancelled, no
    error, and usage counting exactly what the engine produced and the stream carried."""
    final: dict[str, Any] = events[-1]["response"]
    assert events[-1]["type"] == "response.failed"
    assert final["status"] == "cancelled" and final["error"] is None
    trace = server.trace(final["id"])
    assert trace["aborted_at"] is not None and not trace["finished"]
    assert final["usage"]["output_tokens"] == trace["produced"] == len(deltas(events))
    stored = httpx.get(f"{server.base_url}/responses/{final['id']}", timeout=10).json()
    assert stored == final
    return final


def test_cancel_by_id_over_http_ends_the_socket_stream(server: Server, http: httpx.Client) -> None:
    sock = Socket(server)
    sock.create(input="x")
    rid = sock.until(has_deltas(3))[0]["response"]["id"]
    reply = http.post(f"/responses/{rid}/cancel")
    assert reply.status_code == 200 and reply.json()["status"] == "cancelled"
    final = check_cancelled(server, sock.turn())
    assert final["usage"] == reply.json()["usage"]
    sock.create(input="after", max_output_tokens=16)  # the socket goes on
    assert sock.turn()[-1]["type"] == "response.incomplete"
    sock.close()


@pytest.mark.parametrize("by_id", [True, False])
def test_cancel_over_the_socket(server: Server, http: httpx.Client, by_id: bool) -> None:
    sock = Socket(server)
    sock.create(input="x")
    rid = sock.until(has_deltas(3))[0]["response"]["id"]
    sock.send({"type": "tether:response.cancel", **({"response_id": rid} if by_id else {})})
    check_cancelled(server, sock.turn())
    assert sock.errors == []
    sock.send({"type": "tether:response.cancel", "response_id": rid})  # it ended
    assert sock.error()["error"]["code"] == "response_not_in_flight"
    sock.close()


@pytest.mark.parametrize("abrupt", [False, True])
def test_disconnect_mid_response_cancels_it(
    server: Server, http: httpx.Client, abrupt: bool
) -> None:
    # docs/contract.md §4.7: the socket is a non-background response's reader.
    sock = Socket(server)
    sock.create(input="x")
    events = sock.until(has_deltas(3))
    rid = events[0]["response"]["id"]
    if abrupt:
        sock.ws.socket.close()  # no closing handshake: the TCP connection just ends
    else:
        sock.close()

    def ended() -> dict[str, Any] | None:
        r: dict[str, Any] = http.get(f"/responses/{rid}").json()
        return r if r["status"] != "in_progress" else None

    final = wait_for(ended, what="the cancel after the disconnect")
    assert final["status"] == "cancelled"
    trace = server.trace(rid)
    assert trace["aborted_at"] is not None and not trace["finished"]
    assert final["usage"]["output_tokens"] == trace["produced"] >= 3
    assert final["output"][0]["content"][0]["text"].startswith(
        "".join(e["delta"] for e in deltas(events))
    )


def test_connection_limit(make_server: Callable[..., Server]) -> None:
    server = make_server("--websocket-limit", "1.5")
    opened = time.monotonic()
    idle, busy = Socket(server), Socket(server)
    busy.create(input="x")  # 100 tokens/s, 200 tokens: still running at the limit
    error = idle.error()
    assert time.monotonic() - opened >= 1.5
    assert error["status"] == 400
    assert error["error"]["code"] == "websocket_connection_limit_reached"
    with pytest.raises(ConnectionClosedOK):
        idle.recv()
    # A response in flight at the limit is cancelled first: its stream ends, then the
    # error, then the close.
    check_cancelled(server, busy.turn())
    assert busy.error()["error"]["code"] == "websocket_connection_limit_reached"
    with pytest.raises(ConnectionClosedOK):
        busy.recv()


def test_keys_name_the_tenant_of_a_socket(
    make_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/contract.md §7 over the socket: a key's tenant owns what it creates.
    monkeypatch.setenv("TETHER_API_KEYS", "acme:sk-acme,globex:sk-globex")
    server = make_server("--scripted-rate", "0", "--scripted-length", "5")
    with pytest.raises(InvalidStatus) as refused:
        Socket(server)
    assert refused.value.response.status_code == 401
    acme = Socket(server, {"Authorization": "Bearer sk-acme"})
    acme.create(input="x")
    rid = acme.turn()[-1]["response"]["id"]
    globex = Socket(server, {"Authorization": "Bearer sk-globex"})
    globex.create(input="y", previous_response_id=rid)
    assert globex.error()["error"]["code"] == "previous_response_not_found"
    globex.send({"type": "tether:response.cancel", "response_id": rid})
    assert globex.error()["error"]["code"] == "response_not_in_flight"
    acme.create(input="y", previous_response_id=rid)
    assert acme.turn()[-1]["type"] == "response.completed"
    acme.close()
    globex.close()
