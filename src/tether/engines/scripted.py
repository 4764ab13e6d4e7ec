"""A deterministic engine for timing tests and benchmarks.

It emits one word per token step at `rate` tokens per second (0 = as fast as possible)
and ends naturally after `length` tokens. It records, per response, when each token was
produced and when the abort was seen, so tests can check that a cancel really stopped it.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

from tether.engines.base import (
    Abort,
    Delta,
    EngineError,
    Finished,
    Generation,
    ModelInfo,
    PromptRead,
    Step,
)

T = TypeVar("T", int, float)
TRACES_KEPT = 2048  # traces of this many recent responses: a long run stays flat in memory

WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "tether",
    "keeps", "every", "event", "in", "order", "and", "stops", "the", "moment", "it", "is",
    "told", "to",
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
    `LINGER=s` waits s seconds between the last token and the natural end."""

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

    async def generate(self, request: Generation, abort: Abort) -> AsyncIterator[Step]:
        trace = self.traces.get(request.response_id)
        if trace is None:
            trace = self.traces[request.response_id] = Trace()
            while len(self.traces) > TRACES_KEPT:  # insertion order: the oldest goes first
                del self.traces[next(iter(self.traces))]
        trace.messages = [{"role": m.role, "text": m.text} for m in request.messages]
        prompt = " ".join(m.text for m in request.messages)
        fail_at = _directive(prompt, "FAIL_AT", int)
        # Reading the prompt takes PREFILL seconds; an abort then ends it before PromptRead.
        if await _interrupted(abort, _directive(prompt, "PREFILL", float) or 0.0):
            trace.aborted_at = time.time()
            return
        trace.prompt_read_at = time.time()
        yield PromptRead(input_tokens=max(1, len(prompt.split())))
        budget = self.length
        if request.max_output_tokens is not None:
            budget = min(budget, request.max_output_tokens)
        interval = 1.0 / self.rate if self.rate > 0 else 0.0
        for i in range(budget):
            if interval:
                if await _interrupted(abort, interval):
                    break
            elif abort.is_set():
                break
            if fail_at is not None and i == fail_at:
                raise EngineError(f"scripted failure after {i} tokens")
            trace.produced += 1
            trace.token_times.append(time.time())
            yield Delta(_word(i))
            if not interval and i % 64 == 63:
                await asyncio.sleep(0)  # full speed still lets the loop breathe
        else:
            # LINGER seconds between the last token and the end (a window for a cancel).
            if not await _interrupted(abort, _directive(prompt, "LINGER", float) or 0.0):
                trace.finished = True
                yield Finished("length" if budget < self.length else "stop")
                return
        trace.aborted_at = time.time()


async def _interrupted(abort: Abort, delay: float) -> bool:
    """Sleep `delay` seconds; True when the abort came first."""
    if abort.is_set():
        return True
    if delay <= 0:
        return False
    try:
        await asyncio.wait_for(abort.wait(), delay)
    except TimeoutError:
        # The delay and the abort can end together (a loaded loop runs both callbacks in
        # one turn): the abort wins, or a token would follow the stop.
        return abort.is_set()
    return True


def _directive(prompt: str, name: str, kind: type[T]) -> T | None:
    """`NAME=value` in the prompt steers the engine (tests): FAIL_AT, PREFILL, LINGER."""
    at = prompt.find(name + "=")
    if at < 0:
        return None
    value = prompt[at + len(name) + 1 :].split(maxsplit=1)
    try:
        return kind(value[0]) if value else None
    except ValueError:
        return None
