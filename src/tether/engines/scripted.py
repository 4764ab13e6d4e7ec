"""A deterministic engine for timing tests and benchmarks.

It emits one word per token step at `rate` tokens per second (0 = as fast as possible)
and ends naturally after `length` tokens. With tools offered, the prompt directive
`CALL=name:{"json":"arguments"}` (no spaces) makes it call that function instead (the
arguments streamed a few characters a token step), unless the last turn is a tool's
output: then it answers with text, so tool loops end (`CALLS=n`: after n tool outputs;
`PARALLEL=n`: n calls in one step). With `text.format` json_schema or json_object it
answers with a fixed JSON value of the schema. `THINK=n` makes it think first: n token
steps of reasoning (the same words) before the answer, all within the output budget.

It records, per response, when each token was produced and when the cancel was seen,
so tests can check that a cancel really stopped it.
"""

from __future__ import annotations

import json
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from tether.engines.base import (
    Delta,
    Emit,
    EngineError,
    Finished,
    Generation,
    ModelInfo,
    Outbox,
    PromptRead,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
)

T = TypeVar("T", int, float, str)
TRACES_KEPT = 2048  # traces of this many recent responses: a long run stays flat in memory

WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "tether",
    "keeps",
    "every",
    "event",
    "in",
    "order",
    "and",
    "stops",
    "the",
    "moment",
    "it",
    "is",
    "told",
    "to",
)


@dataclass(slots=True)
class Trace:
    """What the engine did for one response (exposed on the debug route)."""

    produced: int = 0
    token_times: array[float] = field(default_factory=lambda: array("d"))  # 8 bytes each
    aborted_at: float | None = None
    prompt_read_at: float | None = None
    messages: list[dict[str, str]] = field(default_factory=list)  # the prompt, as given
    finished: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "prompt_read_at": self.prompt_read_at,
            "messages": self.messages,
            "produced": self.produced,
            "token_times": self.token_times.tolist(),
            "aborted_at": self.aborted_at,
            "finished": self.finished,
        }


def scripted_text(n: int) -> str:
    """The text of the first `n` tokens, as the engine would emit them."""
    return "".join(_word(i) for i in range(n))


def _word(i: int) -> str:
    return (" " if i else "") + WORDS[i % len(WORDS)]


class ScriptedEngine:
    """Deterministic text at a fixed rate, steered by directives in the prompt:
    `FAIL_AT=n` raises after n tokens, `PREFILL=s` spends s seconds reading the prompt,
    `LINGER=s` waits s seconds between the last token and the natural end, `THINK=n`
    reasons for n token steps before answering."""

    concurrency = 1_000_000

    def __init__(self, rate: float = 100.0, length: int = 200) -> None:
        self.rate = rate
        self.length = length
        self.traces: dict[str, Trace] = {}

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="scripted")]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def generate(self, request: Generation, emit: Emit) -> None:
        trace = self.traces.get(request.response_id)
        if trace is None:
            trace = self.traces[request.response_id] = Trace()
            while len(self.traces) > TRACES_KEPT:  # insertion order: the oldest goes first
                del self.traces[next(iter(self.traces))]
        out = Outbox(emit)
        try:
            await self._generate(request, out, trace)
        except anyio.get_cancelled_exc_class():
            trace.aborted_at = time.time()
            # The token whose `emit` the cancel interrupted was produced: it still counts.
            await out.flush()
            raise

    async def _generate(self, request: Generation, out: Outbox, trace: Trace) -> None:
        trace.messages = [{"role": m.role, "text": m.text} for m in request.messages]
        prompt = " ".join(m.text for m in request.messages)
        fail_at = _directive(prompt, "FAIL_AT", int)
        # Reading the prompt takes PREFILL seconds; a cancel then ends it before PromptRead.
        await anyio.sleep(_directive(prompt, "PREFILL", float) or 0.0)
        trace.prompt_read_at = time.time()
        await out.send(PromptRead(input_tokens=max(1, len(prompt.split()))))
        # Thinking comes first and spends the budget as the answer does (OpenAI counts
        # reasoning tokens in `max_output_tokens`); the answer still has `length` tokens.
        think = max(0, _directive(prompt, "THINK", int) or 0)
        budget = self.length + think
        if request.max_output_tokens is not None:
            budget = min(budget, request.max_output_tokens)
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        call = _planned_call(request, prompt)
        pieces = _pieces(request.text_format) if call is None else _chunks(call[1])
        for i in range(min(think, budget)):
            await _pace(i, interval, fail_at)
            trace.produced += 1
            trace.token_times.append(time.time())
            await out.send(ReasoningDelta(_word(i)))
        thought = min(think, budget)
        budget -= thought
        per = len(pieces) if pieces else 1  # token steps of one call's arguments
        if call is not None and pieces is not None:
            # `PARALLEL=n`: n calls of the tool in one step (call j's arguments after j-1's).
            pieces = pieces * max(1, _directive(prompt, "PARALLEL", int) or 1)
        if call is not None and (budget > 0 or not think):
            await out.send(ToolCall(0, f"call_{request.response_id[-20:]}", call[0]))
        for i in range(min(budget, len(pieces)) if pieces is not None else budget):
            if interval:
                await anyio.sleep(interval)
            elif (thought + i) % 64 == 63:
                # Full speed still lets the loop breathe. A cancel can only be made while
                # this task is suspended (here, or in `emit` if the store makes it wait),
                # so it lands at this await: no per-token check is needed.
                await anyio.sleep(0)
            if fail_at is not None and thought + i == fail_at:
                raise EngineError(f"scripted failure after {thought + i} tokens")
            trace.produced += 1
            trace.token_times.append(time.time())
            if pieces is None:
                await out.send(Delta(_word(i)))
            elif call is not None:
                j, k = divmod(i, per)
                if j and not k:
                    await out.send(ToolCall(j, f"call_{request.response_id[-20:]}_{j}", call[0]))
                await out.send(ToolCallDelta(j, pieces[i]))
            else:
                await out.send(Delta(pieces[i]))
        # LINGER seconds between the last token and the end (a window for a cancel).
        await anyio.sleep(_directive(prompt, "LINGER", float) or 0.0)
        full = self.length if pieces is None else len(pieces)
        await out.send(Finished("length" if budget < full or thought < think else "stop"))
        trace.finished = True


