"""Several engines behind one: each model id is routed to the engine that serves it.

The lifecycle sees one `Engine`. Each routed engine keeps its own concurrency: a run
waits here for a slot of its model's engine (abort-aware: a cancel while waiting ends
the run at once), so a busy upstream never holds back the models of another.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tether.engines.base import (
    Abort,
    Engine,
    EngineError,
    Generation,
    ModelInfo,
    Step,
    TokenCounter,
)


class Router:
    #: the lifecycle's own limit is only a backstop; the real limits are per engine.
    concurrency = 1_000_000

    def __init__(self, engines: list[Engine]) -> None:
        self.engines = engines
        self._routes: dict[str, Engine] = {}
        self._slots: dict[int, asyncio.Semaphore] = {}
        for engine in engines:
            for model in engine.models():
                if model.id in self._routes:
                    raise ValueError(f"model {model.id!r} is served by two engines")
                self._routes[model.id] = engine
            self._slots[id(engine)] = asyncio.Semaphore(engine.concurrency)

    @property
    def traces(self) -> dict[str, object]:
        """The scripted engine's traces, if one is routed (debug route)."""
        merged: dict[str, object] = {}
        for engine in self.engines:
            merged.update(getattr(engine, "traces", {}))
        return merged

    def models(self) -> list[ModelInfo]:
        return [m for engine in self.engines for m in engine.models()]

    async def start(self) -> None:
        for engine in self.engines:
            await engine.start()

    async def close(self) -> None:
        for engine in self.engines:
            with contextlib.suppress(Exception):
                await engine.close()

    async def count_tokens(self, request: Generation) -> int | None:
        """The routed engine's count, if it can count."""
        engine = self._routes.get(request.model)
        if isinstance(engine, TokenCounter):
            return await engine.count_tokens(request)
        return None

    async def generate(self, request: Generation, abort: Abort) -> AsyncIterator[Step]:
        engine = self._routes.get(request.model)
        if engine is None:
            raise EngineError(f"no engine serves model {request.model!r}")
        slots = self._slots[id(engine)]
        if not await _acquire(slots, abort):
            return  # cancelled while waiting for a slot: nothing was produced
        try:
            steps = engine.generate(request, abort)
            async with contextlib.aclosing(steps):  # type: ignore[type-var]
                async for step in steps:
                    yield step
        finally:
            slots.release()


async def _acquire(slots: asyncio.Semaphore, abort: Abort) -> bool:
    """Take a slot, unless the abort comes first."""
    if not slots.locked():
        await slots.acquire()
        return True
    taking = asyncio.ensure_future(slots.acquire())
    stopping = asyncio.ensure_future(abort.wait())
    try:
        await asyncio.wait({taking, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if taking.done() and not taking.cancelled():
        if abort.is_set():
            slots.release()
            return False
        return True
    taking.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await taking
    if taking.done() and not taking.cancelled():
        slots.release()  # acquired while being cancelled
    return False
