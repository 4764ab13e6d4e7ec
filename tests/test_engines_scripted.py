"""The scripted engine: deterministic text, natural end, budget, abort within one step."""

from __future__ import annotations

import asyncio
import time

import pytest

from tether.engines.base import Abort, Delta, EngineError, Finished, Generation, Message, PromptRead
from tether.engines.scripted import ScriptedEngine, scripted_text

pytestmark = pytest.mark.anyio


def gen(text: str = "hello there", budget: int | None = None) -> Generation:
    return Generation("resp_1", "scripted", [Message("user", text)], budget)


async def test_natural_end_and_exact_counts() -> None:
    engine = ScriptedEngine(rate=0, length=30)
    steps = [s async for s in engine.generate(gen(), Abort())]
    assert steps[0] == PromptRead(2)
    deltas = [s for s in steps if isinstance(s, Delta)]
    assert len(deltas) == 30 and all(d.tokens == 1 for d in deltas)
    assert "".join(d.text for d in deltas) == scripted_text(30)
    assert steps[-1] == Finished("stop")
    assert engine.traces["resp_1"].produced == 30


async def test_budget_ends_with_length() -> None:
    engine = ScriptedEngine(rate=0, length=30)
    steps = [s async for s in engine.generate(gen(budget=4), Abort())]
    assert steps[-1] == Finished("length") and len(steps) == 6


async def test_abort_stops_within_one_step() -> None:
    engine = ScriptedEngine(rate=50, length=1000)
    abort = Abort()
    seen = 0
    async for step in engine.generate(gen(), abort):
        if isinstance(step, Delta):
            seen += 1
            if seen == 3:
                abort.set()
                aborted = time.time()
        assert not isinstance(step, Finished)
    trace = engine.traces["resp_1"]
    assert trace.produced == seen == 3
    assert trace.aborted_at is not None and trace.aborted_at - aborted < 0.02 + 0.5


async def test_abort_interrupts_the_wait_for_the_next_token() -> None:
    engine = ScriptedEngine(rate=0.5, length=10)  # two seconds per token
    abort = Abort()
    steps = engine.generate(gen(), abort)
    assert isinstance(await anext(steps), PromptRead)
    asyncio.get_running_loop().call_later(0.05, abort.set)
    started = time.monotonic()
    rest = [s async for s in steps]
    assert rest == [] and time.monotonic() - started < 1.0


async def test_failure_marker_raises() -> None:
    engine = ScriptedEngine(rate=0, length=10)
    with pytest.raises(EngineError):
        _ = [s async for s in engine.generate(gen("FAIL_AT=2"), Abort())]
    assert engine.traces["resp_1"].produced == 2
