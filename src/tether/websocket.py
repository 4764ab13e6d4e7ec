"""WebSocket mode on `/v1/responses` (Open Responses 2026-04-24, "WebSocket Transport").

A client sends `{"type": "response.create", ...create body}` and receives, one JSON text
message each, exactly the events an SSE stream of that response gives (the socket is one
more reader of the log). One response is in flight per connection; turns are sequential.
Failures are `{"type": "error", "status", "error": {"code", "message", "param"}}`
envelopes that leave the socket open; only the connection limit closes it.

Like a non-background SSE stream, the socket is its response's reader: a client that
leaves cancels the response in flight (docs/contract.md §4.7), and any cancel — by id over HTTP,
or this module's extension message `{"type": "tether:response.cancel"}` — ends the
socket's stream with `response.failed` (`response.status: "cancelled"`), as over SSE.

`store: false` responses are kept in connection-local memory only as far as the spec
sees it: tether still logs them (every response has an event log) for the retention
window, but a continuation from one over a WebSocket works only on the connection that
created it, as the spec requires ("no persisted fallback").
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from tether import bounds, wire
from tether.auth import principal
from tether.errors import APIError, bad_request, previous_not_found, server_error, unavailable
from tether.lifecycle import Lifecycle
from tether.store.base import LogEntry, StoreUnavailable

log = logging.getLogger("tether.websocket")
# The client is gone: a send failed (WebSocketDisconnect), or one came after that
# (WebSocketDisconnected).
GONE = (WebSocketDisconnect, WebSocketDisconnected)

CREATE = "response.create"
# tether's extension: stop the response in flight on this connection. Extension names
# carry the implementor's slug (Open Responses, "Extending streaming events").
CANCEL = "tether:response.cancel"
# HTTP/SSE transport fields a WebSocket `response.create` must not carry (the spec's
# `x-openresponses-disallowed` properties of WebSocketResponseCreateEvent). `stream` is
# not among them: every response streams over the socket, and clients (Codex) send
# `"stream": true` anyway, so it is accepted and ignored.
DISALLOWED = ("background",)
IGNORED = ("stream", "stream_options")
# store:false responses a connection remembers for continuation (most recent last); the
# spec asks for at least the most recent one.
CACHE_SIZE = 64


async def responses_socket(ws: WebSocket) -> None:
    """The WebSocket endpoint at `/v1/responses`."""
    lc: Lifecycle = ws.app.state.lifecycle
    await ws.accept()
    await Connection(ws, lc).serve()


class Connection:
    """One client's socket: its in-flight response, and its store:false memory."""

    def __init__(self, ws: WebSocket, lc: Lifecycle) -> None:
        who = principal(ws)
        self.ws = ws
        self.lc = lc
        self.tenant = who.tenant
        self.key_id = who.key_id
        self.current: str | None = None  # the response in flight
        # Set when the relay of the response in flight has ended (the limit waits for it).
        self.relayed: anyio.Event | None = None
        self.unstored: dict[str, None] = {}  # store:false ids created here (ordered)
        self.sending = anyio.Lock()  # the relay and error replies share one socket
        self._relays: TaskGroup | None = None  # the relay lives here, while serve() runs

    async def serve(self) -> None:
        """Read client messages until the client leaves or the limit; the relay of the
        response in flight runs beside, in a task group that ends with the connection."""
        failure: Exception | None = None
        async with anyio.create_task_group() as relays:
            self._relays = relays
            try:
                await self._receive()
            except GONE:
                pass
            except Exception as exc:
                # Raised after the group, as before: raised inside, it would reach
                # Starlette wrapped in an ExceptionGroup (the relay itself raises nothing).
                failure = exc
            finally:
                # The client left (or the connection ended): stop relaying, which cancels
                # a response still in flight (the relay's own `finally`).
                relays.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _receive(self) -> None:
        deadline = anyio.current_time() + self.lc.settings.websocket_limit
        while True:
            with anyio.CancelScope(deadline=deadline) as limit:
                message = await self.ws.receive()
            if limit.cancelled_caught:
                await self._limit_reached()
                return
            if message["type"] == "websocket.disconnect":
                return
            await self._handle(message)

    # --- client messages ---------------------------------------------------------------

    async def _handle(self, message: Message) -> None:
        """One client message; every failure becomes an error envelope, never a close."""
        raw: str | bytes | None = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        body: Any = None
        try:
            body = self._parse(raw)
            kind = body.get("type")
            if kind == CREATE:
                await self._create(body)
            elif kind == CANCEL:
                await self._cancel(body)
            elif kind is None:
                raise bad_request(
                    "Missing required parameter: 'type'.", "type", "missing_required_parameter"
                )
            else:
                raise bad_request(
                    f"Unknown message type: {kind!r}. Expected '{CREATE}' or '{CANCEL}'.",
                    "type",
                    "invalid_value",
                )
            return
        except APIError as exc:
            error = exc
        except StoreUnavailable as exc:
            log.warning("store unavailable on a WebSocket message: %s", exc)
            error = unavailable("The service is temporarily unavailable; retry shortly.")
        except GONE:
            raise
        except Exception:
            log.exception("unhandled error on a WebSocket message")
            error = server_error()
        if isinstance(body, dict) and body.get("type") == CREATE:
            self._evict(body.get("previous_response_id"))
        await self._error(error)

    def _parse(self, raw: str | bytes) -> dict[str, Any]:
        limit = self.lc.settings.max_body_bytes
        data = raw.encode() if isinstance(raw, str) else raw
        if len(data) > limit:
            raise APIError(
                413, f"The message is larger than {limit} bytes.", code="request_too_large"
            )
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise bad_request("The message is not valid JSON.", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("The message must be a JSON object.", None, "invalid_json")
        bounds.check_depth(body)
        return body

    async def _create(self, body: dict[str, Any]) -> None:
        if self.current is not None:
            raise APIError(
                409,
                f"Response '{self.current}' is still in flight on this "
                "connection: wait for its terminal event, or cancel it.",
                param="type",
                code="response_already_in_flight",
            )
        fields = {k: v for k, v in body.items() if k not in ("type", *IGNORED)}
        for name in DISALLOWED:
            if name in fields:
                raise bad_request(
                    f"Parameter '{name}' is not allowed on a WebSocket "
                    "connection (every response streams over it).",
                    name,
                    "unsupported_parameter",
                )
        generate = fields.pop("generate", True)
        if not isinstance(generate, bool):
            raise bad_request(
                "Invalid value for 'generate': expected a boolean.", "generate", "invalid_value"
            )
        # the same validation, and errors, as over HTTP
        req = wire.parse_create(fields, self.lc.settings.hosted_tools)
        await self._check_previous(req.previous_response_id)
        # `generate: false` warms up (OpenAI's WebSocket mode): the response is created,
        # with its input and tools, and completes at once with no output; its id can be
        # chained from. Its stream is `response.created` then `response.completed`.
        record = await self.lc.create(req, self.tenant, key_id=self.key_id, generate=generate)
        if req.store is False:
            self.unstored[record.id] = None
            if len(self.unstored) > CACHE_SIZE:
                del self.unstored[next(iter(self.unstored))]
        self.current = record.id
        self.relayed = anyio.Event()
        assert self._relays is not None  # set by serve(), which calls this
        self._relays.start_soon(self._relay, record.id, req.previous_response_id, self.relayed)

    async def _check_previous(self, prev: str | None) -> None:
        """A store:false response continues only on the connection that created it: the
        spec allows it no persisted fallback. Other ids are the lifecycle's to resolve."""
        if prev is None or prev in self.unstored:
            return
        rec = await self.lc.store.get(prev, self.tenant)
        if rec is not None and rec.snapshot.get("store") is False:
            raise previous_not_found(prev)

    def _evict(self, prev: Any) -> None:
        """The spec: a continuation turn that fails evicts its previous response from the
        connection's memory (a later continuation from a store:false one is not found)."""
        if isinstance(prev, str):
            self.unstored.pop(prev, None)

    async def _cancel(self, body: dict[str, Any]) -> None:
        for name in body:
            if name not in ("type", "response_id"):
                raise bad_request(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
        target = body.get("response_id", self.current)
        if target is not None and not isinstance(target, str):
            raise bad_request(
                "Invalid value for 'response_id': expected a string.",
                "response_id",
                "invalid_value",
            )
        if target is None or target != self.current:
            raise bad_request(
                "No such response in flight on this connection (cancel "
                "other responses with POST /v1/responses/{id}/cancel).",
                "response_id",
                "response_not_in_flight",
            )
        # Returns once the run stopped; the relay then sends the terminal event.
        await self.lc.cancel(target, self.tenant)

    # --- server messages ---------------------------------------------------------------

    async def _relay(self, rid: str, prev: str | None, relayed: anyio.Event) -> None:
        """The response's events, as its SSE stream gives them (docs/contract.md §2.4).
        A cancel of the connection's task group (the client left) stops it, and is not
        swallowed: only the `finally` runs, which cancels the response."""
        ended = False
        try:
            # Closed with the relay, even when a send fails: the reader stops at once.
            batches = self.lc.follow(rid, self.tenant, -1)  # an async generator
            async with contextlib.aclosing(batches):  # type: ignore[type-var]
                async for entries in batches:
                    last = entries[-1]
                    if last.type in wire.TERMINAL_EVENTS:
                        # Free before sending: the client may send its next turn the
                        # moment it reads the terminal event.
                        self.current, ended = None, True
                        if _failed(last):
                            self._evict(prev)
                    await self._send_entries(entries)
            ended = True  # the log ended without a terminal event to send (never expected)
        except GONE:
            pass  # the client left: the reader is gone, as when the relay is cancelled
        except Exception as exc:
            log.exception("WebSocket relay of %s failed", rid)
            error = (
                unavailable("The service is temporarily unavailable.")
                if isinstance(exc, StoreUnavailable)
                else server_error()
            )
            with contextlib.suppress(Exception):
                await self._error(error)
        finally:
            if self.current == rid:
                self.current = None
            relayed.set()
            if not ended:
                # The socket was this response's reader (docs/contract.md §4.7).
                self.lc.spawn(self.lc.cancel_quietly, rid, self.tenant)

    async def _send_entries(self, entries: list[LogEntry]) -> None:
        async with self.sending:
            for entry in entries:
                await self.ws.send_text(entry.data.decode())

    async def _error(self, exc: APIError) -> None:
        """The spec's WebSocketErrorEvent envelope; the socket stays open."""
        error = {
            "type": exc.type,
            "code": exc.code or exc.type,
            "message": exc.message,
            "param": exc.param,
        }
        envelope = {"type": "error", "status": exc.status, "error": error}
        async with self.sending:
            await self.ws.send_text(orjson.dumps(envelope).decode())

    # --- the end of a connection -------------------------------------------------------

    async def _limit_reached(self) -> None:
        """The spec limits a connection's life; a response still in flight then is
        cancelled (its stream ends first), as if its reader had left."""
        rid, relayed = self.current, self.relayed
        if rid is not None and relayed is not None:
            with contextlib.suppress(APIError):
                await self.lc.cancel(rid, self.tenant)
            # The relay sends the terminal event, then ends; not waited for longer than a
            # cancel may take (the task group's cancel then stops it).
            with anyio.move_on_after(self.lc.settings.cancel_timeout):
                await relayed.wait()
        limit = self.lc.settings.websocket_limit
        await self._error(
            APIError(
                400,
                f"This WebSocket connection reached its time limit "
                f"({limit:g} s): open a new connection.",
                code="websocket_connection_limit_reached",
            )
        )
        await self.ws.close(1000, "websocket_connection_limit_reached")


def _failed(entry: LogEntry) -> bool:
    """A terminal event ending its response `failed` (not cancelled: a cancel is the
    client's choice, not a failed turn)."""
    if entry.type != "response.failed":
        return False
    status: str = orjson.loads(entry.data)["response"]["status"]
    return status == "failed"
