"""A run: one engine generation, turned into events appended to a response's log.

`drive()` feeds the engine's steps (text deltas, function calls, token counts) into the
log as they come, and returns how the generation went (`Outcome`). It decides nothing
about the response's state: `Lifecycle` turns the outcome into the terminal transition.
When the store refuses an append (the run was fenced out: someone else ended the
response), `drive` stops the engine and returns None. When an append could not be written
(`WriteLost`, `StoreUnavailable`), the error goes up to `Lifecycle`: the engine is closed
and the run's own account of its output, no longer the log's, is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Literal

from tether import metrics, wire
from tether.engines.base import (
    Abort,
    Delta,
    Engine,
    EngineError,
    Finished,
    PromptRead,
    Report,
    ToolCall,
    ToolCallDelta,
)
from tether.runspec import RunSpec
from tether.store.base import Record, Store


@dataclass(slots=True)
class Run:
    """A run in this process: its abort signal and why it was asked to stop."""

    abort: Abort = field(default_factory=Abort)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    claimed: bool = False
    stop_reason: Literal["cancel", "shutdown"] = "cancel"

    def stop(self, reason: Literal["cancel", "shutdown"]) -> None:
        if not self.abort.is_set():
            self.stop_reason = reason
            self.abort.set()


@dataclass(slots=True)
class Outcome:
    """How a generation went, with everything its closing events need."""

    reason: str | None  # the engine's finish reason ("stop", "length"); None: stopped early
    error: str | None  # an engine or upstream error
    error_code: str
    items: list[wire.OpenItem]  # the output items it opened, in output order
    input_tokens: int
    output_tokens: int  # every one of them is in the log
    notes: dict[str, Any]  # how an upstream engine counted usage (`Report`)


async def drive(store: Store, engine: Engine, record: Record, snap: dict[str, Any],
                run: Run, token: str) -> Outcome | None:
    """Generate `record`'s response, appending its events under run token `token`."""
    spec = RunSpec.decode(record.run)
    request = spec.generation(record.id, snap["model"], bool(snap.get("background")))
    item = wire.MessageItem()
    opened = False
    calls: dict[int, wire.FunctionCallItem | wire.CustomToolCallItem] = {}  # by engine index
    input_tokens = output_tokens = 0
    reason: str | None = None
    error: str | None = None
    error_code = "server_error"
    notes: dict[str, Any] = {}  # how an upstream engine counted usage (Report)
    append = store.append
    try:
        steps = engine.generate(request, run.abort)
        async with contextlib.aclosing(steps):  # type: ignore[type-var]
            async for step in steps:
                if run.abort.is_set():  # rare: the engine went on after a stop
                    metrics.after_stop(run, step)
                if type(step) is Delta:
                    events = [item.delta(step.text, step.logprobs)]
                    if not opened:
                        item.output_index = len(calls)
                        events = item.opened() + events
                        opened = True
                    if not await append(record.id, token, events, step.tokens):
                        run.abort.set()
                        return None  # fenced out: someone else ended this response
                    output_tokens += step.tokens
                elif type(step) is PromptRead:
                    input_tokens = step.input_tokens
                    await append(record.id, token, [], input_tokens=input_tokens)
                elif type(step) is Finished:
                    reason = step.reason
                elif type(step) is ToolCall or type(step) is ToolCallDelta:
                    # Items are numbered in the order they open (message or call).
                    events = []
                    call = calls.get(step.index)
                    if call is None:
                        name = step.name if type(step) is ToolCall else ""
                        cid = step.call_id if type(step) is ToolCall else wire.new_id("call")
                        call = calls[step.index] = wire.call_item(
                            int(opened) + len(calls), cid, name, spec.tool_names)
                        events = call.opened()
                    tokens = 0
                    if type(step) is ToolCallDelta:
                        events.append(call.delta(step.arguments))
                        tokens = step.tokens
                    if not await append(record.id, token, events, tokens):
                        run.abort.set()
                        return None
                    output_tokens += tokens
                elif type(step) is Report:
                    # Late exact counts (an upstream's usage report) replace the
                    # running ones; the log's token sum is corrected to match.
                    fix = 0
                    if step.output_tokens is not None:
                        fix, output_tokens = step.output_tokens - output_tokens, \
                            step.output_tokens
                    if step.input_tokens is not None:
                        input_tokens = step.input_tokens
                    await append(record.id, token, [], fix, input_tokens=input_tokens)
                    notes.update(step.notes)
    except EngineError as exc:
        error = str(exc)
        error_code = exc.code
    items: list[wire.OpenItem] = [item] if opened else []
    items = sorted([*items, *calls.values()], key=lambda i: i.output_index)
    return Outcome(reason, error, error_code, items, input_tokens, output_tokens, notes)
