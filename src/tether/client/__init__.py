"""cancel() and auto-resume for streaming responses on the official `openai` SDK.

Works with any Responses server (tether, the hosted API, others), sync and async, without
patching the SDK. Needs only `openai` (`pip install "tether[client]"`, or `openai>=2.54,<4`
next to a `--no-deps` install of tether); importing it never loads the server.

    from tether.client import cancellable, resumable

    stream = cancellable(client.responses.create(..., stream=True))
    for event in stream:
        ...
        final = stream.cancel(grace=5)      # -> Response: status, partial output, usage
    stream.server_ignored_cancel            # True if the server kept going

    for event in resumable(client, response_id, starting_after=41):
        ...                                 # reconnects after network faults

`cancellable(stream)` accepts what `client.responses.create(..., stream=True)`,
`client.responses.retrieve(id, stream=True)` return, and the `ResponseStream` that
`with client.responses.stream(...) as s` yields; with `AsyncOpenAI`, their async
counterparts (then `async for` and `await stream.cancel()`).

`cancel()` may be called where the stream is iterated (inside the loop or after it) or from
another thread / task while one iterates: then that reader's loop ends with the terminal event.

Server errors: an `error` event that carries a nested `error` object (tether, docs/contract.md §6.1)
makes the SDK raise `openai.APIError`; the wrappers let it propagate unchanged (it is a
failure the server reported, not a network fault, so it is never retried). `cancel()` called
afterwards returns the failed response (retrieved), with its usage.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

import openai
from openai import AsyncStream, Stream
from openai.lib.streaming.responses import (
    AsyncResponseStream,
    AsyncResponseStreamManager,
    ResponseStream,
    ResponseStreamManager,
)
from openai.lib.streaming.responses import ResponseStreamEvent as HelperEvent
from openai.types.responses import ResponseStreamEvent

from tether.client._async import AsyncCancellableStream
from tether.client._common import Backoff, CancelIgnoredWarning, StreamEndedEarly
from tether.client._sync import CancellableStream

__all__ = [
    "AsyncCancellableStream",
    "Backoff",
    "CancelIgnoredWarning",
    "CancellableStream",
    "StreamEndedEarly",
    "cancellable",
    "resumable",
]

T = TypeVar("T")


@overload
def cancellable(
    stream: Stream[ResponseStreamEvent], *, resume: bool | None = ..., backoff: Backoff | None = ...
) -> CancellableStream[ResponseStreamEvent]: ...
@overload
def cancellable(
    stream: ResponseStream[T], *, resume: bool | None = ..., backoff: Backoff | None = ...
) -> CancellableStream[HelperEvent[T]]: ...
@overload
def cancellable(
    stream: AsyncStream[ResponseStreamEvent],
    *,
    resume: bool | None = ...,
    backoff: Backoff | None = ...,
) -> AsyncCancellableStream[ResponseStreamEvent]: ...
@overload
def cancellable(
    stream: AsyncResponseStream[T], *, resume: bool | None = ..., backoff: Backoff | None = ...
) -> AsyncCancellableStream[HelperEvent[T]]: ...


def cancellable(stream: Any, *, resume: bool | None = None, backoff: Backoff | None = None) -> Any:
    """Wrap a streaming response: iterate it as before, plus `.response_id`,
    `.cancel(grace=...) -> Response`, `.server_ignored_cancel` and `.final_response`.

    Wrap it before reading from it. `resume` (default: only for background responses)
    reconnects after a dropped connection with capped exponential `backoff`, from the last
    event seen; a `responses.stream()` helper is resumed with the helper, so its
    accumulated final response stays complete.
    """
    if isinstance(stream, ResponseStreamManager | AsyncResponseStreamManager):
        raise TypeError(
            "Enter the stream manager first: "
            "`with client.responses.stream(...) as s: cancellable(s)`."
        )
    helper = isinstance(stream, ResponseStream | AsyncResponseStream)
    raw = getattr(stream, "_raw_stream", None) if helper else stream
    client = getattr(raw, "_client", None)
    if isinstance(stream, Stream | ResponseStream) and isinstance(client, openai.OpenAI):
        reopen = _helper_reopen(client, stream) if helper else _raw_reopen(client)
        return CancellableStream(client, stream, reopen, resume=resume, backoff=backoff)
    if isinstance(stream, AsyncStream | AsyncResponseStream) and isinstance(
        client, openai.AsyncOpenAI
    ):
        areopen = _helper_areopen(client, stream) if helper else _raw_areopen(client)
        return AsyncCancellableStream(client, stream, areopen, resume=resume, backoff=backoff)
    raise TypeError(f"Not a streaming response of the openai SDK: {type(stream).__name__}.")


@overload
def resumable(
    client: openai.OpenAI,
    response_id: str,
    starting_after: int | None = ...,
    *,
    backoff: Backoff | None = ...,
) -> CancellableStream[ResponseStreamEvent]: ...
@overload
def resumable(
    client: openai.AsyncOpenAI,
    response_id: str,
    starting_after: int | None = ...,
    *,
    backoff: Backoff | None = ...,
) -> AsyncCancellableStream[ResponseStreamEvent]: ...


def resumable(
    client: openai.OpenAI | openai.AsyncOpenAI,
    response_id: str,
    starting_after: int | None = None,
    *,
    backoff: Backoff | None = None,
) -> Any:
    """The events of a response after `starting_after` (all of them without it), via
    `retrieve(id, stream=True, starting_after=last_seen)`, reconnecting after
    `APIConnectionError` / `APITimeoutError` with capped exponential backoff. Each event is
    yielded exactly once, in order. The result is the same wrapper as `cancellable()`'s."""
    if isinstance(client, openai.AsyncOpenAI):
        return AsyncCancellableStream(
            client,
            None,
            _raw_areopen(client),
            response_id=response_id,
            starting_after=starting_after,
            resume=True,
            backoff=backoff,
        )
    return CancellableStream(
        client,
        None,
        _raw_reopen(client),
        response_id=response_id,
        starting_after=starting_after,
        resume=True,
        backoff=backoff,
    )


