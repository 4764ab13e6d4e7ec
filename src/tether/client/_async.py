"""`AsyncCancellableStream`: the async twin of `CancellableStream` (asyncio or trio, via anyio).

Deadlines are cancel scopes here, so no watchdog thread is needed to break a blocked read.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

import anyio
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
    shutdown,
    verdict,
    warn_ignored,
)

E = TypeVar("E")
AsyncReopen = Callable[[str, "int | None"], Awaitable[Any]]


class AsyncCancellableStream(Generic[E]):
    """`async for` like the wrapped stream; adds `response_id`, `await cancel()` and
    auto-resume. Same semantics as `CancellableStream`."""

    def __init__(self, client: openai.AsyncOpenAI, source: Any, reopen: AsyncReopen, *,
                 response_id: str | None = None, starting_after: int | None = None,
                 resume: bool | None = None, backoff: Backoff | None = None) -> None:
        self._client = client
        self._source = source
        self._reopen = reopen
        self._tracker = Tracker(response_id=response_id, last_seq=starting_after)
        self._resume = resume
        self._backoff = backoff or Backoff()
        self._rng = random.Random()
        self._pending: deque[E] = deque()
        self._exhausted = False
        self._in_cancel = False
        self._interrupted = False
        self._busy = False  # a task is inside __anext__, reading from the server
        self._changed: anyio.Event | None = None  # set on every event and at the end
        self._result: Response | None = None
        self._ignored = False

    # --- what the caller sees ------------------------------------------------------------

    @property
    def response_id(self) -> str | None:
        """The response's id, from `response.created` (None until that event was read)."""
        return self._tracker.response_id

    @property
    def server_ignored_cancel(self) -> bool:
        """True when `cancel()` had to give up on the server (see `CancellableStream`)."""
        return self._ignored

    @property
    def final_response(self) -> Response | None:
        """The response as it ended (see `CancellableStream.final_response`)."""
        return self._result or self._tracker.final_response

    def __aiter__(self) -> AsyncCancellableStream[E]:
        return self

    async def __anext__(self) -> E:
        if self._pending:
            return self._pending.popleft()
        self._busy = True
        try:
            event = await self._pull()
        finally:
            self._busy = False
        if event is None:
            raise StopAsyncIteration
        return event

    async def __aenter__(self) -> AsyncCancellableStream[E]:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection without cancelling (see `CancellableStream.close`)."""
        self._finish()
        self._pending.clear()
        await self._drop_source()

    async def get_final_response(self) -> Response:
        """Read the stream to its end and return `final_response`."""
        async for _ in self:
            pass
        response = self.final_response
        if response is None:
            raise RuntimeError("The stream ended without a final response.")
        return response

    # --- cancel --------------------------------------------------------------------------

    async def cancel(self, grace: float = DEFAULT_GRACE) -> Response:
        """Stop the response and return it as it ended (see `CancellableStream.cancel`);
        called from another task while one iterates, it leaves the reading to that task."""
        if self._result is not None:
            return self._result
        deadline = time.monotonic() + grace
        soft = deadline - min(1.0, grace / 4)
        self._in_cancel = True
        inline = not self._busy
        t = self._tracker
        await self._await(lambda: t.response_id is not None, soft, inline)
        rid = t.response_id
        if rid is None:
            self._interrupt()
            if inline:
                await self._drop_source()
            self._finish()
            raise RuntimeError("The stream ended before `response.created`: nothing to cancel.")
        refused = over = False
        retrieved: Response | None = None
        if not t.ended:
            refused = await self._send_cancel(rid, soft)
            if refused:
                retrieved = await self._retrieve(rid, soft)
                over = retrieved is not None and retrieved.status not in LIVE_STATUSES
            if not refused or over or t.background is not False:
                await self._await(lambda: t.ended, soft, inline)
        if not t.ended:
            self._interrupt()
        if inline:
            await self._drop_source()
        self._finish()
        ignored = False
        result = t.final_response
        if result is None and over:
            result = retrieved
        if result is None:
            poll = refused and t.background is False
            retrieved = await self._settle(rid, deadline, poll)
            result, ignored = verdict(t, retrieved)
            if ignored:
                warn_ignored(ignored_message(rid, grace, result, refused,
                                             retrieved is not None), stacklevel=3)
        self._result, self._ignored = result, ignored
        return result

    async def _await(self, done: Callable[[], bool], until: float, inline: bool) -> None:
        """Until `done()` or the stream ends, at most until `until`: read the stream
        (`inline`), or let the task that iterates read it."""
        with anyio.move_on_after(_left(until)):
            if inline:
                await self._read_while(lambda: not done())
                return
            while not (done() or self._exhausted):
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    def _finish(self) -> None:
        self._exhausted = True
        self._notify()

    def _interrupt(self) -> None:
        """Make a task blocked reading the stream give up: shut the socket down."""
        self._interrupted = True
        if self._source is not None:
            shutdown(self._source)

    async def _read_while(self, more: Callable[[], bool]) -> None:
        while more() and not self._exhausted:
            try:
                event = await self._pull()
            except Exception:
                break
            if event is None:
                break
            self._pending.append(event)

    async def _send_cancel(self, rid: str, until: float) -> bool:
        try:
            client = self._client.with_options(max_retries=0, timeout=_left(until))
            await client.responses.cancel(rid)
        except Exception as exc:
            if is_refusal(exc):
                return True
            if not (is_connection_error(exc) or isinstance(exc, openai.APIStatusError)):
                raise
        finally:
            self._tracker.cancel_answered = True
        return False

    async def _retrieve(self, rid: str, until: float) -> Response | None:
        try:
            client = self._client.with_options(max_retries=0, timeout=_left(until))
            return await client.responses.retrieve(rid)
        except Exception as exc:
            if is_connection_error(exc) or isinstance(exc, openai.APIStatusError):
                return None
            raise

    async def _settle(self, rid: str, deadline: float, poll: bool) -> Response | None:
        retrieved, pause = None, 0.05
        while _left(deadline) > 0.01:
            latest = await self._retrieve(rid, deadline)
            if latest is None:
                break
            retrieved = latest
            if not poll or latest.status not in LIVE_STATUSES:
                break
            await anyio.sleep(min(pause, max(0.0, _left(deadline) - 0.05)))
            pause = min(pause * 2, 0.5)
        return retrieved

    # --- reading, with auto-resume ---------------------------------------------------------

    def _may_resume(self) -> bool:
        if self._in_cancel or self._tracker.response_id is None:
            return False
        return bool(self._resume if self._resume is not None else self._tracker.background)

    async def _pull(self) -> E | None:
        """The next new event, reconnecting after network faults; None at the end."""
        failures = 0
        while not self._exhausted:
            if self._interrupted:
                break
            error: BaseException | None = None
            try:
                if self._source is None:
                    self._source = await self._reopen(str(self._tracker.response_id),
                                                      self._tracker.last_seq)
                event: E = await self._source.__anext__()
            except StopAsyncIteration:
                await self._drop_source()
                if self._interrupted or not self._may_resume():
                    break
            except Exception as exc:
                await self._drop_source()
                if self._interrupted:
                    break
                if not (is_connection_error(exc) and self._may_resume()):
                    self._finish()
                    raise
                error = exc
            else:
                if not self._tracker.observe(event):
                    continue
                if self._tracker.ended:
                    await self._drop_source()
                    self._finish()
                else:
                    self._notify()
                return event
            if failures >= self._backoff.max_attempts:
                self._finish()
                if error is not None:
                    raise error
                raise StreamEndedEarly(f"Response {self._tracker.response_id}: the stream "
                                       "kept ending without a terminal event.")
            await anyio.sleep(self._backoff.delay(failures, self._rng))
            failures += 1
        self._finish()
        return None

    async def _drop_source(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await source.close()


def _left(until: float) -> float:
    return max(0.001, until - time.monotonic())
