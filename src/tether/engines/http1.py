"""A small HTTP/1.1 client for the upstream engines' streamed replies (their hot loop).

httpx + httpcore + h11 cost about 10 us per chunk an upstream writes (a token, for a
chat-completions server): an anyio stream read, h11's event machinery and httpx's
decoders, a dozen Python frames per read. Here an asyncio `Protocol` hands each network
read to httptools' C parser, which de-chunks the body; the reader gets the body bytes of
every read since it last looked, in one piece, with one wake-up.

What it keeps of httpx's behaviour, because tether's promises rest on it:
- a connection goes back to the pool only after its response ended cleanly (complete,
  keep-alive, nothing left over); on anything else (a cancel, an error, a reader that
  stopped early) `Http1Pool.stream` aborts it: the socket is closed at once, without a
  TLS close_notify or a graceful shutdown that a stalled peer could hold up. That is
  what makes a chat-completions server stop generating when a run is cancelled;
- timeouts: connect (`ConnectFailed`, `timeout=True`), and read: the longest silence
  while the reader waits (`ReadTimeout`);
- no proxies and no environment (httpx's `trust_env=False`); TLS with httpx's own
  default context (the same certificates) when the URL is https.

A keep-alive connection the server closed while idle is noticed by its `Protocol`
(`eof_received`), so the pool skips it; if the server closes it just as a request goes
out, the request is sent again once on a new connection, as long as not one byte of a
reply came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import httptools

#: body bytes held for a reader that does not keep up, before the socket stops being read
#: (the peer then sees TCP back-pressure, as with httpx)
HIGH_WATER = 256 << 10
#: an idle keep-alive connection older than this is closed rather than reused (httpx's
#: default keep-alive expiry): servers close theirs after a few seconds too
KEEPALIVE_EXPIRY = 5.0


class Http1Error(Exception):
    """The request failed in transport or in the HTTP protocol."""


class ConnectFailed(Http1Error):
    """No connection: refused, unresolvable, TLS refused, or `timeout` (connect timeout)."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class ReadTimeout(Http1Error):
    """The upstream sent nothing for `read_timeout` seconds while the reader waited."""


