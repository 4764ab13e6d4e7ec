"""uvicorn's HTTP protocol with the two timeouts it lacks: request headers and body.

uvicorn times out only an idle keep-alive connection: a client that opens a connection and
sends its headers one byte a second holds it forever, and a few thousand such clients lock
everyone out (slowloris). Neither `timeout_keep_alive` nor `h11_max_incomplete_event_size`
bounds the time a request takes to arrive, and no reverse proxy is assumed. So:

- `header_timeout`: from a connection's opening (or a keep-alive request's first byte) to
  the end of the request's headers. Past it the connection is closed (with a 408 in
  OpenAI's shape when part of a request had arrived).
- `body_timeout`: from the end of the headers to the end of the body. Past it the client
  gets a 408 if no response has begun, and the connection is closed; the app sees a
  disconnect (`ClientDisconnect`, answered quietly).

And a bound uvicorn lacks with httptools: a request's headers larger than
`MAX_HEADER_BYTES` get a 431 (else a fast client could grow them without limit within
the header timeout).

One timer per connection, armed and cancelled on parser callbacks; per chunk, only a
counter while a request's headers are still arriving.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from tether.errors import APIError


def _reply(status: int, message: str, code: str) -> bytes:
    """A whole HTTP reply, closing the connection, with an error in OpenAI's shape."""
    body = orjson.dumps(APIError(status, message, code=code).body())
    return (
        STATUS_LINE[status]
        + b"content-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
        + body
    )


MAX_HEADER_BYTES = 64 * 1024  # request line and headers (nginx allows 4 x 8 KiB)
HEADERS_LATE = _reply(408, "The request headers did not arrive in time.", "request_timeout")
BODY_LATE = _reply(408, "The request body did not arrive in time.", "request_timeout")
HEADERS_LARGE = _reply(
    431,
    f"The request headers are larger than {MAX_HEADER_BYTES} bytes.",
    "request_header_fields_too_large",
)
MALFORMED = _reply(400, "The request is not valid HTTP/1.1.", "invalid_http_request")


class TimedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header and body timeouts (class attributes, set by
    `protocol()`)."""

    header_timeout = 10.0
    body_timeout = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._started = False  # some of the current request's bytes have arrived
        self._header_bytes: int | None = None  # counted while a request's headers arrive
        self._begun = False  # a request began in the chunk being parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._begun = False
        super().data_received(data)
        # Counted after parsing, and only chunks wholly within one request's headers (a
        # chunk where a request began may hold the previous one's body): the bound is
        # then exceeded by at most one read (256 KiB), still a bound.
        if self._header_bytes is not None and not self._begun and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._disarm()
                self._close(HEADERS_LARGE)

    def send_400_response(self, msg: str) -> None:
        """A request the parser refuses: OpenAI's error shape, not uvicorn's plain text."""
        self._disarm()
        self._close(MALFORMED)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._started = True
        self._begun = True
        self._header_bytes = 0
        if self._deadline is None:  # a keep-alive connection's next request
            self._arm(self.header_timeout, self._headers_late)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._header_bytes = None
        super().on_headers_complete()
        if not self.parser.should_upgrade():  # a WebSocket has limits of its own
            self._arm(self.body_timeout, self._body_late)

    def on_message_complete(self) -> None:
        self._disarm()
        self._started = False
        super().on_message_complete()

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        self._close(HEADERS_LATE if self._started else b"")

    def _body_late(self) -> None:
        self._deadline = None
        cycle = self.cycle
        answered = cycle is None or cycle.response_started or cycle.response_complete
        self._close(b"" if answered else BODY_LATE)

    def _close(self, reply: bytes) -> None:
        if self.transport.is_closing():
            return
        if reply:
            self.transport.write(reply)
        self.transport.close()


def protocol(header_timeout: float, body_timeout: float) -> type[TimedProtocol]:
    """The protocol class uvicorn instantiates per connection, with these timeouts."""
    return type(
        "TetherHTTP",
        (TimedProtocol,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout},
    )
