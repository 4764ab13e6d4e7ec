"""The `Engine` protocol: what tether needs from anything that generates text.

An engine knows nothing about responses, events or storage. It turns a prompt into a
stream of token steps and stops at the next token boundary once its `Abort` is set.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable


@dataclass(slots=True)
class Message:
    role: Literal["system", "developer", "user", "assistant"]
    text: str


@dataclass(slots=True)
class Generation:
    """One generation request, already reduced to what engines understand."""

    response_id: str
    model: str
    messages: list[Message]
    max_output_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(slots=True)
class PromptRead:
    """The engine has read the prompt; `input_tokens` is exact."""

    input_tokens: int


@dataclass(slots=True)
class Delta:
    """Text produced by `tokens` token steps (one step for local and scripted engines)."""

    text: str
    tokens: int = 1


@dataclass(slots=True)
class Finished:
    """The engine stopped by itself: `stop` (natural end) or `length` (token budget)."""

    reason: Literal["stop", "length"]


Step = PromptRead | Delta | Finished


class Abort:
    """A one-way stop signal, readable from the event loop and from engine threads.

    `set()` is called on the event loop thread. After it, an engine yields at most the
    token step that was already in flight, then returns without a `Finished`.
    """

    __slots__ = ("_event", "_flag")

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._event = asyncio.Event()

    def set(self) -> None:
        self._flag.set()
        self._event.set()

    def is_set(self) -> bool:
        return self._flag.is_set()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass(slots=True)
class ModelInfo:
    id: str
    owned_by: str = "tether"
    created: int = 0
    extra: dict[str, object] = field(default_factory=dict)


class EngineError(Exception):
    """A failure inside the engine; the run ends `failed` with this message."""


@runtime_checkable
class Engine(Protocol):
    """Generates text for the models it serves.

    `generate` yields one `PromptRead` first, then `Delta`s, then a `Finished` when the
    engine ended by itself. When `abort` is set it returns at the next token boundary
    (without `Finished`); every token it produced has been yielded by then. It raises
    `EngineError` on failure.
    """

    #: generations run at once; more wait (queued) in the lifecycle.
    concurrency: int

    def models(self) -> list[ModelInfo]: ...

    def generate(self, request: Generation, abort: Abort) -> AsyncIterator[Step]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
