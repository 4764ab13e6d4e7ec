"""Driving one generation: the engine's steps turned into events appended to a log.

`drive()` runs the engine inside the run's cancel scope, with `Progress.take` as the
engine's `emit`: each step (text delta, function call, token counts) is appended to the
response's log as it comes — the hot path, engine → log. `Progress` is the run's own account
of what reached the log (items, tokens, usage notes); it survives a cancel, so the run's
ending closes exactly what was appended. This module decides nothing about the response's
state: `Lifecycle` turns the progress into the terminal transition.

When the store refuses an append (the run was fenced out: someone else ended the
response), the run's scope is cancelled (`fenced`) and the progress says so. When an append
could not be written (`WriteLost`, `StoreUnavailable`), the error goes up to `Lifecycle`:
the run's account is no longer the log's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from tether import metrics, wire, wire_output
from tether.engines.base import (
    Delta,
    Engine,
    EngineError,
    Finished,
    Generation,
    PromptRead,
    ReasoningDelta,
    ReasoningSource,
    Report,
    Step,
    SummaryDelta,
    ToolCall,
    ToolCallDelta,
)
from tether.runner import Run
from tether.store.base import Store


@dataclass(slots=True)
class Progress:
    """What a run appended so far, with everything its closing events need."""

    store: Store
    response_id: str
    token: str  # the run token its appends are made under
    run: Run
    #: the request's tools by their flattened name (`wire_output.call_item`); None: no renames
    tool_names: dict[str, dict[str, Any]] | None = None
    #: `include` has `reasoning.encrypted_content`: reasoning items carry it when done
    sealed: bool = False
    message: wire_output.MessageItem = field(default_factory=wire_output.MessageItem)
    opened: bool = False  # the message item is open
    reasoning: wire_output.ReasoningItem | None = None  # the reasoning item, once open
    calls: dict[int, wire_output.CallItem] = field(default_factory=dict)  # by engine index
    #: items closed before the run's end (a tool loop's earlier steps), by output index
    closed: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    #: open items a tool loop owns (an MCP server's listing)
    extra: list[wire_output.OpenItem] = field(default_factory=list)
    #: the counts of a tool loop's earlier steps: an engine counts its own step only
    base_input: int = 0
    base_output: int = 0
    base_reasoning: int = 0
    input_tokens: int = 0
    output_tokens: int = 0  # every one of them is in the log
    reasoning_tokens: int = 0  # the part of `output_tokens` that was thinking
    reason: str | None = None  # the engine's finish reason ("stop", "length"); None: stopped
    error: str | None = None  # an engine or upstream error
    error_code: str = "server_error"
    notes: dict[str, Any] = field(default_factory=dict)  # how an upstream counted (`Report`)
    fenced: bool = False  # an append was refused: someone else ended the response

    async def take(self, step: Step) -> None:
        """The engine's `emit`: append `step`'s events (and tokens) to the log.

        A step is taken exactly when this returns: if it raises (a cancel landing while
        `Store.append` waits for room, which then appends nothing), the run's account is
        as before the call, so the engine may emit the step again in its cleanup."""
        if self.run.reason is not None:  # rare: the engine went on after a stop
            if self.fenced:
                return
            if self.run.reason == "cancel":
                metrics.after_stop(step)
        if type(step) is Delta:  # the hot path: no scope, an undo on the rare cancel
            if not self.opened:
                await self._delta(step)  # the first: it opens the message
                return
            # Every later token: `_delta` inlined (a coroutine less per token).
            message, tokens = self.message, step.tokens
            event = message.delta(step.text, step.logprobs)
            try:
                taken = await self.store.append(self.response_id, self.token, [event], tokens)
            except BaseException:
                message.undo(step.logprobs)  # not appended: the item must not hold it
                raise
            if taken:
                self.output_tokens += tokens
            else:
                self._fence()
        elif type(step) is ReasoningDelta:  # the same rule as a `Delta`
            await self._thought(step)
        elif type(step) is SummaryDelta:  # the same rule as a `Delta`
            await self._summary(step)
        elif type(step) is not Finished:
            # Rare steps (prompt, calls, reports): shielded, so never half taken.
            with anyio.CancelScope(shield=True):
                await self._rare(step)
        else:
            self.reason = step.reason

    async def _delta(self, step: Delta) -> None:
        message, opened = self.message, self.opened
        if not opened:
            message.output_index = self._opened()
        events = [message.delta(step.text, step.logprobs)]
        if not opened:
            events = message.opened() + events
            self.opened = True
        try:
            taken = await self.store.append(self.response_id, self.token, events, step.tokens)
        except BaseException:
            message.undo(step.logprobs)  # not appended: the item must not hold it
            self.opened = opened
            raise
        if taken:
            self.output_tokens += step.tokens
        else:
            self._fence()

    def _thinking(self) -> tuple[wire_output.ReasoningItem, list[dict[str, Any]]]:
        """The reasoning item, and its opening events if it is not open yet."""
        if self.reasoning is not None:
            return self.reasoning, []
        item = wire_output.ReasoningItem(self._opened(), sealed=self.sealed)
        return item, item.opened()

    async def _thought(self, step: ReasoningDelta) -> None:
        item, events = self._thinking()
        part = item.part
        events += item.thinking(step.text)
        try:
            taken = await self._append(events, step.tokens)
        except BaseException:
            item.undo(part)  # not appended: the item must not hold it (nor be open)
            raise
        self._thought_taken(item, taken, step.tokens)

    async def _summary(self, step: SummaryDelta) -> None:
        item, events = self._thinking()
        parts, was_open = len(item.summary), item.summary_open
        events += item.summary_delta(step.part, step.text)
        try:
            taken = await self._append(events, step.tokens)
        except BaseException:
            item.undo_summary(parts, was_open)
            raise
        self._thought_taken(item, taken, step.tokens)

    def _thought_taken(self, item: wire_output.ReasoningItem, taken: bool, tokens: int) -> None:
        self.reasoning = item
        if taken:
            self.output_tokens += tokens
            self.reasoning_tokens += tokens

    def _opened(self) -> int:
        """How many items are open: the next one's `output_index` (items are numbered
        in the order they open: reasoning, message or call)."""
        return (
            len(self.closed)
            + len(self.extra)
            + int(self.opened)
            + (self.reasoning is not None)
            + len(self.calls)
        )

    async def _rare(self, step: Step) -> None:
        if type(step) is PromptRead:
            self.input_tokens = self.base_input + step.input_tokens
            await self._append([], input_tokens=self.input_tokens)
        elif type(step) is ToolCall or type(step) is ToolCallDelta:
            await self._call(step)
        elif type(step) is Report:
            await self._report(step)
        elif type(step) is ReasoningSource:
            # Sealed into the item's encrypted_content (nothing of it is logged). An
            # upstream item of neither text nor summary is opened for it: the client
            # gets the upstream's encrypted reasoning, as from the upstream itself.
            item, events = self._thinking()
            if events:
                await self._append(events)
            self.reasoning = item
            item.upstream = step.fields

    async def _call(self, step: ToolCall | ToolCallDelta) -> None:
        # Items are numbered in the order they open (message or call).
        events = []
        call = self.calls.get(step.index)
        if call is None:
            name = step.name if type(step) is ToolCall else ""
            cid = step.call_id if type(step) is ToolCall else wire.new_id("call")
            call = self.calls[step.index] = wire_output.call_item(
                self._opened(), cid, name, self.tool_names
            )
            events = call.opened()
        tokens = 0
        if type(step) is ToolCallDelta:
            event = call.delta(step.arguments)
            if event is not None:  # (an approval request streams no arguments)
                events.append(event)
            tokens = step.tokens
        if await self._append(events, tokens):
            self.output_tokens += tokens

    async def _report(self, step: Report) -> None:
        # Late exact counts (an upstream's usage report) replace the running ones; the
        # log's token sum is corrected to match.
        fix = 0
        if step.output_tokens is not None:
            fix = self.base_output + step.output_tokens - self.output_tokens
        if step.input_tokens is not None:
            self.input_tokens = self.base_input + step.input_tokens
        if await self._append([], fix, input_tokens=self.input_tokens):
            self.output_tokens += fix
            if step.reasoning_tokens is not None:
                self.reasoning_tokens = self.base_reasoning + step.reasoning_tokens
            self.notes.update(step.notes)

    async def _append(
        self, events: list[dict[str, Any]], tokens: int = 0, input_tokens: int | None = None
    ) -> bool:
        if await self.store.append(self.response_id, self.token, events, tokens, input_tokens):
            return True
        self._fence()
        return False

    def _fence(self) -> None:
        """The store refused an append: someone else ended the response."""
        self.fenced = True
        self.run.stop("fenced")

    def items(self) -> list[wire_output.OpenItem]:
        """The output items still open, in output order."""
        items: list[wire_output.OpenItem] = [self.message] if self.opened else []
        if self.reasoning is not None:
            items.append(self.reasoning)
        return sorted([*items, *self.calls.values(), *self.extra], key=lambda i: i.output_index)

    def done(self) -> list[dict[str, Any]]:
        """The output items closed before the run's end, in output order."""
        return [item for _, item in sorted(self.closed, key=lambda c: c[0])]

    # --- a tool loop's steps (`tether.tool_loop`) -------------------------------------

    async def put(self, events: list[dict[str, Any]]) -> None:
        """Append a tool loop's own events (no tokens): shielded, never half taken."""
        with anyio.CancelScope(shield=True):
            await self._append(events)

    def next_index(self) -> int:
        return self._opened()

    def close(self, item: wire_output.OpenItem, status: str = "completed") -> None:
        """`item`, whose closing events were appended, is no longer open."""
        self.closed.append((item.output_index, item.item(status)))

    async def close_text(self) -> None:
        """The engine's step ended: its reasoning and message close `completed`."""
        items: list[wire_output.OpenItem] = [self.message] if self.opened else []
        if self.reasoning is not None:
            items.append(self.reasoning)
        items.sort(key=lambda i: i.output_index)
        await self.put([ev for i in items for ev in i.closed("completed")])
        for item in items:
            self.close(item)
        self.message, self.opened, self.reasoning = wire_output.MessageItem(), False, None

    def next_step(self) -> None:
        """The loop generates again: the counts so far are the next step's base."""
        self.calls = {}
        self.base_input = self.input_tokens
        self.base_output = self.output_tokens
        self.base_reasoning = self.reasoning_tokens


#: a run of many engine steps (`tether.tool_loop.run`, its loop given)
Steps = Callable[[Engine, Generation, "Progress"], Awaitable[None]]


async def drive(
    engine: Engine, request: Generation, progress: Progress, steps: Steps | None = None
) -> None:
    """Generate `request` into `progress`, inside the run's cancel scope: a cancel ends
    this call at the engine's next token boundary (or a tool loop's call in flight), with
    `progress` holding what the log holds. An engine failure is recorded in `progress`;
    a store failure goes up. `steps`: a tool loop that calls the engine (once or more)."""
    with progress.run.scope:
        try:
            if steps is None:
                await engine.generate(request, progress.take)
            else:
                await steps(engine, request, progress)
        except EngineError as exc:
            progress.error = str(exc)
            progress.error_code = exc.code
