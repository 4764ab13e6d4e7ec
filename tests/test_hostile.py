"""Hostile input (issue 14, item 4): out-of-range and malformed parameters, deep bodies,
slow and vanishing clients. Each case got a 500, a cut stream, a silently wrong reading or
a held connection before; now a 400/408 in OpenAI's shape, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from test_errors import check_error
from test_websocket import Socket

from conftest import Server, served, wait_for

MODEL = "scripted"
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
DEPTH_LIMIT = 64  # tether.bounds.MAX_DEPTH, as the README documents it


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with served(
        tmp_path_factory.mktemp("hostile"),
        "--engine",
        "scripted",
        "--scripted-rate",
        "0",
        "--scripted-length",
        "5",
        "--log-level",
        "info",
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--body-timeout",
        str(BODY_TIMEOUT),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def done(hostile: Server) -> str:
    with hostile.client() as c:
        return c.responses.create(model=MODEL, input="hi").id


def log_lines(server: Server) -> list[dict[str, Any]]:
    assert server.log is not None
    lines = []
    for text in server.log.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            lines.append({"level": "RAW", "message": text})
    return lines


def errors_logged(server: Server) -> list[dict[str, Any]]:
    return [x for x in log_lines(server) if x.get("level") in ("ERROR", "CRITICAL", "RAW")]


# --- query parameters ----------------------------------------------------------------------

BAD_QUERIES: list[tuple[str, str, dict[str, str], str]] = [
    # id, path under /responses/{id}, query, the parameter named
    ("starting_after-2^63", "", {"stream": "true", "starting_after": str(2**63)}, "starting_after"),
    (
        "starting_after-underscore",
        "",
        {"stream": "true", "starting_after": "1_0"},
        "starting_after",
    ),
    ("starting_after-plus", "", {"stream": "true", "starting_after": "+1"}, "starting_after"),
    ("starting_after-space", "", {"stream": "true", "starting_after": " 1"}, "starting_after"),
    (
        "starting_after-5000-digits",
        "",
        {"stream": "true", "starting_after": "9" * 5000},
        "starting_after",
    ),
    ("stream-maybe", "", {"stream": "maybe"}, "stream"),
    ("stream-empty", "", {"stream": ""}, "stream"),
    ("limit-0", "/input_items", {"limit": "0"}, "limit"),
    ("limit-101", "/input_items", {"limit": "101"}, "limit"),
    ("limit-underscore", "/input_items", {"limit": "1_0"}, "limit"),
    ("limit-2^64", "/input_items", {"limit": str(2**64)}, "limit"),
    ("limit-negative", "/input_items", {"limit": "-5"}, "limit"),
]


@pytest.mark.parametrize(
    ("path", "query", "param"), [q[1:] for q in BAD_QUERIES], ids=[q[0] for q in BAD_QUERIES]
)
def test_bad_query_parameter_is_400_naming_it(
    hostile: Server, done: str, path: str, query: dict[str, str], param: str
) -> None:
    r = httpx.get(f"{hostile.base_url}/responses/{done}{path}", params=query, timeout=10)
    check_error(r, 400, param=param)


def test_largest_starting_after_is_a_whole_empty_stream(hostile: Server, done: str) -> None:
    # 2^63 - 1 fits the store's INTEGER: nothing after it, and the stream still ends.
    r = httpx.get(
        f"{hostile.base_url}/responses/{done}",
        params={"stream": "1", "starting_after": str(2**63 - 1)},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]"), r.text
    assert "response.created" not in r.text
    r = httpx.get(f"{hostile.base_url}/responses/{done}", params={"stream": "False"}, timeout=10)
    assert r.status_code == 200 and r.json()["id"] == done


# --- integers in bodies --------------------------------------------------------------------

BIG_BODY_INTS = [
    ("max_output_tokens", 2**31),
    ("max_output_tokens", 2**63),
    ("max_output_tokens", 2**64 + 1),
    ("max_tool_calls", 2**63),
]


@pytest.mark.parametrize(
    ("param", "value"), BIG_BODY_INTS, ids=[f"{p}-{v}" for p, v in BIG_BODY_INTS]
)
def test_huge_integer_in_a_body_is_400_naming_it(hostile: Server, param: str, value: int) -> None:
    text = f'{{"model": "{MODEL}", "input": "x", "{param}": {value}}}'
    r = httpx.post(
        f"{hostile.base_url}/responses",
        content=text,
        headers={"content-type": "application/json", "idempotency-key": "big"},
        timeout=10,
    )
    check_error(r, 400, param=param)
    r = httpx.post(
        f"{hostile.base_url}/responses",
        data={"model": MODEL, "input": "x", param: str(value)},
        timeout=10,
    )
    check_error(r, 400, param=param)


def test_long_idempotency_key_is_400(hostile: Server) -> None:
    # Stored with the response: bounded like any stored value (255 characters).
    r = httpx.post(
        f"{hostile.base_url}/responses",
        json={"model": MODEL, "input": "x"},
        headers={"idempotency-key": "k" * 256},
        timeout=10,
    )
    check_error(r, 400, param="Idempotency-Key")
    r = httpx.post(
        f"{hostile.base_url}/responses",
        json={"model": MODEL, "input": "x"},
        headers={"idempotency-key": "k" * 255},
        timeout=10,
    )
    assert r.status_code == 200, r.text


# --- nesting -------------------------------------------------------------------------------


def nested_json(depth: int) -> bytes:
    """A create body `depth` levels deep in all (the body is level 1), through
    `stream_options` (free-form in both specs)."""
    inner = depth - 2  # the body, then stream_options itself
    return (
        f'{{"model": "{MODEL}", "input": "x", "stream_options": '
        + '{"a": ' * inner
        + "{}"
        + "}" * inner
        + "}"
    ).encode()


@pytest.mark.parametrize("depth", [DEPTH_LIMIT + 1, 300, 2000])
@pytest.mark.parametrize("key", [None, "deep"])
def test_body_nested_too_deep_is_400_naming_the_limit(
    hostile: Server, depth: int, key: str | None
) -> None:
    headers = {"content-type": "application/json"}
    if key is not None:  # the hash of the body once raised RecursionError: a 500
        headers["idempotency-key"] = f"{key}-{depth}"
    r = httpx.post(
        f"{hostile.base_url}/responses", content=nested_json(depth), headers=headers, timeout=10
    )
    # Past the JSON parser's own limit (1,024) the parameter is not known.
    param = "stream_options" if depth < 1000 else None
    err = check_error(r, 400, param=param, code="nesting_too_deep")
    assert str(DEPTH_LIMIT) in err["message"]


def test_form_brackets_nested_too_deep_is_400(hostile: Server) -> None:
    field = "stream_options" + "[a]" * 300
    r = httpx.post(
        f"{hostile.base_url}/responses",
        content=f"model={MODEL}&input=x&{field}=v",
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "idempotency-key": "deep-form",
        },
        timeout=10,
    )
    err = check_error(r, 400, param="stream_options", code="nesting_too_deep")
    assert str(DEPTH_LIMIT) in err["message"]


def test_websocket_message_nested_too_deep_is_an_error_event(hostile: Server) -> None:
    sock = Socket(hostile)
    try:
        sock.send('{"type": "response.create", ' + nested_json(300)[1:].decode())
        error = sock.error()
    finally:
        sock.ws.close()
    assert (error["status"], error["error"]["code"]) == (400, "nesting_too_deep")
    assert error["error"]["param"] == "stream_options"


FORM_NUMBERS = [
    ("max_output_tokens", "1_0"),
    ("max_output_tokens", " 10"),
    ("max_output_tokens", "9" * 5000),
    ("temperature", "nan"),
    ("top_p", "1_0.5"),
    ("temperature", "inf"),
]


@pytest.mark.parametrize(
    ("param", "text"), FORM_NUMBERS, ids=[f"{p}={t[:8]}" for p, t in FORM_NUMBERS]
)
def test_form_numbers_are_json_numbers(hostile: Server, param: str, text: str) -> None:
    # Python's int()/float() take `1_0`, ` 10`, `nan`: a form field's number is JSON's.
    r = httpx.post(
        f"{hostile.base_url}/responses",
        data={"model": MODEL, "input": "x", param: text},
        timeout=10,
    )
    check_error(r, 400, param=param)


def test_body_at_the_depth_limit_is_served_and_idempotent(hostile: Server) -> None:
    headers = {"content-type": "application/json", "idempotency-key": "at-the-limit"}
    first = httpx.post(
        f"{hostile.base_url}/responses",
        content=nested_json(DEPTH_LIMIT),
        headers=headers,
        timeout=30,
    )
    assert first.status_code == 200, first.text
    again = httpx.post(
        f"{hostile.base_url}/responses",
        content=nested_json(DEPTH_LIMIT),
        headers=headers,
        timeout=30,
    )
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


# --- clients that vanish or crawl ----------------------------------------------------------


def access_line(server: Server, request_id: str) -> dict[str, Any] | None:
    for line in log_lines(server):
        if line.get("logger") == "tether.access" and line.get("request_id") == request_id:
            return line
    return None


def test_client_gone_during_its_body_is_not_an_error(hostile: Server) -> None:
    before = len(errors_logged(hostile))
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/responses HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: 1000\r\n"
            b"x-request-id: gone-mid-body\r\n\r\n" + b'{"model": "scr'
        )
    wait_for(lambda: access_line(hostile, "gone-mid-body"), what="its access line")
    assert errors_logged(hostile)[before:] == []


def test_slow_body_gets_408_and_the_connection_closed(hostile: Server) -> None:
    before = len(errors_logged(hostile))

    async def run() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port)
        writer.write(
            b"POST /v1/responses HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: 100\r\n"
            b"x-request-id: slow-body\r\n\r\n{"
        )
        start = time.monotonic()
        reply = await asyncio.wait_for(reader.read(), BODY_TIMEOUT + 10)
        writer.close()
        return reply, time.monotonic() - start

    reply, took = asyncio.run(run())
    assert reply.startswith(b"HTTP/1.1 408"), reply
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert BODY_TIMEOUT - 0.5 <= took <= BODY_TIMEOUT + 5, took
    wait_for(lambda: access_line(hostile, "slow-body"), what="its access line")
    assert errors_logged(hostile)[before:] == []


def test_endless_headers_get_431(hostile: Server) -> None:
    """Headers sent fast but without end: refused once past 64 KiB (+ one read), not
    buffered until the header timeout."""
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        reply = b""
        try:
            for i in range(2000):  # up to 2 MB of headers, 1 KiB each
                s.sendall(b"x-filler-%d: " % i + b"a" * 1024 + b"\r\n")
        except OSError:  # closed by the server while sending: what we want
            pass
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_header_fields_too_large"
    assert httpx.get(f"{hostile.url}/health", timeout=5).status_code == 200


def test_malformed_http_is_400_in_openai_shape(hostile: Server) -> None:
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=10) as s:
        s.sendall(b"HELLO THERE\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    head, body = reply.split(b"\r\n\r\n", 1)
    assert b"content-type: application/json" in head.lower()
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


SLOW_CLIENTS = 150


def test_slow_headers_are_dropped_and_others_still_served(hostile: Server) -> None:
    """Slowloris: 150 connections sending their headers one byte a second (and 10 that
    send nothing) are closed within the header timeout; meanwhile normal requests are
    answered at once."""
    request = b"GET /health HTTP/1.1\r\nhost: x\r\nx-padding: " + b"a" * 64 + b"\r\n\r\n"

    async def slow(started: asyncio.Event, count: list[int]) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port)
        start = time.monotonic()

        async def trickle(data: bytes) -> None:
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                count[0] += i == 0
                if count[0] == SLOW_CLIENTS:
                    started.set()
                await asyncio.sleep(1.0)  # the attack's pace: one byte a second

        sender = asyncio.create_task(trickle(request))
        try:
            reply = await asyncio.wait_for(reader.read(), HEADER_TIMEOUT + 20)
        finally:
            sender.cancel()
            writer.close()
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply
        return time.monotonic() - start

    async def idle() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port)
        start = time.monotonic()
        reply = await asyncio.wait_for(reader.read(), HEADER_TIMEOUT + 20)
        writer.close()
        assert reply == b"", reply  # nothing was asked: closed without a reply
        return time.monotonic() - start

    async def normal(client: httpx.AsyncClient) -> float:
        start = time.monotonic()
        r = await client.get(f"{hostile.url}/health")
        assert r.status_code == 200
        return time.monotonic() - start

    async def run() -> tuple[list[float], list[float]]:
        started, count = asyncio.Event(), [0]
        attackers = [asyncio.create_task(slow(started, count)) for _ in range(SLOW_CLIENTS)]
        attackers += [asyncio.create_task(idle()) for _ in range(10)]
        await asyncio.wait_for(started.wait(), 30)
        async with httpx.AsyncClient(timeout=10) as client:
            served_in = [await normal(client) for _ in range(10)]
        closed_in = await asyncio.gather(*attackers)
        return served_in, closed_in

    served_in, closed_in = asyncio.run(run())
    assert max(served_in) < 1.0, served_in
    # Every one closed within the timeout (plus scheduling slack on a loaded machine).
    assert max(closed_in) <= HEADER_TIMEOUT + 3, sorted(closed_in)[-5:]
    assert min(closed_in) >= HEADER_TIMEOUT - 0.5, sorted(closed_in)[:5]


def test_keep_alive_requests_are_not_cut_by_the_header_timeout(hostile: Server) -> None:
    # One connection, requests spread over more than the header timeout: each request's
    # headers are timed from its own first byte, not from the connection's opening.
    with httpx.Client(timeout=10) as client:
        deadline = time.monotonic() + HEADER_TIMEOUT + 1
        while time.monotonic() < deadline:
            assert client.get(f"{hostile.url}/health").status_code == 200
            time.sleep(0.5)  # the gap between a real client's requests
