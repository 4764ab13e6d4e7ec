"""The upstream engines' HTTP/1.1 client (tether.engines.http1) and `sse_batches` on it.

Against a scripted raw HTTP server on loopback (asyncio streams in the test's own loop):
each test queues the replies its requests get, and the server records every request and
when each connection closed, which is what the cancel promises are about.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from tether.config import UpstreamConfig
from tether.engines import http1, upstream
from tether.engines.base import EngineError
from tether.engines.http1 import ConnectFailed, ConnectionBroken, Http1Pool, ReadTimeout
from tether.engines.upstream import UpstreamGone, UpstreamHTTPError, make_pool, sse_batches

from conftest import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Both loops: tether serves on uvloop, whose transports differ from asyncio's."""
    return ("asyncio", {"use_uvloop": request.param == "uvloop"})


Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Request:
    connection: int  # which connection of the server's (0, 1, ...) it came on
    head: list[str]  # request line, then headers
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head[1:]:
            key, _, value = line.partition(":")
            if key.lower() == name:
                return value.strip()
        return None


@dataclass
class Server:
    replies: list[Reply] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    closed: list[asyncio.Event] = field(default_factory=list)  # one per connection
    port: int = 0
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        self.writers.append(writer)
        index = len(self.closed)
        self.closed.append(asyncio.Event())
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")[:-2]
                request = Request(index, lines, b"")
                length = int(request.header("content-length") or 0)
                request.body = await reader.readexactly(length)
                self.requests.append(request)
                await self.replies.pop(0)(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed[index].set()
            writer.close()

    async def closes(self, index: int) -> None:
        """Until connection `index` closed (2 s at most)."""
        with anyio.fail_after(2):
            await self.closed[index].wait()


@contextlib.asynccontextmanager
async def scripted() -> AsyncIterator[Server]:
    server = Server()
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for writer in server.writers:  # (cancelling a handler would log an error)
            writer.transport.abort()
        with anyio.fail_after(2):
            await asyncio.gather(*server.tasks, return_exceptions=True)


def pool_of(server: Server, **options: Any) -> Http1Pool:
    options = {"connect_timeout": 2.0, "read_timeout": 5.0, **options}
    return Http1Pool(f"http://127.0.0.1:{server.port}/v1", {"accept": "x/y"}, **options)


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"


def chunked(*parts: bytes, end: bool = True, head: bytes = SSE_HEAD) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head + b"transfer-encoding: chunked\r\n\r\n")
        for part in parts:
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        if end:
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    return reply


def sized(body: bytes, head: bytes = SSE_HEAD, close: bool = False) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head + b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        if close:
            writer.close()

    return reply


def then(first: Reply, after: Callable[[asyncio.StreamReader], Awaitable[Any]]) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await first(reader, writer)
        await after(reader)

    return reply


async def until_client_leaves(reader: asyncio.StreamReader) -> None:
    await reader.read()  # b"" when the client closed: `serve` then records it


async def body_of(pool: Http1Pool, path: str = "chat", content: bytes | None = b"{}") -> bytes:
    async with pool.stream("POST" if content is not None else "GET", path, content) as resp:
        assert resp.status == 200
        return await resp.read_all(1 << 30)


# --- the client -----------------------------------------------------------------------


async def test_chunked_and_sized_bodies_on_one_kept_alive_connection() -> None:
    async with scripted() as server:
        server.replies += [chunked(b"data: 1\n\n", b"data: 2\n\n"), sized(b"data: 3\n\n")]
        pool = pool_of(server)
        assert await body_of(pool) == b"data: 1\n\ndata: 2\n\n"
        assert await body_of(pool) == b"data: 3\n\n"
        assert [r.connection for r in server.requests] == [0, 0]
        pool.close()
        await server.closes(0)


