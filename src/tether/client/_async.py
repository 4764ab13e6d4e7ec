"""`AsyncCancellableStream` (asyncio or trio, via anyio) and its twin `CancellableStream`.

Written once, async: `_async.py` is the source, `scripts/unasync` generates `_sync.py` from it
by token replacement (`async` and `await` dropped, `AsyncX` names to their sync twins, which
`_primitives` defines with the same API), and the test command checks that `_sync.py` is
unchanged. Edit `_async.py`, then run `scripts/unasync`.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
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
    shutdown,
    verdict,
    warn_ignored,
)
from tether.client._primitives import (
    AsyncCondition,
    AsyncDeadline,
    AsyncEvent,
    AsyncLock,
    AsyncReopen,
    AsyncShield,
    async_sleep,
)

E = TypeVar("E")


class AsyncCancellableStream(Generic[E]):
    """Iterates like the wrapped stream (`async for` over an async one); adds `response_id`,
    `cancel()` and auto-resume.

    Made by `tether.client.cancellable(stream)` or `tether.client.resumable(client, id)`.
    Every event is yielded once, in `sequence_number` order, also across reconnects.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        source: Any,
        reopen: AsyncReopen,
        *,
        response_id: str | None = None,
        starting_after: int | None = None,
        resume: bool | None = None,
        backoff: Backoff | None = None,
    ) -> None:
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
        self._wake = AsyncEvent()  # cuts a backoff pause short on interrupt
        self._reading = AsyncLock()  # held by whoever reads from the server
        self._progress = AsyncCondition()  # notified on every event and at the end
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

    def __aiter__(self) -> AsyncCancellableStream[E]:
        return self

    async def __anext__(self) -> E:
        async with self._reading:
            if self._pending:
                return self._pending.popleft()
            event = await self._pull()
        if event is None:
            raise StopAsyncIteration
        return event

    async def __aenter__(self) -> AsyncCancellableStream[E]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection without cancelling. (On tether, and on OpenAI, closing a
        non-background stream cancels its response; a background one goes on.)"""
        self._finish()
        self._pending.clear()
        await self._drop_source()

    async def get_final_response(self) -> Response:
        """Read the stream to its end and return `final_response` (for the `responses.stream()`
        helper, the accumulated, parsed response of a `response.completed`)."""
        async for _ in self:
            pass
        response = self.final_response
        if response is None:
            raise RuntimeError("The stream ended without a final response.")
        return response

    # --- cancel --------------------------------------------------------------------------

    async def cancel(self, grace: float = DEFAULT_GRACE) -> Response:
        """Stop the response and return it as it ended: status, partial output, usage.

        Sends `POST /responses/{id}/cancel` and waits for the stream's terminal event.
        Called where the stream is iterated (in the loop, or after leaving it), it reads the
        stream itself; the events it reads are still yielded by iterating afterwards. Called
        from another thread (task) while one iterates, it leaves the reading to that thread
        (task), whose loop then ends with the terminal event. Returns within `grace` seconds:
        if the server has not ended the response by then (or refused the cancel and went on
        after the connection was closed), the stream is closed, the response is retrieved,
        `server_ignored_cancel` is set and a `CancelIgnoredWarning` issued. Calling it again
        returns the same response.
        """
        if self._result is not None:
            return self._result
        deadline = time.monotonic() + grace
        soft = deadline - min(1.0, grace / 4)  # what is left after it is for the retrieve
        self._in_cancel = True
        inline = self._reading.try_acquire()
        try:
            return await self._cancel(grace, deadline, soft, inline)
        finally:
            if inline:
                self._reading.release()

    async def _cancel(self, grace: float, deadline: float, soft: float, inline: bool) -> Response:
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
            self._interrupt()  # close the connection: no more waiting for this stream
        if inline:
            await self._drop_source()
        self._finish()
        ignored = False
        result = t.final_response
        if result is None and over:
            result = retrieved
        if result is None:
            poll = refused and t.background is False  # a closed connection may stop it
            retrieved = await self._settle(rid, deadline, poll)
            result, ignored = verdict(t, retrieved)
            if ignored:
                warn_ignored(
                    ignored_message(rid, grace, result, refused, retrieved is not None),
                    stacklevel=4,
                )
        self._result, self._ignored = result, ignored
        return result

    async def _await(self, done: Callable[[], bool], until: float, inline: bool) -> None:
        """Until `done()` or the stream ends, at most until `until`: read the stream
        (`inline`), or let the thread (task) that iterates read it."""
        if not inline:
            await self._progress.wait_for(lambda: done() or self._exhausted, _left(until))
            return
        with AsyncDeadline(_left(until), self._interrupt):
            await self._read_while(lambda: not done() and time.monotonic() < until)

    async def _read_while(self, more: Callable[[], bool]) -> None:
        while more() and not self._exhausted:
            try:
                event = await self._pull()
            except Exception:  # an `error` event (APIError) or a broken stream: stop reading
                break
            if event is None:
                break
            self._pending.append(event)

    async def _send_cancel(self, rid: str, until: float) -> bool:
        """POST the cancel; True if the server refused it (4xx)."""
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
        """Retrieve the response once, or (`poll`) until it is no longer live."""
        retrieved, pause = None, 0.05
        while _left(deadline) > 0.01:
            latest = await self._retrieve(rid, deadline)
            if latest is None:
                break
            retrieved = latest
            if not poll or latest.status not in LIVE_STATUSES:
                break
            await async_sleep(min(pause, max(0.0, _left(deadline) - 0.05)))
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
                self._finish()
                return None
            error: BaseException | None = None
            try:
                if self._source is None:
                    t = self._tracker
                    self._source = await self._reopen(str(t.response_id), t.last_seq)
                event: E = await self._source.__anext__()
            except StopAsyncIteration:  # the body ended without a terminal event
                await self._drop_source()
                if self._interrupted or not self._may_resume():
                    self._finish()
                    return None
            except Exception as exc:
                await self._drop_source()
                if self._interrupted:
                    self._finish()
                    return None
                if not (is_connection_error(exc) and self._may_resume()):
                    self._finish()
                    raise
                error = exc
            else:
                if not self._tracker.observe(event):
                    continue  # already seen before the reconnect
                if self._tracker.ended:
                    await self._drop_source()
                    self._finish()
                else:
                    self._progress.notify()
                return event
            if failures >= self._backoff.max_attempts:
                self._finish()
                if error is not None:
                    raise error
                raise StreamEndedEarly(
                    f"Response {self._tracker.response_id}: the stream "
                    "kept ending without a terminal event."
                )
            if await self._wake.wait(self._backoff.delay(failures, self._rng)):
                self._finish()
                return None
            failures += 1
        return None

    def _finish(self) -> None:
        """Nothing more will be read from the server; wake a `cancel()` waiting for it."""
        self._exhausted = True
        self._progress.notify()

    async def _drop_source(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            with AsyncShield(), contextlib.suppress(Exception):
                await source.close()

    def _interrupt(self) -> None:
        """Make a reader blocked on the stream give up: shut its socket down."""
        self._interrupted = True
        self._wake.set()
        source = self._source
        if source is not None:
            shutdown(source)


def _left(until: float) -> float:
    return max(0.001, until - time.monotonic())
