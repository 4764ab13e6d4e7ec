"""Logging: one JSON object per line (or plain text), request ids, one access line per request.

`configure()` (called by the `tether` command before the app starts) sends every logger's
records, uvicorn's and alembic's included, to one stderr handler. A JSON line has `time`
(ISO 8601, UTC), `level`, `logger`, `message`, `request_id` when logged while serving a
request, and any `extra` fields (`exc_info` for a traceback).

`RequestId` is a pure ASGI middleware (Starlette's `BaseHTTPMiddleware` would buffer and
break streaming): it takes the caller's `x-request-id` when it is a sane token, else makes
`req_<32 hex>`, keeps it in a context variable for the log lines of that request (and of
tasks it starts), echoes it on every response (SSE streams and errors included), and
writes one `tether.access` line (INFO) when the response is over: method, path, status,
duration_ms, request_id. A stream's line comes when the stream ends, never per event.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tether_request_id", default=None
)
HEADER = b"x-request-id"
# A caller's id is kept only if it cannot garble a log line or a header: a plain token.
_SANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}")
access_log = logging.getLogger("tether.access")


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def request_id_from(header: bytes | None) -> str:
    """The caller's id if it is a sane token, else a new one."""
    if header:
        text = header.decode("latin-1")
        if _SANE.fullmatch(text):
            return text
    return new_request_id()


# --- formatting ----------------------------------------------------------------------------


class _RequestIdFilter(logging.Filter):
    """Stamps each record with the current request's id (absent outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        if rid is not None and not hasattr(record, "request_id"):
            record.request_id = rid
        return True


def _iso(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class JSONFormatter(OrjsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            # uvicorn adds an ANSI-coloured copy of some messages: noise in JSON.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso(record)


class TextFormatter(logging.Formatter):
    """`time level logger message [request_id=...]` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} request_id={rid}" if rid else line


def configure(level: str = "warning", fmt: Literal["json", "text"] = "json") -> None:
    """Route every log record to one stderr handler in `fmt`, at `level` and above.
    Replaces handlers set before (uvicorn is told not to install its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(5 if level.lower() == "trace" else level.upper())  # uvicorn's TRACE is 5
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers = []
        uv.propagate = True
    logging.captureWarnings(True)  # Python warnings become log lines too, not raw stderr


# --- the middleware ------------------------------------------------------------------------


class RequestId:
    """Pure ASGI: request id in, request id out, one access line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = request_id_from(_header(scope))
        token = REQUEST_ID.set(rid)
        try:
            if kind == "http":
                await self._http(scope, receive, send, rid)
            else:
                await self.app(scope, receive, _with_header(send, "websocket.accept", rid))
        finally:
            REQUEST_ID.reset(token)

    async def _http(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        start = time.perf_counter()
        status = 0
        stamp = (HEADER, rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), stamp]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if status:
                raise  # mid-body: nothing left to answer with
            # Starlette renders an unhandled error (500) in ServerErrorMiddleware, which
            # sits outside every user middleware: its reply would miss the header. Render
            # it here with the app's own handler instead, so the caller gets the id.
            handler = getattr(scope.get("app"), "exception_handlers", {}).get(Exception)
            if handler is None:
                raise
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send_with_id)
        finally:
            _access(scope, status or 500, start, rid)


def _header(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            return bytes(value)
    return None


def _with_header(send: Send, kind: str, rid: str) -> Send:
    stamp = (HEADER, rid.encode("latin-1"))

    async def send_with_id(message: Message) -> None:
        if message["type"] == kind:
            message = {**message, "headers": [*message.get("headers", ()), stamp]}
        await send(message)

    return send_with_id


def _access(scope: Scope, status: int, start: float, rid: str) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    duration_ms = round((time.perf_counter() - start) * 1000, 3)
    method, path = scope.get("method", ""), scope.get("path", "")
    extra: dict[str, Any] = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": duration_ms,
        "request_id": rid,
    }
    access_log.info("%s %s %d %.1fms", method, path, status, duration_ms, extra=extra)
