"""Drive an engine's `generate` as a run does: its steps collected through `emit`, inside a
cancel scope that a test cancels after some steps (or on any condition of the steps).

Three ways for the cancel to arrive, as a run can see them:
- `"emit"`: `emit` takes the step, then cancels the scope; the cancel lands at the
  engine's next await (its next token boundary).
- `"task"`: `emit` takes the step and wakes another task, which cancels the scope a
  moment later, while the engine is busy elsewhere (a cancel from another client).
- `"inside"`: the cancel lands in `emit` itself, which raises without taking the step:
  the engine must still emit that step in its shielded cleanup (never assume it taken).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio
from anyio.lowlevel import checkpoint

from tether.engines.base import Delta, Engine, Finished, Generation, Step, ToolCallDelta

Mode = Literal["emit", "task", "inside"]


@dataclass
class Collected:
    """What one `generate` emitted, and when the cancel came (monotonic times)."""

    steps: list[Step] = field(default_factory=list)
    cancelled_at: float | None = None
    cancelled_wall: float | None = None  # time.time(), to compare with upstream records
    taken_at_cancel: int = 0  # steps taken when the scope was cancelled
    ended_at: float = 0.0
    cancel_caught: bool = False  # the engine let the cancel through to its scope

    @property
    def after_cancel(self) -> list[Step]:
        return self.steps[self.taken_at_cancel :]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps if isinstance(s, Delta))

    @property
    def finished(self) -> Finished | None:
        return next((s for s in self.steps if isinstance(s, Finished)), None)

    @property
    def stop_seconds(self) -> float:
        assert self.cancelled_at is not None
        return self.ended_at - self.cancelled_at


def tokens(steps: list[Step]) -> int:
    """Token steps (text and function-call arguments)."""
    return sum(isinstance(s, (Delta, ToolCallDelta)) for s in steps)


def after_tokens(n: int) -> Callable[[list[Step]], bool]:
    return lambda steps: tokens(steps) >= n


async def collect(
    engine: Engine,
    request: Generation,
    cancel_when: Callable[[list[Step]], bool] | None = None,
    mode: Mode = "emit",
    timeout: float = 30.0,
) -> Collected:
    """Run `engine.generate(request, emit)` to its end (or its cancel), at most `timeout`
    seconds; an `EngineError` goes up to the caller."""
    got = Collected()
    wanted = anyio.Event()
    failure: Exception | None = None  # raised after the task group, not inside a group

    def cancel(scope: anyio.CancelScope) -> None:
        got.cancelled_at, got.cancelled_wall = time.monotonic(), time.time()
        got.taken_at_cancel = len(got.steps)
        scope.cancel()

    async def canceller(scope: anyio.CancelScope) -> None:
        await wanted.wait()
        cancel(scope)

    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:
                tg.start_soon(canceller, scope)

                async def emit(step: Step) -> None:
                    when = cancel_when if got.cancelled_at is None else None
                    if when is not None and mode == "inside" and when([*got.steps, step]):
                        cancel(scope)
                        await checkpoint()  # raises: the step is not taken
                    got.steps.append(step)
                    if when is not None and mode != "inside" and when(got.steps):
                        if mode == "emit":
                            cancel(scope)
                        else:
                            wanted.set()

                try:
                    await engine.generate(request, emit)
                except Exception as exc:
                    failure = exc
                finally:
                    got.ended_at = time.monotonic()
            got.cancel_caught = scope.cancelled_caught
            tg.cancel_scope.cancel()  # the canceller, if it was never needed
    if failure is not None:
        raise failure
    return got
