"""`CancellableStream`: the sync wrapper over `openai.Stream` and the `ResponseStream` helper."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

import openai
from openai.types.responses import Response

from tether.client._common import (
    DEFAULT_GRACE,
    LIVE_STATUSES,
    Backoff,
    StreamEndedEarly,
    Tracker,
    ignored_message,
    is_connection_error,
    is_refusal,
    verdict,
    warn_ignored,
)

E = TypeVar("E")
Reopen = Callable[[str, "int | None"], Any]


class CancellableStream(Generic[E]):
    """Iterates like the wrapped stream; adds `response_id`, `cancel()` and auto-resume.

    Made by `tether.client.cancellable(stream)` or `tether.client.resumable(client, id)`.
    Every event is yielded once, in `sequence_number` order, also across reconnects.
    """

    def __init__(self, client: openai.OpenAI, source: Any, reopen: Reopen, *,
                 response_id: str | None = None, starting_after: int | None = None,
                 resume: bool | None = None, backoff: Backoff | None = None) -> None:
        self._client = client
        self._source = source  # the SDK stream being read; None until (re)opened
        self._reopen = reopen
        self._tracker = Tracker(response_id=response_id, last_seq=starting_after)
        self._resume = resume
        self._backoff = backoff or Backoff()
        self._rng = random.Random()
        self._pending: deque[E] = deque()  # read by cancel(), not yet seen by the caller
        self._exhausted = False  # nothing more will be read from the server
        self._in_cancel = False
        self._interrupted = False  # the cancel deadline passed while reading
        self._wake = threading.Event()
        self._result: Response | None = None
        self._ignored = False

    # --- what the caller sees ------------------------------------------------------------

    @property
    def response_id(self) -> str | None:
        """The response's id, from `response.created` (None until that event was read;
        `cancel()` reads ahead to it by itself)."""
        return self._tracker.response_id

    @property
    def server_ignored_cancel(self) -> bool:
        """True when `cancel()` had to give up: the server did not end the response within
        the grace period (it may still be running). A `CancelIgnoredWarning` was issued."""
        return self._ignored

    @property
    def final_response(self) -> Response | None:
        """The response as it ended: the one `cancel()` returned, else the `response` of the
        terminal event (`response.completed` / `.incomplete` / `.failed`), else None."""
        return self._result or self._tracker.final_response

    def __iter__(self) -> Iterator[E]:
        return self

    def __next__(self) -> E:
        if self._pending:
            return self._pending.popleft()
        event = self._pull()
        if event is None:
            raise StopIteration
        return event

    def __enter__(self) -> CancellableStream[E]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection without cancelling. (On tether, and on OpenAI, closing a
        non-background stream cancels its response; a background one goes on.)"""
        self._exhausted = True
        self._pending.clear()
        self._drop_source()

    def get_final_response(self) -> Response:
        """Read the stream to its end and return `final_response` (for the `responses.stream()`
        helper, the accumulated, parsed response of a `response.completed`)."""
        for _ in self:
            pass
        response = self.final_response
        if response is None:
            raise RuntimeError("The stream ended without a final response.")
        return response

    # --- cancel --------------------------------------------------------------------------

    def cancel(self, grace: float = DEFAULT_GRACE) -> Response:
        """Stop the response and return it as it ended: status, partial output, usage.

        Sends `POST /responses/{id}/cancel` and reads the stream to its terminal event; the
        events read meanwhile are still yielded by iterating afterwards. Returns within
        `grace` seconds: if the server has not ended the response by then (or refused the
        cancel and went on after the connection was closed), the stream is closed, the
        response is retrieved, `server_ignored_cancel` is set and a `CancelIgnoredWarning`
        issued. Calling it again returns the same response.
        """
        if self._result is not None:
            return self._result
        deadline = time.monotonic() + grace
        soft = deadline - min(1.0, grace / 4)  # what is left after it is for the retrieve
        self._in_cancel = True
        t = self._tracker
        with self._watchdog(soft):
            self._read_while(lambda: t.response_id is None)
        rid = t.response_id
        if rid is None:
            self.close()
            raise RuntimeError("The stream ended before `response.created`: nothing to cancel.")
        refused = over = False
        retrieved: Response | None = None
        if not t.ended:
            refused = self._send_cancel(rid, soft)
            if refused:
                retrieved = self._retrieve(rid, soft)
                over = retrieved is not None and retrieved.status not in LIVE_STATUSES
            if not refused or over or t.background is not False:
                with self._watchdog(soft):
                    self._read_while(lambda: not t.ended and time.monotonic() < soft)
        self._drop_source()
        self._exhausted = True
        ignored = False
        result = t.final_response
        if result is None and over:
            result = retrieved
        if result is None:
            poll = refused and t.background is False  # a closed connection may stop it
            retrieved = self._settle(rid, deadline, poll)
            result, ignored = verdict(t, retrieved)
            if ignored:
                warn_ignored(ignored_message(rid, grace, result, refused,
                                             retrieved is not None))
        self._result, self._ignored = result, ignored
        return result

    def _read_while(self, more: Callable[[], bool]) -> None:
        while more() and not self._exhausted:
            try:
                event = self._pull()
            except Exception:  # an `error` event (APIError) or a broken stream: stop reading
                break
            if event is None:
                break
            self._pending.append(event)

    def _send_cancel(self, rid: str, until: float) -> bool:
        """POST the cancel; True if the server refused it (4xx)."""
        try:
            self._client.with_options(max_retries=0, timeout=_left(until)).responses.cancel(rid)
        except Exception as exc:
            if is_refusal(exc):
                return True
            if not (is_connection_error(exc) or isinstance(exc, openai.APIStatusError)):
                raise
        finally:
            self._tracker.cancel_answered = True
        return False

    def _retrieve(self, rid: str, until: float) -> Response | None:
        try:
            client = self._client.with_options(max_retries=0, timeout=_left(until))
            return client.responses.retrieve(rid)
        except Exception as exc:
            if is_connection_error(exc) or isinstance(exc, openai.APIStatusError):
                return None
            raise

    def _settle(self, rid: str, deadline: float, poll: bool) -> Response | None:
        """Retrieve the response once, or (`poll`) until it is no longer live."""
        retrieved, pause = None, 0.05
        while _left(deadline) > 0.01:
            latest = self._retrieve(rid, deadline)
            if latest is None:
                break
            retrieved = latest
            if not poll or latest.status not in LIVE_STATUSES:
                break
            time.sleep(min(pause, max(0.0, _left(deadline) - 0.05)))
            pause = min(pause * 2, 0.5)
        return retrieved

    # --- reading, with auto-resume ---------------------------------------------------------

    def _may_resume(self) -> bool:
        if self._in_cancel or self._tracker.response_id is None:
            return False
        return bool(self._resume if self._resume is not None else self._tracker.background)

    def _pull(self) -> E | None:
        """The next new event, reconnecting after network faults; None at the end."""
        failures = 0
        while not self._exhausted:
            error: BaseException | None = None
            try:
                if self._source is None:
                    self._source = self._reopen(str(self._tracker.response_id),
                                                self._tracker.last_seq)
                event: E = next(self._source)
            except StopIteration:  # the body ended without a terminal event
                self._drop_source()
                if self._interrupted or not self._may_resume():
                    self._exhausted = True
                    return None
            except Exception as exc:
                self._drop_source()
                if self._interrupted:
                    self._exhausted = True
                    return None
                if not (is_connection_error(exc) and self._may_resume()):
                    self._exhausted = True
                    raise
                error = exc
            else:
                if not self._tracker.observe(event):
                    continue  # already seen before the reconnect
                if self._tracker.ended:
                    self._exhausted = True
                    self._drop_source()
                return event
            if failures >= self._backoff.max_attempts:
                self._exhausted = True
                if error is not None:
                    raise error
                raise StreamEndedEarly(f"Response {self._tracker.response_id}: the stream "
                                       "kept ending without a terminal event.")
            if self._wake.wait(self._backoff.delay(failures, self._rng)):
                self._exhausted = True
                return None
            failures += 1
        return None

    def _drop_source(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            with contextlib.suppress(Exception):
                source.close()

    @contextlib.contextmanager
    def _watchdog(self, until: float) -> Iterator[None]:
        """At `until`, break a blocking read by shutting the socket down."""
        timer = threading.Timer(_left(until), self._interrupt)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _interrupt(self) -> None:
        self._interrupted = True
        self._wake.set()
        source = self._source
        if source is not None:
            shutdown(source)


def _left(until: float) -> float:
    return max(0.001, until - time.monotonic())


def http_response(source: Any) -> Any:
    """The httpx response under an SDK stream (`Stream.response`, `ResponseStream._response`)."""
    return getattr(source, "response", None) or getattr(source, "_response", None)


def shutdown(source: Any) -> None:
    """Wake a thread blocked reading `source`: shut its socket down (closing it from another
    thread would not wake the reader), else close the response."""
    response = http_response(source)
    if response is None:
        return
    stream = getattr(response, "extensions", {}).get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return
    with contextlib.suppress(Exception):
        response.close()
