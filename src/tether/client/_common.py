"""The I/O-free half of the client wrappers: what a stream has shown, backoff, the verdict.

Nothing here talks to a server, so the sync and the async wrapper share it unchanged.
"""

from __future__ import annotations

import contextlib
import random
import socket
import warnings
from dataclasses import dataclass, field
from typing import Any

import openai
from openai.types.responses import Response

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
LIFECYCLE_EVENTS = frozenset(
    {"response.created", "response.queued", "response.in_progress", *TERMINAL_EVENTS}
)
LIVE_STATUSES = frozenset({"queued", "in_progress"})

DEFAULT_GRACE = 5.0


class CancelIgnoredWarning(UserWarning):
    """`cancel()` gave up waiting: the server did not end the response within the grace period."""


class StreamEndedEarly(Exception):
    """A resumable stream kept ending without its terminal event, even after reconnecting."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff between reconnects of a resumable stream.

    The n-th consecutive failed reconnect waits `min(maximum, initial * factor**n)`, less up to
    `jitter` of it at random. After `max_attempts` consecutive failures (no new event in
    between) the last error is raised. An attempt that delivers a new event resets the count.
    """

    initial: float = 0.25
    maximum: float = 8.0
    factor: float = 2.0
    jitter: float = 0.25
    max_attempts: int = 8

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * self.factor**attempt)
        return base * (1.0 - self.jitter * rng.random())


def is_connection_error(exc: BaseException) -> bool:
    """A network fault worth a reconnect: the SDK's connection/timeout errors, or (openai 2.x,
    which does not wrap errors raised while reading a stream body) httpx's transport errors."""
    if isinstance(exc, openai.APIConnectionError):
        return True
    return any(
        cls.__name__ == "TransportError" and cls.__module__.split(".")[0] in ("httpx", "httpx2")
        for cls in type(exc).__mro__
    )


def is_refusal(exc: BaseException) -> bool:
    """A definite "no" from the server (4xx), as opposed to no answer at all."""
    return isinstance(exc, openai.APIStatusError) and 400 <= exc.status_code < 500


def warn_ignored(message: str, stacklevel: int) -> None:
    warnings.warn(message, CancelIgnoredWarning, stacklevel=stacklevel)


def http_response(source: Any) -> Any:
    """The httpx response under an SDK stream (`Stream.response`, `ResponseStream._response`)."""
    return getattr(source, "response", None) or getattr(source, "_response", None)


def shutdown(source: Any) -> None:
    """Wake a reader (thread or task) blocked on `source`: shut its socket down (closing it
    from another thread would not wake a reading thread), else close the response."""
    response = http_response(source)
    if response is None:
        return
    stream = getattr(response, "extensions", {}).get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    shut = getattr(sock, "shutdown", None)  # a socket, or asyncio's TransportSocket
    if callable(shut):
        with contextlib.suppress(OSError):
            shut(socket.SHUT_RDWR)
        return
    with contextlib.suppress(Exception):
        response.close()


def _dump(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)
    return dump(mode="json") if callable(dump) else obj


@dataclass(slots=True)
class Tracker:
    """What the events so far say about the response; drops duplicates after a reconnect."""

    response_id: str | None = None
    background: bool | None = None
    last_seq: int | None = None
    terminal: Any = None  # the terminal event, once seen
    snapshot: dict[str, Any] | None = None  # the latest lifecycle `response`, as JSON
    items: dict[int, dict[str, Any]] = field(default_factory=dict)
    done_items: set[int] = field(default_factory=set)
    output_after_cancel: int = 0  # output events that arrived after the cancel was answered
    cancel_answered: bool = False

    @property
    def ended(self) -> bool:
        return self.terminal is not None

    @property
    def final_response(self) -> Response | None:
        if self.terminal is None:
            return None
        response: Response = self.terminal.response
        return response

    def observe(self, event: Any) -> bool:
        """Record `event`; False if it was already seen (a replay overlap): skip it then."""
        seq = getattr(event, "sequence_number", None)
        if isinstance(seq, int):
            if self.last_seq is not None and seq <= self.last_seq:
                return False
            self.last_seq = seq
        kind = getattr(event, "type", None)
        if kind in LIFECYCLE_EVENTS:
            response = event.response
            self.snapshot = _dump(response)
            if self.response_id is None:
                self.response_id = getattr(response, "id", None)
            if self.background is None:
                self.background = bool(getattr(response, "background", False))
            if kind in TERMINAL_EVENTS:
                self.terminal = event
            return True
        if self.cancel_answered and isinstance(kind, str) and kind.endswith(".delta"):
            self.output_after_cancel += 1
        self._accumulate(kind, event)
        return True

    def _accumulate(self, kind: Any, event: Any) -> None:
        """Keep the output so far, for when the server never sends a final response."""
        index = getattr(event, "output_index", None)
        if not isinstance(index, int):
            return
        if kind == "response.output_item.added":
            self.items[index] = _dump(event.item)
            return
        if kind == "response.output_item.done":
            self.items[index] = _dump(event.item)
            self.done_items.add(index)
            return
        item = self.items.get(index)
        if item is None:
            return
        if kind == "response.function_call_arguments.delta":
            item["arguments"] = item.get("arguments", "") + event.delta
            return
        content = item.setdefault("content", [])
        ci = getattr(event, "content_index", None)
        if not isinstance(ci, int):
            return
        if kind in ("response.content_part.added", "response.content_part.done"):
            while len(content) <= ci:
                content.append({})
            content[ci] = _dump(event.part)
        elif ci < len(content):
            if kind == "response.output_text.delta":
                content[ci]["text"] = content[ci].get("text", "") + event.delta
            elif kind == "response.refusal.delta":
                content[ci]["refusal"] = content[ci].get("refusal", "") + event.delta

    def local_response(self) -> Response:
        """The response as received: the last lifecycle snapshot plus the output streamed so
        far, unfinished items marked `incomplete`. Usage is unknown (`None`) here."""
        data: dict[str, Any] = dict(
            self.snapshot or {"id": self.response_id or "", "status": "in_progress"}
        )
        output = []
        for index in sorted(self.items):
            item = dict(self.items[index])
            if index not in self.done_items and "status" in item:
                item["status"] = "incomplete"
            output.append(item)
        if output:
            data["output"] = output
        try:
            return Response.model_validate(data)
        except ValueError:
            return Response.construct(**data)


def verdict(tracker: Tracker, retrieved: Response | None) -> tuple[Response, bool]:
    """After `cancel()` gave up on the stream: the response to return and whether the server
    ignored the cancel. It did not if it now says `cancelled` and sent no output after it
    answered the cancel (it stopped but never ended the stream), or says `failed` (it ended
    by an error). Anything else counts as ignored: still live, finished as if never asked
    to stop, or unknown (then the response is built from what the stream delivered)."""
    if retrieved is None:
        return tracker.local_response(), True
    if retrieved.status == "cancelled":
        return retrieved, tracker.output_after_cancel > 0
    return retrieved, retrieved.status != "failed"


def ignored_message(
    response_id: str, grace: float, response: Response, refused: bool, known: bool
) -> str:
    why = (
        "refused to cancel it by id"
        if refused
        else f"did not end it within the {grace:g} s grace period"
    )
    state = (
        f"is '{response.status}' on the server (it may still be running and billing)"
        if known
        else "could not be retrieved: whether it stopped is unknown"
    )
    return f"The server {why}; the stream is closed. Response {response_id} {state}."
