"""Several engines behind one: each model id is routed to the engine that serves it.

The lifecycle sees one `Engine`. Each routed engine keeps its own concurrency: a run
waits here for a slot of its model's engine (under the run's cancel scope: a cancel while
waiting ends the run at once, having produced nothing), so a busy upstream never holds
back the models of another.
"""

from __future__ import annotations

import contextlib

import anyio

from tether.engines.base import (
    Emit,
    Engine,
    EngineError,
    EngineTrace,
    Generation,
    ModelInfo,
    Pausing,
    TokenCounter,
    Traced,
)


class Router:
    #: the lifecycle's own limit is only a backstop; the real limits are per engine.
    concurrency = 1_000_000

    def __init__(self, engines: list[Engine]) -> None:
        self.engines = engines
        self._routes: dict[str, Engine] = {}
        self._slots: dict[int, anyio.Semaphore] = {}
        for engine in engines:
            for model in engine.models():
                if model.id in self._routes:
                    raise ValueError(f"model {model.id!r} is served by two engines")
                self._routes[model.id] = engine
            self._slots[id(engine)] = anyio.Semaphore(engine.concurrency)

    @property
    def traces(self) -> dict[str, EngineTrace]:
        """The traces of the routed engines that keep them (debug route)."""
        merged: dict[str, EngineTrace] = {}
        for engine in self.engines:
            if isinstance(engine, Traced):
                merged.update(engine.traces)
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

    def pauses_deferred(self, model: str) -> bool:
        engine = self._routes.get(model)
        return isinstance(engine, Pausing) and engine.pauses_deferred(model)

    def expect(self, model: str) -> None:
        engine = self._routes.get(model)
        if isinstance(engine, Pausing):
            engine.expect(model)

    async def generate(self, request: Generation, emit: Emit) -> None:
        engine = self._routes.get(request.model)
        if engine is None:
            raise EngineError(f"no engine serves model {request.model!r}")
        async with self._slots[id(engine)]:
            await engine.generate(request, emit)