class ConnectionBroken(Http1Error):
    """The connection closed before the response ended, or the reply is not HTTP."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection and the response it is receiving. The reader's side:
    `status`, `reason`, `header()`, then `read()` until it returns b""."""

    def __init__(self, read_timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._read_timeout = read_timeout
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._wait_started = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self.closed = False  # the peer closed it, or it was aborted
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        """State of a response to come."""
        self._active = False  # a request is out on this connection
        self.received = False  # a byte of the reply came in
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False  # the whole body came in
        self._until_close = True  # neither content-length nor chunked: body ends at EOF
        self._keep_alive = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._error: Http1Error | None = None

    # --- the reader's side ------------------------------------------------------------

    def header(self, name: bytes) -> str | None:
        """The value of header `name` (lower case), the first if several."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    async def read(self) -> bytes:
        """The body bytes received since the last call, waiting for some if there are
        none; b"" once the body ended."""
        while True:
            chunks = self._chunks
            if chunks:
                self._chunks = []
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    assert self.transport is not None
                    self.transport.resume_reading()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read_all(self, limit: int) -> bytes:
        """The rest of the body, `limit` bytes of it at most (the rest is not read: the
        connection is then not reused)."""
        out = bytearray()
        while len(out) < limit and (data := await self.read()):
            out += data
        return bytes(out[:limit])

    async def wait_headers(self) -> None:
        while not self.headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    def reusable(self) -> bool:
        return (
            self.complete
            and self._keep_alive
            and not self._chunks
            and self._error is None
            and not self.closed
        )

    def abort(self) -> None:
        """Close the socket now (no graceful shutdown, no TLS close_notify)."""
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    def send(self, request: bytes) -> None:
        self._reset()
        self._active = True
        assert self.transport is not None
        self.transport.write(request)

    def release(self) -> None:
        """The response ended cleanly: the connection waits idle for another request."""
        self._reset()
        self._stop_timer()
        self.idle_since = self._loop.time()

    async def _wait(self) -> None:
        """Until the parser has news. The read timeout runs from the start of the wait;
        one timer per connection, re-armed only when it fires, not a timer per read."""
        waiter = self._waiter = self._loop.create_future()
        self._wait_started = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(
                self._wait_started + self._read_timeout, self._on_timer
            )
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next wait arms it again
        due = self._wait_started + self._read_timeout
        if self._loop.time() + 0.001 >= due:  # (a timer may fire a hair early)
            self._error = ReadTimeout(f"no data for {self._read_timeout:g} s")
            waiter.set_result(None)
        else:
            self._timer = self._loop.call_at(due, self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Http1Error) -> None:
        if self._error is None and not self.complete:
            self._error = error
        self._wake()

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not subclass asyncio's: no isinstance check)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active:  # bytes nobody asked for: the connection is not sound
            self.abort()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionBroken(f"invalid HTTP response: {exc}"))
            self.abort()
            return
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        if self._active and self.headers_done and not self.complete and self._until_close:
            self.complete = True  # a body delimited by the end of the connection
            self._keep_alive = False
            self._wake()
        self.closed = True
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        if self._active:
            reason = f": {exc}" if exc else ""
            self._fail(ConnectionBroken(f"connection closed before the response ended{reason}"))

    # --- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the response: the connection is not sound
            self._keep_alive = False

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (
            name == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._until_close = False
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim reply (103 Early Hints...): the real one follows
        self.status = status
        self.headers_done = True
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if not self.headers_done:  # the end of an interim reply
            self.headers, self.reason, self._until_close = [], "", True
            return
        if self.complete:  # a second response nobody asked for
            self._keep_alive = False
            return
        self.complete = True


def default_ssl_context() -> ssl.SSLContext:
    """httpx's (certifi's certificates, no environment: `trust_env=False`), HTTP/1.1
    offered by ALPN."""
    import httpx  # only for https upstreams

    ctx = httpx.create_ssl_context(trust_env=False)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Http1Pool:
    """Keep-alive HTTP/1.1 connections to one upstream (the scheme, host and port of
    `url`; its path prefixes every request's). Every request sends `headers` too."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive: int = 32,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.base_path = parts.path.rstrip("/") + "/"
        self.ssl_context = (ssl_context or default_ssl_context()) if self.tls else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        host = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None and parts.port != (443 if self.tls else 80):
            host += f":{parts.port}"
        fixed = {"host": host, **headers}
        for name, value in fixed.items():
            if any(c in name + value for c in "\r\n\0"):
                raise ValueError(f"header {name!r}: a line break or NUL in it")
        self._head = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: list[Connection] = []
        self._targets: dict[str, bytes] = {}

    def request(self, method: str, path: str, content: bytes | None) -> bytes:
        """The bytes of a request for `path` (relative to the base path)."""
        target = self._targets.get(path)
        if target is None:
            # httpx's URL join would percent-encode what a request line cannot hold
            quoted = urllib.parse.quote(path.lstrip("/"), safe="/?&=:@!$'()*+,;%~-._")
            target = (self.base_path + quoted).encode("ascii")
            if len(self._targets) < 64:  # the few fixed paths (resumes vary)
                self._targets[path] = target
        head = b"%s %s HTTP/1.1\r\n%s" % (method.encode("ascii"), target, self._head)
        if content is None:
            return head + b"\r\n"
        return b"%scontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
            head,
            len(content),
            content,
        )

    @contextlib.asynccontextmanager
    async def stream(
        self, method: str, path: str, content: bytes | None = None
    ) -> AsyncIterator[Connection]:
        """The connection once the response's headers came in; its body is read with
        `Connection.read`. The connection goes back to the pool only if the body was
        read to its clean end (also when the caller then raised: an error reply read
        whole); on any other exit (a cancel mid-body included) it is aborted."""
        conn = await self._send(self.request(method, path, content))
        try:
            yield conn
        finally:
            if conn.reusable():
                self._release(conn)
            else:
                conn.abort()

    async def _send(self, request: bytes) -> Connection:
        while True:
            conn = self._acquire()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                conn.send(request)
                await conn.wait_headers()
                return conn
            except ConnectionBroken:
                conn.abort()
                if reused and not conn.received:
                    continue  # closed by the server as it went idle: once more, anew
                raise
            except BaseException:
                conn.abort()
                raise

    def _acquire(self) -> Connection | None:
        idle = self._idle
        if not idle:
            return None
        oldest = asyncio.get_running_loop().time() - KEEPALIVE_EXPIRY
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if not conn.closed and conn.idle_since >= oldest:
                return conn
            conn.close()
        return None

    def _release(self, conn: Connection) -> None:
        conn.release()
        if len(self._idle) >= self.keepalive:
            conn.close()
        else:
            self._idle.append(conn)

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        read_timeout = self.read_timeout
        kwargs: dict[str, Any] = {}
        if self.ssl_context is not None:
            kwargs = {"ssl": self.ssl_context, "server_hostname": self.host}
        try:
            with anyio.fail_after(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(read_timeout), self.host, self.port, **kwargs
                )
        except TimeoutError:
            raise ConnectFailed(
                f"connect to {self.host}:{self.port} timed out", timeout=True
            ) from None
        except OSError as exc:  # refused, unreachable, unresolvable, TLS refused
            raise ConnectFailed(f"connect to {self.host}:{self.port}: {exc}") from None
        return conn

    def close(self) -> None:
        """Close the idle connections (those in use close as their streams end)."""
        while self._idle:
            self._idle.pop().close()
