"""Calls to PostgreSQL gathered into rounds: one statement for many callers.

A pooled connection is held from the statement's send until its caller's task runs
again, and on a busy event loop (a burst of 1,000 creates and the streams they open)
that is a whole loop turn, tens of milliseconds, for every round trip: ten pooled
connections then carried a few hundred statements a second, and the burst queued for
them for seconds (bench/README.md, "1,000 concurrent streams"). In rounds, every call
made while a round is in flight (or in the same loop turn) goes into the next round, and
a round holds one connection for one round trip whatever its size, as appends already
do (`pg_append.py`).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from tether.store.base import StoreUnavailable
from tether.store.common import start

A = TypeVar("A")
R = TypeVar("R")


class Rounds(Generic[A, R]):
    """`call(arg)` runs `run` on the round's args (one result per arg, in order); one
    round at a time, started by the first call and ended when no call waits. An error
    of `run` is every caller's in the round."""

    def __init__(self, run: Callable[[list[A]], Awaitable[list[R]]], name: str) -> None:
        self._run = run
        self._name = name
        self._pending: list[tuple[A, asyncio.Future[R]]] = []
        self._current: list[tuple[A, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def call(self, arg: A) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((arg, future))
        if self._task is None:
            # Kept here and stopped by `close` (the store's, the dispatch's), like the
            # stores' other tasks.
            self._task = start(self._rounds(), self._name)
        # A cancelled caller cancels its future, which its round then skips (if the
        # round is in flight, its statement may still take effect, as a statement
        # cancelled mid-flight may).
        return await future

    async def close(self) -> None:
        """Stop the round in flight, if any (its callers get `StoreUnavailable`)."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def _rounds(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                self._current = [(a, f) for a, f in batch if not f.done()]
                if not self._current:
                    continue
                try:
                    results = await self._run([a for a, _ in self._current])
                except Exception as exc:
                    for _, f in self._current:
                        if not f.done():
                            f.set_exception(_copy(exc))
                else:
                    for (_, f), result in zip(self._current, results, strict=True):
                        if not f.done():
                            f.set_result(result)
                self._current = []
        finally:
            # Cancelled (the loop is closing): nobody would answer the callers left.
            for _, f in self._current + self._pending:
                if not f.done():
                    f.set_exception(StoreUnavailable("the store is closing"))
            self._current, self._pending = [], []
            self._task = None


def _copy(exc: Exception) -> Exception:
    """One exception object per caller: each caller's raise adds its own traceback."""
    try:
        twin = copy.copy(exc)
    except Exception:
        return exc
    twin.__cause__ = exc.__cause__
    return twin
