"""What the two upstream engines share: the HTTP clients, error mapping, retries before
the first token, and reading an upstream's SSE reply so that a cancel closes the
connection at once.

Streamed replies (the hot loop: a read per token) go through `tether.engines.http1`, a
small HTTP/1.1 client on httptools; everything else (the Responses engine's cancel call)
through httpx. A cancel of the run's scope lands in the read of the upstream's body (even
one waiting on a stalled upstream). It leaves `sse_batches`' `Http1Pool.stream` context,
which aborts the connection (a connection goes back to the pool only after a body that
ended cleanly), and that is what makes a chat-completions server (vLLM, llama.cpp, ...)
stop generating. Callers close the generator with `contextlib.aclosing`, so this holds
also when the cancel lands in their own code between two reads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import orjson

from tether.config import UpstreamConfig
from tether.engines import http1
from tether.engines.base import EngineError
from tether.engines.sse import Event, SSEParser

log = logging.getLogger("tether.upstream")

#: statuses worth another try (before the first token only): the upstream is busy or
#: restarting. A 500 is not retried: it is usually the request itself.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})


class UpstreamHTTPError(EngineError):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        code = (
            "rate_limit_exceeded"
            if status == 429
            else "invalid_prompt"
            if status in (400, 413, 422)
            else "server_error"
        )
        super().__init__(f"Upstream returned HTTP {status}: {message}", code)
        self.status = status
        self.retry_after = retry_after


class UpstreamGone(EngineError):
    """The upstream could not be reached, timed out, or broke the stream."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message, "server_error")
        self.retryable = retryable


def upstream_headers(spec: UpstreamConfig) -> dict[str, str]:
    """The headers of every request: what the upstream streams, and its API key."""
    headers = {"accept": "text/event-stream"}
    key = spec.api_key
    if key:
        header = spec.api_key_header.lower()
        headers[header] = f"Bearer {key}" if header == "authorization" else key
    return headers


def make_client(spec: UpstreamConfig, keepalive: int = 8) -> httpx.AsyncClient:
    """An httpx client for the upstream's calls that are not streamed."""
    timeout = httpx.Timeout(
        connect=spec.connect_timeout,
        read=spec.read_timeout,
        write=spec.connect_timeout,
        pool=spec.connect_timeout,
    )
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=keepalive)
    return httpx.AsyncClient(
        base_url=spec.url.rstrip("/") + "/",
        headers=upstream_headers(spec),
        timeout=timeout,
        limits=limits,
        trust_env=False,
    )


def make_pool(spec: UpstreamConfig) -> http1.Http1Pool:
    """The keep-alive connections of the upstream's streamed replies: as many kept as it
    may stream at once, so that a busy upstream's requests seldom open a new one."""
    headers = upstream_headers(spec)
    headers["user-agent"] = "tether"
    return http1.Http1Pool(
        spec.url,
        headers,
        connect_timeout=spec.connect_timeout,
        read_timeout=spec.read_timeout,
        keepalive=spec.concurrency,
    )


class Clients:
    """An upstream's clients: `streams` for streamed replies (`sse_batches`), and an
    httpx client (`clients()`) for the other calls."""

    def __init__(self, spec: UpstreamConfig) -> None:
        self._http = make_client(spec)
        self.streams = make_pool(spec)

    def __call__(self) -> httpx.AsyncClient:
        return self._http

    async def aclose(self) -> None:
        self.streams.close()
        await self._http.aclose()


#: the bytes of an error body read at most (its message is cut to 500 characters anyway)
ERROR_BODY_LIMIT = 64 << 10


def error_from(status: int, reason: str, body: bytes, retry_after: str | None) -> UpstreamHTTPError:
    """An upstream's error reply as an EngineError carrying its message."""
    message = body.decode("utf-8", "replace")[:500] or reason
    with contextlib.suppress(ValueError):
        data = orjson.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            message = str(err["message"])
        elif isinstance(err, str):
            message = err
        elif isinstance(data, dict) and isinstance(data.get("detail"), str):
            message = data["detail"]
    seconds = None
    with contextlib.suppress(TypeError, ValueError):
        seconds = float(retry_after)  # type: ignore[arg-type]
    return UpstreamHTTPError(status, message, seconds)


def is_retryable(exc: EngineError) -> bool:
    if isinstance(exc, UpstreamHTTPError):
        return exc.status in RETRY_STATUSES
    return isinstance(exc, UpstreamGone) and exc.retryable


async def backoff(attempt: int, exc: EngineError) -> None:
    """Wait before retry number `attempt` (a cancel ends the wait)."""
    delay = min(0.25 * 2**attempt, 4.0)
    if isinstance(exc, UpstreamHTTPError) and exc.retry_after is not None:
        delay = min(max(exc.retry_after, 0.0), 10.0)
    await anyio.sleep(delay)