async def test_request_line_and_headers() -> None:
    async with scripted() as server:
        server.replies += [sized(b""), sized(b"")]
        pool = pool_of(server)
        await body_of(pool, "chat/completions", b'{"a":1}')
        await body_of(pool, "responses/r 1?stream=true&starting_after=3", None)
        post, get = server.requests
        assert post.head[0] == "POST /v1/chat/completions HTTP/1.1"
        assert post.header("host") == f"127.0.0.1:{server.port}"
        assert post.header("accept") == "x/y"
        assert post.header("content-type") == "application/json"
        assert post.body == b'{"a":1}' and post.header("content-length") == "7"
        assert get.head[0] == "GET /v1/responses/r%201?stream=true&starting_after=3 HTTP/1.1"
        assert get.header("content-length") is None and get.body == b""
        pool.close()


async def test_a_body_ended_by_the_connection_close_is_not_reused() -> None:
    async with scripted() as server:
        close_delimited = SSE_HEAD + b"connection: close\r\n\r\n"

        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(close_delimited + b"data: 1\n\n")
            await writer.drain()
            writer.close()

        server.replies += [reply, sized(b"two")]
        pool = pool_of(server)
        assert await body_of(pool) == b"data: 1\n\n"
        assert await body_of(pool) == b"two"
        assert [r.connection for r in server.requests] == [0, 1]
        pool.close()


async def test_an_interim_reply_is_skipped() -> None:
    async with scripted() as server:

        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
            await sized(b"ok")(reader, writer)

        server.replies.append(reply)
        pool = pool_of(server)
        async with pool.stream("GET", "x") as resp:
            assert resp.status == 200 and resp.header(b"link") is None
            assert await resp.read_all(100) == b"ok"
        pool.close()


@pytest.mark.parametrize("where", ["headers", "body"])
async def test_a_cancel_closes_the_connection_at_once_and_it_is_not_reused(where: str) -> None:
    async with scripted() as server:
        sent = asyncio.Event()

        async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if where == "body":
                await chunked(b"data: 1\n\n", end=False)(reader, writer)
            sent.set()
            await until_client_leaves(reader)  # then nothing more: a stalled upstream

        server.replies += [stalls, sized(b"next")]
        pool = pool_of(server)
        waiting = asyncio.Event()  # the reader is at (or about to be in) its last wait
        with anyio.CancelScope() as scope:

            async def read() -> None:
                async with pool.stream("POST", "chat", b"{}") as resp:
                    assert await resp.read() == b"data: 1\n\n"
                    waiting.set()
                    await resp.read()  # waits: the upstream sends nothing more

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                with anyio.fail_after(2):
                    await (waiting if where == "body" else sent).wait()
                scope.cancel()
        await server.closes(0)
        assert await body_of(pool) == b"next"
        assert [r.connection for r in server.requests] == [0, 1]
        pool.close()


async def test_closing_a_reader_early_does_not_reuse_the_connection() -> None:
    async with scripted() as server:
        server.replies += [
            then(chunked(b"a", b"b", end=False), until_client_leaves),
            sized(b"next"),
        ]
        pool = pool_of(server)
        async with pool.stream("POST", "chat", b"{}") as resp:
            assert await resp.read()  # the rest of the body is never read
        await server.closes(0)
        assert await body_of(pool) == b"next"
        assert [r.connection for r in server.requests] == [0, 1]
        pool.close()


async def breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await chunked(b"data: 1\n\n", end=False)(reader, writer)
    writer.transport.abort()


async def test_a_broken_body_fails_and_the_connection_is_not_reused() -> None:
    async with scripted() as server:
        server.replies += [breaks, sized(b"next")]
        pool = pool_of(server)
        with pytest.raises(ConnectionBroken):
            await body_of(pool)
        assert await body_of(pool) == b"next"
        assert [r.connection for r in server.requests] == [0, 1]
        pool.close()


async def test_a_short_sized_body_and_garbage_are_broken() -> None:
    async with scripted() as server:

        async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(SSE_HEAD + b"content-length: 10\r\n\r\nabc")
            await writer.drain()
            writer.close()

        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            await until_client_leaves(reader)

        server.replies += [short, garbage]
        pool = pool_of(server)
        with pytest.raises(ConnectionBroken):
            await body_of(pool)
        with pytest.raises(ConnectionBroken, match="invalid HTTP"):
            await body_of(pool)
        await server.closes(1)
        pool.close()