# --- how to reconnect --------------------------------------------------------------------


def _after(last_seq: int | None) -> dict[str, Any]:
    return {} if last_seq is None else {"starting_after": last_seq}


def _helper_options(stream: Any) -> dict[str, Any]:
    """The helper's `text_format` and `tools`, so a resumed helper parses the same way."""
    state = getattr(stream, "_state", None)
    options: dict[str, Any] = {}
    text_format = getattr(state, "_text_format", None)
    if isinstance(text_format, type):
        options["text_format"] = text_format
    tools = getattr(state, "_input_tools", None)
    if tools:
        options["tools"] = tools
    return options


def _raw_reopen(client: openai.OpenAI) -> Any:
    def reopen(response_id: str, last_seq: int | None) -> Any:
        responses: Any = client.responses
        return responses.retrieve(response_id, stream=True, **_after(last_seq))

    return reopen


def _helper_reopen(client: openai.OpenAI, stream: Any) -> Any:
    options = _helper_options(stream)

    def reopen(response_id: str, last_seq: int | None) -> Any:
        responses: Any = client.responses
        manager = responses.stream(response_id=response_id, **_after(last_seq), **options)
        return manager.__enter__()

    return reopen


def _raw_areopen(client: openai.AsyncOpenAI) -> Any:
    async def reopen(response_id: str, last_seq: int | None) -> Any:
        responses: Any = client.responses
        return await responses.retrieve(response_id, stream=True, **_after(last_seq))

    return reopen


def _helper_areopen(client: openai.AsyncOpenAI, stream: Any) -> Any:
    options = _helper_options(stream)

    async def reopen(response_id: str, last_seq: int | None) -> Any:
        responses: Any = client.responses
        manager = responses.stream(response_id=response_id, **_after(last_seq), **options)
        return await manager.__aenter__()

    return reopen
