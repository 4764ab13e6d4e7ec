"""Logs: one JSON object per line, request ids in and out, one access line per request."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from websockets.sync.client import connect

from conftest import Server, free_port, wait_for

GENERATED = re.compile(r"req_[0-9a-f]{32}")


def lines(server: Server) -> list[str]:
    assert server.log is not None
    return server.log.read_text().splitlines()


def records(server: Server) -> list[dict[str, Any]]:
    """Every line of the server's stdout + stderr, each of which must be a JSON object."""
    out = []
    for line in lines(server):
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        out.append(record)
    return out


def access(server: Server, request_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in records(server)
        if r["logger"] == "tether.access" and r.get("request_id") == request_id
    ]


@pytest.fixture
def logged(make_server: Any) -> Server:
    server: Server = make_server(
        "--log-level", "info", "--scripted-rate", "200", "--scripted-length", "20"
    )
    return server


def test_every_line_is_a_json_object(logged: Server) -> None:
    with logged.client() as client:
        client.responses.create(model="scripted", input="hi")
    logged.stop()  # every line written and flushed
    found = records(logged)
    assert found, "the server logged nothing at info level"
    # uvicorn's own lines come through the same formatter.
    assert any(r["logger"].startswith("uvicorn") for r in found)
    started = [r for r in found if r["logger"] == "uvicorn.error"]
    assert all("request_id" not in r for r in started)  # not inside a request
    stamp = found[0]["time"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", stamp), stamp
    assert {r["level"] for r in found} <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def test_a_supplied_request_id_is_echoed_and_logged(logged: Server) -> None:
    rid = "trace-abc_123.4"
    with logged.client() as client:
        raw = client.responses.with_raw_response.create(
            model="scripted", input="hi", extra_headers={"x-request-id": rid}
        )
    assert raw.headers["x-request-id"] == rid
    assert raw.parse().status == "completed"
    line = wait_for(lambda: access(logged, rid), what="the access line")
    assert len(line) == 1
    assert line[0]["method"] == "POST" and line[0]["path"] == "/v1/responses"
    assert line[0]["status"] == 200 and line[0]["duration_ms"] > 0


def test_a_generated_request_id_has_its_form(logged: Server) -> None:
    with logged.client() as client:
        reply = client.models.list()
        # The SDK reads the header into `_request_id` (what a client quotes in a report).
        sdk_id = client.responses.create(model="scripted", input="hi")._request_id
    assert sdk_id is not None and GENERATED.fullmatch(sdk_id)
    assert reply.data[0].id == "scripted"
    for bad in ("has space", "x" * 200, "semi;colon", "é"):
        r = httpx.get(f"{logged.url}/health", headers={"x-request-id": bad.encode()})
        assert GENERATED.fullmatch(r.headers["x-request-id"]), bad
    assert wait_for(lambda: access(logged, sdk_id), what="the access line")


def test_errors_and_streams_carry_the_header(logged: Server) -> None:
    missing = httpx.get(f"{logged.url}/v1/responses/resp_nope", headers={"x-request-id": "err-1"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "err-1"
    assert missing.json()["error"]["type"] == "invalid_request_error"
    bad = httpx.post(
        f"{logged.url}/v1/responses",
        content=b"{",
        headers={"x-request-id": "err-2", "content-type": "application/json"},
    )
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "err-2"

    with (
        logged.client() as client,
        client.responses.with_streaming_response.create(
            model="scripted", input="hi", stream=True, extra_headers={"x-request-id": "sse-1"}
        ) as raw,
    ):
        assert raw.headers["x-request-id"] == "sse-1"
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [e.type for e in raw.parse()]
    assert events[-1] == "response.completed"
    assert events.count("response.output_text.delta") == 20
    # One access line for the whole stream, written when it ended: never one per event.
    # The line is written once the stream is over, so per-event lines would be there now.
    line = wait_for(lambda: access(logged, "sse-1"), what="the stream's access line")
    assert len(line) == 1
    assert line[0]["status"] == 200 and line[0]["duration_ms"] >= 20 / 200 * 1000 * 0.5
    for rid, status in (("err-1", 404), ("err-2", 400)):
        assert [r["status"] for r in access(logged, rid)] == [status]


def test_a_websocket_handshake_carries_the_header(logged: Server) -> None:
    url = f"ws://127.0.0.1:{logged.port}/v1/responses"
    with connect(url, additional_headers={"x-request-id": "ws-1"}) as ws:
        assert ws.response is not None
        assert ws.response.headers["x-request-id"] == "ws-1"
    with connect(url) as ws:
        assert ws.response is not None
        assert GENERATED.fullmatch(ws.response.headers["x-request-id"])


def test_text_format(make_server: Any) -> None:
    server: Server = make_server("--log-level", "info", "--log-format", "text")
    httpx.get(f"{server.url}/health", headers={"x-request-id": "txt-1"})
    wait_for(
        lambda: any("request_id=txt-1" in line for line in lines(server)),
        what="the text access line",
    )
    line = next(line for line in lines(server) if "request_id=txt-1" in line)
    assert " INFO tether.access GET /health 200 " in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_default_level_logs_no_access_lines(server: Server) -> None:
    httpx.get(f"{server.url}/health")
    server.stop()
    assert not [line for line in lines(server) if "tether.access" in line]


# --- the middleware around an unhandled error (a bug: no tether route raises one) ---------


@pytest.fixture
def failing_app() -> Iterator[str]:
    """A real HTTP server with tether's middleware and error handler, and a route that
    raises: the 500 is rendered by Starlette outside user middleware otherwise."""
    from tether.app import _unexpected
    from tether.logs import RequestId

    async def boom(request: Request) -> Response:
        raise RuntimeError("a bug")

    app = Starlette(
        routes=[Route("/boom", boom)],
        middleware=[Middleware(RequestId)],
        exception_handlers={Exception: _unexpected},
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the app to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_an_unhandled_error_keeps_the_header_and_the_error_shape(failing_app: str) -> None:
    r = httpx.get(f"{failing_app}/boom", headers={"x-request-id": "bug-1"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "bug-1"
    assert r.json()["error"]["type"] == "server_error"
    assert "a bug" not in r.text  # never a stack trace