async def _pace(i: int, interval: float, fail_at: int | None) -> None:
    """Before token step `i` of the thinking: wait for its turn (the main loop inlines the
    same, the per-token path), fail there if told to."""
    if interval:
        await anyio.sleep(interval)
    elif i % 64 == 63:
        await anyio.sleep(0)
    if fail_at is not None and i == fail_at:
        raise EngineError(f"scripted failure after {i} tokens")


def _directive(prompt: str, name: str, kind: type[T]) -> T | None:
    """`NAME=value` in the prompt steers the engine (tests): FAIL_AT, PREFILL, LINGER,
    CALL, CALLS, PARALLEL, THINK."""
    at = prompt.find(name + "=")
    if at < 0:
        return None
    value = prompt[at + len(name) + 1 :].split(maxsplit=1)
    try:
        return kind(value[0]) if value else None
    except ValueError:
        return None


def _planned_call(request: Generation, prompt: str) -> tuple[str, str] | None:
    """The function call the prompt asks for (`CALL=name:{args}`), or the one a forced
    `tool_choice` needs (arguments `{}`); None: answer with text."""
    names: list[str] = [t["name"] for t in request.tools if isinstance(t.get("name"), str)]
    choice = request.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = {t.get("name") for t in choice.get("tools") or []}
        names = [n for n in names if n in allowed]
        choice = choice.get("mode") or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function":
        names = [n for n in names if n == choice.get("name")]
        choice = "required"
    last = request.messages[-1].role if request.messages else None
    # `CALLS=n`: a loop of n steps that call the tool (the tool turns so far count them).
    wanted = _directive(prompt, "CALLS", int) or 1
    made = sum(m.role == "tool" for m in request.messages)
    answered = last == "tool" and choice != "required" and made >= wanted
    if not names or choice == "none" or answered:
        return None
    directive = _directive(prompt, "CALL", str)
    if directive is not None:
        name, _, args = directive.partition(":")
        if name in names:
            try:
                json.loads(args)
            except ValueError:
                args = "{}"
            return name, args
    return (names[0], "{}") if choice == "required" else None


def _chunks(text: str, size: int = 4) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _pieces(fmt: dict[str, Any] | None) -> list[str] | None:
    """A JSON answer for `text.format` as token pieces; None for plain text."""
    if fmt is None or fmt.get("type") not in ("json_schema", "json_object"):
        return None
    return _chunks(json.dumps(_example(fmt.get("schema") or {"type": "object"})))


def _example(schema: Any) -> Any:
    """A fixed value of a (simple) JSON schema: every property filled, enums' first."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return _example(schema[key][0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {k: _example(v) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return (
            [_example(schema["items"])] * schema.get("minItems", 0) if schema.get("items") else []
        )
    return {"string": "the", "integer": 0, "number": 0, "boolean": False}.get(str(kind))
