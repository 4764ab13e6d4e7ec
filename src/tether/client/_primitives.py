"""Twin concurrency primitives: `AsyncX` for `_async.py`, `X` with the same API for `_sync.py`.

`_sync.py` is generated from `_async.py` by token replacement (`scripts/unasync`): each
`AsyncX` there becomes `X`, `async`/`await` are dropped. So the two halves differ only here,
where each name has one meaning per side: tasks and anyio (asyncio or trio) for the async
one, threads for the sync one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio

AsyncReopen = Callable[[str, int | None], Awaitable[Any]]
Reopen = Callable[[str, int | None], Any]  # (response id, last sequence number) -> stream


class AsyncLock:
    """Held by whoever reads from the server: `async with`, or a `try_acquire()` that never
    waits. Released by the task that acquired it."""

    def __init__(self) -> None:
        self._lock: anyio.Lock | None = None  # made on first use, inside the event loop

    def _get(self) -> anyio.Lock:
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    def try_acquire(self) -> bool:
        try:
            self._get().acquire_nowait()
        except anyio.WouldBlock:
            return False
        return True

    def release(self) -> None:
        self._get().release()

    async def __aenter__(self) -> None:
        await self._get().acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Lock:
    """`AsyncLock` for threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class AsyncCondition:
    """Wakes the tasks waiting for a predicate whenever `notify()` is called. Set the state
    the predicate reads before notifying."""

    def __init__(self) -> None:
        self._changed: anyio.Event | None = None  # a fresh event per round of waiting

    def notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until `predicate()` is true, at most `timeout` seconds; returns `predicate()`."""
        with anyio.move_on_after(timeout):
            while not predicate():
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
        return predicate()


class Condition:
    """`AsyncCondition` for threads."""

    def __init__(self) -> None:
        self._condition = threading.Condition()

    def notify(self) -> None:
        with self._condition:
            self._condition.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until `predicate()` is true, at most `timeout` seconds; returns `predicate()`."""
        with self._condition:
            return self._condition.wait_for(predicate, timeout)


class AsyncEvent:
    """A flag that, once set, ends every `wait()`: an interruptible sleep."""

    def __init__(self) -> None:
        self._flag = False
        self._event: anyio.Event | None = None  # made on first wait, inside the event loop

    def set(self) -> None:
        self._flag = True
        if self._event is not None:
            self._event.set()

    async def wait(self, timeout: float) -> bool:
        """Until set, at most `timeout` seconds; True if set."""
        if not self._flag:
            if self._event is None:
                self._event = anyio.Event()
            with anyio.move_on_after(timeout):
                await self._event.wait()
        return self._flag


class Event:
    """`AsyncEvent` for threads; `set()` may be called from any thread."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """Until set, at most `timeout` seconds; True if set."""
        return self._event.wait(timeout)


class AsyncDeadline:
    """`with AsyncDeadline(seconds, on_expiry):` gives up the enclosed await after `seconds`
    (a cancel scope breaks a blocked read), then calls `on_expiry()`."""

    def __init__(self, seconds: float, on_expiry: Callable[[], None]) -> None:
        self._scope = anyio.move_on_after(seconds)
        self._on_expiry = on_expiry

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        swallowed = bool(self._scope.__exit__(exc_type, exc, tb))
        if self._scope.cancel_called:
            self._on_expiry()
        return swallowed


class Deadline:
    """`AsyncDeadline` for threads: a blocked read cannot be cancelled, so a watchdog timer
    calls `on_expiry()` after `seconds`, which must break the read (shut its socket down)."""

    def __init__(self, seconds: float, on_expiry: Callable[[], None]) -> None:
        self._timer = threading.Timer(seconds, on_expiry)
        self._timer.daemon = True

    def __enter__(self) -> None:
        self._timer.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timer.cancel()


class AsyncShield:
    """`with AsyncShield():` the enclosed awaits finish even if the task is being cancelled
    (closing a stream must not be cut short)."""

    def __init__(self) -> None:
        self._scope = anyio.CancelScope(shield=True)

    def __enter__(self) -> None:
        self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(self._scope.__exit__(exc_type, exc, tb))


class Shield:
    """`AsyncShield` for threads: nothing to do, a thread is never cancelled."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


async def async_sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


def sleep(seconds: float) -> None:
    time.sleep(seconds)