async def test_read_timeout_between_reads() -> None:
    async with scripted() as server:
        server.replies += [then(chunked(b"a", end=False), until_client_leaves)]
        pool = pool_of(server, read_timeout=0.2)
        async with pool.stream("POST", "chat", b"{}") as resp:
            assert await resp.read() == b"a"
            with anyio.fail_after(3), pytest.raises(ReadTimeout):
                await resp.read()
        await server.closes(0)
        pool.close()


async def test_connect_refused_and_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    refused = Http1Pool(f"http://127.0.0.1:{free_port()}", {}, connect_timeout=2, read_timeout=2)
    with pytest.raises(ConnectFailed) as failed:
        await body_of(refused)
    assert not failed.value.timeout

    async def never(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "create_connection", never)
    hangs = Http1Pool("http://127.0.0.1:9", {}, connect_timeout=0.1, read_timeout=2)
    with anyio.fail_after(3), pytest.raises(ConnectFailed) as failed:
        await body_of(hangs)
    assert failed.value.timeout


async def test_a_kept_alive_connection_the_server_closed_is_replaced() -> None:
    async with scripted() as server:

        async def answers_then_closes(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await sized(b"one")(reader, writer)
            writer.close()

        server.replies += [answers_then_closes, sized(b"two")]
        pool = pool_of(server)
        assert await body_of(pool) == b"one"
        await server.closes(0)
        # Whether or not the pool saw the close yet, the request goes out anew once.
        assert await body_of(pool) == b"two"
        assert [r.connection for r in server.requests] == [0, 1]
        pool.close()


async def test_a_slow_reader_pauses_the_socket() -> None:
    big = bytes(range(256)) * (4 * http1.HIGH_WATER // 256)
    async with scripted() as server:
        server.replies.append(sized(big))
        pool = pool_of(server)
        async with pool.stream("GET", "x") as resp:
            with anyio.fail_after(3):
                while not resp._paused:
                    await anyio.sleep(0.01)
            assert resp._buffered < 2 * http1.HIGH_WATER
            assert await resp.read_all(len(big) + 1) == big
        pool.close()


async def test_no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")  # nothing there
    async with scripted() as server:
        server.replies.append(sized(b"direct"))
        pool = pool_of(server)
        assert await body_of(pool) == b"direct"
        pool.close()


async def test_tls_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    """An https URL connects with a verifying TLS context, the host's name for SNI and
    certificate checks, and the default port left out of Host."""
    pool = Http1Pool("https://api.example.com/v1", {}, connect_timeout=1, read_timeout=1)
    assert pool.port == 443 and pool.tls and pool.ssl_context is not None
    assert pool.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert pool.ssl_context.check_hostname
    assert b"host: api.example.com\r\n" in pool.request("GET", "x", None)
    seen: dict[str, Any] = {}

    async def capture(factory: Any, host: str, port: int, **kwargs: Any) -> Any:
        seen.update(host=host, port=port, **kwargs)
        raise ssl.SSLCertVerificationError("refused by the test")

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", capture)
    with pytest.raises(ConnectFailed):
        await body_of(pool)
    assert seen == {
        "host": "api.example.com",
        "port": 443,
        "ssl": pool.ssl_context,
        "server_hostname": "api.example.com",
    }
    with pytest.raises(ValueError, match="line break"):
        Http1Pool("https://x", {"api-key": "k\r\nx: y"}, connect_timeout=1, read_timeout=1)
    plain = Http1Pool("http://[::1]:8080", {}, connect_timeout=1, read_timeout=1)
    assert plain.ssl_context is None and plain.port == 8080
    assert b"host: [::1]:8080\r\n" in plain.request("GET", "x", None)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl's CLI: ca-certificates brings it)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    args = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    args += ["-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", *args, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_end_to_end(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    server = Server()
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=served)
    port = listener.sockets[0].getsockname()[1]
    try:
        server.replies += [
            chunked(b"data: 1\n\n"),
            then(chunked(b"data: 2\n\n", end=False), until_client_leaves),
        ]
        url = f"https://127.0.0.1:{port}/v1"
        pool = Http1Pool(url, {}, connect_timeout=2, read_timeout=5, ssl_context=trusting)
        assert await body_of(pool) == b"data: 1\n\n"
        async with pool.stream("POST", "chat", b"{}") as resp:
            assert await resp.read() == b"data: 2\n\n"
        await server.closes(0)  # aborted unfinished: the peer sees the close at once
        assert [r.connection for r in server.requests] == [0, 0]
        assert server.requests[0].header("host") == f"127.0.0.1:{port}"
        pool.close()
        untrusted = Http1Pool(url, {}, connect_timeout=2, read_timeout=5)  # httpx's CAs
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await body_of(untrusted)
    finally:
        listener.close()
        for writer in server.writers:
            writer.transport.abort()


# --- sse_batches on it ----------------------------------------------------------------


def spec_of(server: Server, **options: Any) -> UpstreamConfig:
    return UpstreamConfig(model="m", url=f"http://127.0.0.1:{server.port}/v1", **options)


async def batches_of(pool: Http1Pool, path: str = "chat/completions") -> list[list[Any]]:
    got = []
    gen = sse_batches(pool, "POST", path, {"x": 1})
    async with contextlib.aclosing(gen):
        async for batch in gen:
            got.append(batch)
    return got


async def test_sse_batches_opened_then_events_and_the_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-1")
    async with scripted() as server:
        server.replies.append(chunked(b'data: {"a":1}\n\ndata: [DO', b"NE]\n\n"))
        pool = make_pool(spec_of(server, api_key_env="UPSTREAM_KEY"))
        opened, *batches = await batches_of(pool)  # the reads may come together or not
        assert opened == [] and all(batches)
        assert [e for batch in batches for e in batch] == [("", b'{"a":1}'), ("", b"[DONE]")]
        request = server.requests[0]
        assert request.header("authorization") == "Bearer sk-1"
        assert request.header("accept") == "text/event-stream"
        assert request.header("content-type") == "application/json"
        assert request.body == b'{"x":1}'
        pool.close()
    assert upstream.turn_events() == upstream.TURN_EVENTS


async def test_sse_batches_errors() -> None:
    async with scripted() as server:
        busy = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        busy += b"retry-after: 2\r\n"
        server.replies += [
            sized(b'{"error": {"message": "slow down"}}', head=busy),
            sized(b"<html>", head=b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\n"),
            then(chunked(b"data: 1\n\n", end=False), until_client_leaves),
            breaks,
        ]
        pool = make_pool(spec_of(server, read_timeout=0.2))
        with pytest.raises(UpstreamHTTPError) as http:
            await batches_of(pool)
        assert http.value.status == 429 and http.value.retry_after == 2.0
        assert http.value.code == "rate_limit_exceeded" and "slow down" in str(http.value)
        with pytest.raises(EngineError, match="did not stream"):
            await batches_of(pool)
        # An error reply read whole keeps its connection; the other is cut unread.
        assert [r.connection for r in server.requests] == [0, 0]
        with pytest.raises(UpstreamGone, match="ReadTimeout") as timeout:
            await batches_of(pool)
        assert not timeout.value.retryable
        with pytest.raises(UpstreamGone, match="broke") as broke:
            await batches_of(pool)
        assert not broke.value.retryable
        pool.close()
    gone = make_pool(UpstreamConfig(model="m", url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(UpstreamGone, match="unreachable") as unreachable:
        await batches_of(gone)
    assert unreachable.value.retryable
    assert upstream.turn_events() == upstream.TURN_EVENTS


async def test_sse_batches_closed_by_aclosing_aborts_the_connection() -> None:
    async with scripted() as server:
        server.replies.append(then(chunked(b"data: 1\n\n", end=False), until_client_leaves))
        pool = make_pool(spec_of(server))
        gen = sse_batches(pool, "POST", "chat/completions", {})
        async with contextlib.aclosing(gen):
            assert await gen.__anext__() == []
            assert await gen.__anext__() == [("", b"1")]
        await server.closes(0)
        assert pool._idle == []
        pool.close()
