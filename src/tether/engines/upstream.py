"""What the two upstream engines share: the HTTP client, error mapping, retries before
the first token, and the pump that makes a cancel close the upstream connection at once.

Why a pump: the upstream's SSE body is read by a task of its own, and the run's abort
cancels that task the moment it is set, even while the read is waiting on a stalled
upstream. Cancelling it exits the `httpx` stream context, which closes the connection
(an unfinished body is never returned to the pool), and that is what makes a
chat-completions server (vLLM, llama.cpp, ...) stop generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from httpx_sse import EventSource

from tether.config import UpstreamConfig
from tether.engines.base import Abort, EngineError

log = logging.getLogger("tether.upstream")

#: statuses worth another try (before the first token only): the upstream is busy or
#: restarting. A 500 is not retried: it is usually the request itself.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
_END = object()


class UpstreamHTTPError(EngineError):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        code = ("rate_limit_exceeded" if status == 429
                else "invalid_prompt" if status in (400, 413, 422) else "server_error")
        super().__init__(f"Upstream returned HTTP {status}: {message}", code)
        self.status = status
        self.retry_after = retry_after


class UpstreamGone(EngineError):
    """The upstream could not be reached, timed out, or broke the stream."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message, "server_error")
        self.retryable = retryable


def make_client(spec: UpstreamConfig) -> httpx.AsyncClient:
    headers = {"accept": "text/event-stream"}
    key = spec.api_key
    if key:
        header = spec.api_key_header.lower()
        headers[header] = f"Bearer {key}" if header == "authorization" else key
    timeout = httpx.Timeout(connect=spec.connect_timeout, read=spec.read_timeout,
                            write=spec.connect_timeout, pool=spec.connect_timeout)
    # No keep-alive limit worth mentioning: each generation holds one connection.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    return httpx.AsyncClient(base_url=spec.url.rstrip("/") + "/", headers=headers,
                             timeout=timeout, limits=limits, trust_env=False)


async def error_of(resp: httpx.Response) -> UpstreamHTTPError:
    """An upstream's error reply as an EngineError carrying its message."""
    body = await resp.aread()
    message = body.decode("utf-8", "replace")[:500] or resp.reason_phrase
    with contextlib.suppress(ValueError):
        data = orjson.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            message = str(err["message"])
        elif isinstance(err, str):
            message = err
        elif isinstance(data, dict) and isinstance(data.get("detail"), str):
            message = data["detail"]
    retry_after = None
    with contextlib.suppress(TypeError, ValueError):
        retry_after = float(resp.headers.get("retry-after"))
    return UpstreamHTTPError(resp.status_code, message, retry_after)


def is_retryable(exc: EngineError) -> bool:
    if isinstance(exc, UpstreamHTTPError):
        return exc.status in RETRY_STATUSES
    return isinstance(exc, UpstreamGone) and exc.retryable


async def backoff(attempt: int, exc: EngineError, abort: Abort) -> bool:
    """Wait before retry number `attempt`; False when the abort came first."""
    delay = min(0.25 * 2**attempt, 4.0)
    if isinstance(exc, UpstreamHTTPError) and exc.retry_after is not None:
        delay = min(max(exc.retry_after, 0.0), 10.0)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(abort.wait(), delay)
    return not abort.is_set()


#: the first pair `sse_events` yields: the upstream accepted the request (2xx headers).
OPENED = ("tether.opened", "")


async def sse_events(client: httpx.AsyncClient, method: str, path: str,
                     body: dict[str, Any] | None) -> AsyncIterator[tuple[str, str]]:
    """`OPENED`, then the (event, data) pairs of an upstream SSE reply. HTTP errors and
    transport failures become EngineErrors."""
    content = orjson.dumps(body) if body is not None else None
    headers = {"content-type": "application/json"} if body is not None else None
    try:
        async with client.stream(method, path, content=content, headers=headers) as resp:
            if resp.status_code >= 400:
                raise await error_of(resp)
            yield OPENED
            async for sse in EventSource(resp).aiter_sse():
                yield sse.event, sse.data
    except httpx.ConnectError as exc:
        raise UpstreamGone(f"Upstream unreachable: {exc or type(exc).__name__}",
                           retryable=True) from None
    except httpx.TimeoutException as exc:
        raise UpstreamGone(f"Upstream timed out ({type(exc).__name__})",
                           retryable=isinstance(exc, httpx.ConnectTimeout)) from None
    except httpx.HTTPError as exc:  # the connection broke mid-body, a protocol error...
        raise UpstreamGone(f"Upstream stream broke: {type(exc).__name__}: {exc}",
                           retryable=False) from None


class Pump:
    """Reads `source` in its own task into a queue; an abort cancels that task at once.

    Iterating yields what arrived, in order; after an abort it yields what had already
    arrived (those tokens were generated) and then stops. `closed_at` is when the
    upstream read was cancelled (monotonic), for the record.
    """

    def __init__(self, source: AsyncIterator[Any], abort: Abort) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run(source))
        self._watch = asyncio.ensure_future(abort.wait())
        self._watch.add_done_callback(self._on_abort)
        self.closed_at: float | None = None

    async def _run(self, source: AsyncIterator[Any]) -> None:
        put = self._queue.put_nowait
        try:
            async for item in source:
                put(item)
            put(_END)
        except asyncio.CancelledError:
            put(_END)
            raise
        except EngineError as exc:
            put(exc)
        except Exception as exc:  # never let a parsing bug hang the run
            put(EngineError(f"Upstream reader failed: {type(exc).__name__}: {exc}"))

    def _on_abort(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and not self._task.done():
            self.closed_at = time.monotonic()
            self._task.cancel()

    def __aiter__(self) -> Pump:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, EngineError):
            raise item
        return item

    async def aclose(self) -> None:
        """Stop reading and wait until the upstream connection is closed."""
        self._watch.cancel()
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


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
        top = [{"token": t["token"], "logprob": t.get("logprob", 0.0),
                "bytes": t.get("bytes") or list(t["token"].encode())}
               for t in lp.get("top_logprobs") or () if isinstance(t, dict) and "token" in t]
        out.append({"token": lp["token"], "logprob": lp.get("logprob", 0.0),
                    "bytes": lp.get("bytes") or list(lp["token"].encode()),
                    "top_logprobs": top})
    return out
