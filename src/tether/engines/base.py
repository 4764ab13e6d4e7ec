"""The `Engine` protocol: what tether needs from anything that generates text.

An engine knows nothing about responses, events or storage. It turns a prompt into a
stream of token steps and stops at the next token boundary once its `Abort` is set.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

# A turn's shape is the whole server's, not the engines' alone; engines import it from here.
from tether.turns import Message as Message
from tether.turns import ToolCallSpec as ToolCallSpec


@dataclass(slots=True)
class Generation:
    """One generation request, already reduced to what engines understand."""

    response_id: str
    model: str
    messages: list[Message]
    max_output_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    #: Responses-API function tools (`{"type": "function", "name", "parameters", ...}`).
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = None
    #: the request's `text.format` when it is not plain text (json_schema / json_object).
    text_format: dict[str, Any] | None = None
    #: the client asked for a background response (an upstream may be asked the same).
    background: bool = False
    #: request fields an upstream may forward, by their Responses name (docs/fields.md):
    #: `prompt_cache_key`, `safety_identifier`, `user`, `parallel_tool_calls`,
    #: `reasoning`, `verbosity` (`text.verbosity`), penalties, `include`, ...
    forward: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PromptRead:
    """The engine has read the prompt; `input_tokens` is exact."""

    input_tokens: int


@dataclass(slots=True)
class Delta:
    """Text produced by `tokens` token steps (one step for local and scripted engines)."""

    text: str
    tokens: int = 1
    #: the tokens' log probabilities, when asked for (`include` has
    #: `message.output_text.logprobs`) and the engine knows them: OpenAI's `LogProb`
    #: objects (`token`, `logprob`, `bytes`, `top_logprobs`)
    logprobs: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class Finished:
    """The engine stopped by itself: `stop` (natural end) or `length` (token budget)."""

    reason: Literal["stop", "length"]


@dataclass(slots=True)
class ToolCall:
    """The model starts function call number `index`; its arguments follow as
    `ToolCallDelta`s with the same index."""

    index: int
    call_id: str
    name: str


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a function call's JSON arguments, produced by `tokens` token steps."""

    index: int
    arguments: str
    tokens: int = 1


@dataclass(slots=True)
class Report:
    """Counts or facts the engine learns after the tokens (an upstream's usage report,
    a recount with the model's tokenizer, whether an upstream confirmed a stop).

    `input_tokens`/`output_tokens`, when set, replace the counts so far; `notes` are
    recorded in the response's usage (see README, "Upstream engines")."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)


Step = PromptRead | Delta | Finished | ToolCall | ToolCallDelta | Report


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
    """A model an engine serves. `extra["tools"]`: the engine applies function tools,
    `tool_choice` and `text.format`. `context`: how many tokens its context holds (prompt
    and output together), when known; creates whose prompt does not fit are refused or
    truncated before anything is stored (`tether.context`)."""

    id: str
    owned_by: str = "tether"
    created: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    context: int | None = None


class EngineError(Exception):
    """A failure inside the engine; the run ends `failed` with this message.

    `code` is the Response error code (`server_error`, `rate_limit_exceeded`,
    `invalid_prompt`): what an upstream's HTTP status maps to."""

    def __init__(self, message: str, code: str = "server_error") -> None:
        super().__init__(message)
        self.code = code


@runtime_checkable
class Engine(Protocol):
    """Generates text for the models it serves.

    `generate` yields one `PromptRead` first, then `Delta`s (and, for engines that
    call tools, `ToolCall`/`ToolCallDelta`s; `Report`s at any time after the prompt),
    then a `Finished` when the engine ended by itself. When `abort` is set it returns at
    the next token boundary (without `Finished`); every token it produced has been
    yielded by then. It raises `EngineError` on failure.
    """

    #: generations run at once; more wait (queued) in the lifecycle.
    concurrency: int

    def models(self) -> list[ModelInfo]: ...

    def generate(self, request: Generation, abort: Abort) -> AsyncIterator[Step]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class TokenCounter(Protocol):
    """An optional engine capability: the prompt's exact size in tokens, as `generate`
    would read it (the same template, tools and tokenizer), or None when this engine
    cannot count for that model. Used before a response is created (context checks) and
    by `POST /v1/responses/input_tokens`."""

    async def count_tokens(self, request: Generation) -> int | None: ...
