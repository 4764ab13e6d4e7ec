"""The `Engine` protocol: what tether needs from anything that generates text.

An engine knows nothing about responses, events or storage. It turns a prompt into token
steps, handing each to the caller's `emit`, and is stopped by a cancel of the caller's
cancel scope, which lands at its next token boundary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import anyio

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
    #: a deferred response (`2h`/`8h` completion window, `tether.schedule`): until this
    #: time an engine that schedules its own work may hold it back for interactive work
    #: (the embedded engine pauses it while any other response decodes). None: never.
    defer_until: float | None = None


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
class ReasoningDelta:
    """Thinking text produced by `tokens` token steps: shown in a reasoning output item,
    counted in `output_tokens` and in `output_tokens_details.reasoning_tokens`."""

    text: str
    tokens: int = 1


@dataclass(slots=True)
class SummaryDelta:
    """Reasoning summary text (an upstream that summarizes its thinking: a Responses
    upstream with `reasoning.summary`), for summary part `part` (0, 1, ... in order),
    produced by `tokens` token steps: counted as reasoning tokens, like thinking."""

    text: str
    part: int = 0
    tokens: int = 1


@dataclass(slots=True)
class ReasoningSource:
    """The upstream's own fields of the reasoning item (`id`, `encrypted_content`):
    sealed into tether's `encrypted_content`, so the upstream gets them back when a
    client sends the item back."""

    fields: dict[str, str]


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

    `input_tokens`/`output_tokens`/`reasoning_tokens`, when set, replace the counts so
    far (reasoning tokens are a part of the output tokens); `notes` are recorded in the
    response's usage (see README, "Upstream engines")."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    reasoning_tokens: int | None = None


Step = (
    PromptRead
    | Delta
    | ReasoningDelta
    | SummaryDelta
    | ReasoningSource
    | Finished
    | ToolCall
    | ToolCallDelta
    | Report
)


@dataclass(slots=True)
class ModelInfo:
    """A model an engine serves. `context`: how many tokens its context holds (prompt
    and output together), when known; creates whose prompt does not fit are refused or
    truncated before anything is stored (`tether.context`)."""

    id: str
    owned_by: str = "tether"
    created: int = 0
    context: int | None = None


class EngineError(Exception):
    """A failure inside the engine; the run ends `failed` with this message.

    `code` is the Response error code (`server_error`, `rate_limit_exceeded`,
    `invalid_prompt`): what an upstream's HTTP status maps to."""

    def __init__(self, message: str, code: str = "server_error") -> None:
        super().__init__(message)
        self.code = code


#: what `Engine.generate` hands each step to; a step is taken when the await returns.
Emit = Callable[[Step], Awaitable[None]]


@runtime_checkable
class Engine(Protocol):
    """Generates text for the models it serves.

    `generate(request, emit)` runs one generation, awaiting `emit(step)` for each step in
    order: one `PromptRead` first, then `Delta`s and `ReasoningDelta`s (and, for engines
    that call tools, `ToolCall`/`ToolCallDelta`s; for upstreams that summarize their
    thinking, `SummaryDelta`s and a `ReasoningSource`), `Report`s at any time after the
    `PromptRead`, and a `Finished` when the engine ended by itself (end of turn, or its
    token budget); then it returns. It raises `EngineError` on failure (the steps emitted
    before stand).

    Cancellation: the caller runs `generate` inside a cancel scope, and a cancel is that
    scope's `cancel()`. The cancellation exception is then raised at the engine's next
    await, which is a token boundary: reading the upstream, sleeping, waiting for the
    model thread, waiting for a slot, a retry backoff. The engine never swallows it. In a
    shielded cleanup (`with anyio.CancelScope(shield=True):`) before re-raising it, the
    engine may still `await emit(...)` what it had already produced but not yet emitted
    (at most the one token step that was in flight) and a `Report` (an upstream's count
    after cancelling it, a recount with the model's tokenizer); never a `Finished`.
    `emit` may itself be the await where the cancel lands (the caller makes that safe);
    the engine must not assume a step was taken if `emit` raised: such a step counts as
    produced but not emitted (`Outbox` keeps that account).
    """

    #: generations run at once; more wait (queued) in the lifecycle.
    concurrency: int

    def models(self) -> list[ModelInfo]: ...

    async def generate(self, request: Generation, emit: Emit) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Outbox:
    """An engine's steps on their way to `emit`, in order: a step leaves `pending` only
    once `emit` returned, so after a cancel `pending` holds what was produced but not
    emitted (the step whose `emit` raised, and any produced with it)."""

    __slots__ = ("_emit", "pending")

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self.pending: deque[Step] = deque()

    async def send(self, *steps: Step) -> None:
        pending = self.pending
        if len(steps) == 1 and not pending:  # the per-token path: one step, nothing owed
            pending.append(steps[0])
            await self._emit(steps[0])
            pending.pop()
            return
        pending.extend(steps)
        while pending:
            await self._emit(pending[0])
            pending.popleft()

    async def flush(self, *then: Step) -> list[Step]:
        """The cancel path (shielded): emit what is pending, never a `Finished`, then
        `then` (a `Report`). What it emitted, in order."""
        steps = [s for s in (*self.pending, *then) if type(s) is not Finished]
        self.pending.clear()
        with anyio.CancelScope(shield=True):
            for step in steps:
                await self._emit(step)
        return steps


class EngineTrace(Protocol):
    """A per-response record of what an engine did (the debug route shows `as_dict()`)."""

    def as_dict(self) -> dict[str, object]: ...


@runtime_checkable
class Traced(Protocol):
    """An optional engine capability: traces of recent responses by response id, for
    the debug route `/debug/engine/{id}` and the benchmarks."""

    @property
    def traces(self) -> Mapping[str, EngineTrace]: ...


@runtime_checkable
class TokenCounter(Protocol):
    """An optional engine capability: the prompt's exact size in tokens, as `generate`
    would read it (the same template, tools and tokenizer), or None when this engine
    cannot count for that model. Used before a response is created (context checks) and
    by `POST /v1/responses/input_tokens`."""

    async def count_tokens(self, request: Generation) -> int | None: ...


@runtime_checkable
class Pausing(Protocol):
    """An optional engine capability: it pauses a deferred generation (one with
    `Generation.defer_until` ahead) while interactive work for the same engine runs, and
    resumes it after, so the worker may let an interactive run take over a deferred
    run's slot (`tether.worker`; docs/scheduling.md)."""

    def pauses_deferred(self, model: str) -> bool:
        """Whether deferred generations of `model` pause for interactive ones."""
        ...

    def expect(self, model: str) -> None:
        """An interactive response for `model` is on its way (created, or taken from the
        queue): pause deferred decoding now rather than when it arrives, for a moment at
        most (a hint; it may never come)."""
        ...