#: the first pair `sse_events` yields: the upstream accepted the request (2xx headers).
OPENED = ("tether.opened", "")

#: events handed on per loop turn at most: a stream whose upstream is far ahead (a read
#: of 64 KiB holds hundreds of events) yields to the others between slices, so that a new
#: stream's first token does not wait for every old stream's whole backlog. While some
#: stream waits for its first event, the slices are `STARTING_TURN_EVENTS`: a loop turn
#: is then short, and the new stream's few steps (its create, claim, upstream request,
#: first read, commit, reader) each wait one turn.
TURN_EVENTS = 32
STARTING_TURN_EVENTS = 4


class _Starting:
    """How many upstream streams of this process wait for their first event."""

    count = 0


async def sse_batches(
    pool: http1.Http1Pool, method: str, path: str, body: dict[str, Any] | None
) -> AsyncGenerator[list[Event], None]:
    """An empty batch once the upstream accepted the request (2xx headers), then the
    events of an upstream SSE reply, a batch per network read (`turn_events()` at most,
    a loop turn apart). HTTP errors, transport failures and any other failure of the
    reader become EngineErrors (a parsing bug must fail the run, never hang it); a
    cancel goes through as it is."""
    content = orjson.dumps(body) if body is not None else None
    _Starting.count += 1
    waiting = True
    try:
        async with pool.stream(method, path, content) as resp:
            if resp.status >= 400:
                raise error_from(
                    resp.status,
                    resp.reason,
                    await resp.read_all(ERROR_BODY_LIMIT),
                    resp.header(b"retry-after"),
                )
            kind = (resp.header(b"content-type") or "").partition(";")[0]
            if "text/event-stream" not in kind.lower():
                raise EngineError(f"Upstream did not stream: its content-type is {kind!r}")
            coding = resp.header(b"content-encoding")
            if coding and coding.lower() != "identity":
                raise EngineError(f"Upstream sent an encoded stream ({coding}), not asked for")
            yield []
            parser = SSEParser()
            read = resp.read
            while data := await read():
                events = parser.feed(data)
                if events and waiting:
                    waiting = False
                    _Starting.count -= 1
                while len(events) > (n := turn_events()):
                    yield events[:n]
                    events = events[n:]
                    await anyio.lowlevel.checkpoint()
                if events:
                    yield events
    except http1.ConnectFailed as exc:
        if exc.timeout:
            raise UpstreamGone("Upstream timed out (ConnectTimeout)", retryable=True) from None
        raise UpstreamGone(f"Upstream unreachable: {exc}", retryable=True) from None
    except http1.ReadTimeout:
        raise UpstreamGone("Upstream timed out (ReadTimeout)", retryable=False) from None
    except http1.Http1Error as exc:  # the connection broke mid-body, a protocol error...
        raise UpstreamGone(
            f"Upstream stream broke: {type(exc).__name__}: {exc}", retryable=False
        ) from None
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"Upstream reader failed: {type(exc).__name__}: {exc}") from None
    finally:
        if waiting:
            _Starting.count -= 1


def turn_events() -> int:
    """Events a stream hands on per loop turn now."""
    return STARTING_TURN_EVENTS if _Starting.count else TURN_EVENTS


async def sse_events(
    pool: http1.Http1Pool, method: str, path: str, body: dict[str, Any] | None
) -> AsyncGenerator[tuple[str, str], None]:
    """`OPENED`, then the (event, data) pairs of an upstream SSE reply, one at a time
    (`sse_batches`, data decoded), with the same errors."""
    batches = sse_batches(pool, method, path, body)
    async with contextlib.aclosing(batches):  # closed (the connection too) on any exit
        async for batch in batches:
            if not batch:
                yield OPENED
            for event, data in batch:
                yield event, data.decode("utf-8", "replace")


def estimate_tokens(text: str) -> int:
    """A rough count (4 characters a token) for when neither the upstream nor a tokenizer
    says; the response's usage notes say it is an estimate."""
    return max(1, (len(text) + 3) // 4) if text else 0


def logprob_objects(found: Any) -> list[dict[str, Any]] | None:
    """An upstream's token log probabilities as OpenAI's `LogProb` objects (`bytes`
    filled in where the upstream left them out), or None when it sent none."""
    if not isinstance(found, list) or not found:
        return None
    out = []
    for lp in found:
        if not isinstance(lp, dict) or not isinstance(lp.get("token"), str):
            return None
        top = [
            {
                "token": t["token"],
                "logprob": t.get("logprob", 0.0),
                "bytes": t.get("bytes") or list(t["token"].encode()),
            }
            for t in lp.get("top_logprobs") or ()
            if isinstance(t, dict) and "token" in t
        ]
        out.append(
            {
                "token": lp["token"],
                "logprob": lp.get("logprob", 0.0),
                "bytes": lp.get("bytes") or list(lp["token"].encode()),
                "top_logprobs": top,
            }
        )
    return out
