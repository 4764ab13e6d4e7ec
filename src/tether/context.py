"""Does a prompt fit its model's context? Decided at create time, before anything is
stored or run (an overflow found inside a stream would be a `server_error`, which
clients retry).

An engine that can count (`TokenCounter.count_tokens`) and knows its model's context
(`ModelInfo.context`) is asked; otherwise nothing is checked. `truncation`:
- `disabled` (the default): a prompt that leaves no room for output is refused with
  400 `context_length_exceeded` (param `input`);
- `auto`: the oldest turns are dropped, as OpenAI documents, until the prompt leaves
  room for the output (`max_output_tokens`, at most a quarter of the context); system
  and developer messages and the last user turn (with what follows it) are kept.
"""

from __future__ import annotations

from dataclasses import replace

from tether.engines.base import Engine, Generation, TokenCounter
from tether.errors import APIError
from tether.runspec import RunSpec
from tether.turns import Message

#: room kept for the output when `truncation: "auto"` drops turns (unless
#: `max_output_tokens` asks for less), at most a quarter of the context.
OUTPUT_ROOM = 512


async def count(engine: Engine, request: Generation) -> int | None:
    """The prompt's size with the engine's own tokenizer; None if it cannot count."""
    if not isinstance(engine, TokenCounter):
        return None
    return await engine.count_tokens(request)


async def fit(
    engine: Engine, context: int | None, model: str, spec: RunSpec, truncation: str | None
) -> RunSpec:
    """`spec` with its messages as they fit the context (the same, or fewer under
    `auto`); raises 400 `context_length_exceeded` when they cannot. The prompt counted
    is the one the run will give the engine (instructions, tools, text format too)."""
    if context is None:
        return spec
    messages = spec.messages

    async def size(turns: list[Message]) -> int | None:
        return await count(
            engine, replace(spec, messages=turns).generation("resp_count", model, False)
        )

    full = await size(messages)
    if full is None or full < context:
        return spec
    if truncation != "auto":
        raise _exceeded(full, context)
    room = min(spec.max_output_tokens or OUTPUT_ROOM, OUTPUT_ROOM, context // 4)
    keep = _kept(messages)
    droppable = [i for i in range(len(messages)) if i not in keep]

    def without(k: int) -> list[Message]:
        gone = set(droppable[:k])
        return _without_orphans([m for i, m in enumerate(messages) if i not in gone])

    # The fewest dropped turns that fit (dropping more never makes the prompt longer).
    best = without(len(droppable))
    least = await size(best) or 0
    if least + room > context:
        raise _exceeded(least, context)
    low, high = 1, len(droppable)
    while low < high:
        mid = (low + high) // 2
        left = without(mid)
        if (await size(left) or 0) + room <= context:
            best, high = left, mid
        else:
            low = mid + 1
    return replace(spec, messages=best)


def _kept(messages: list[Message]) -> set[int]:
    """System/developer turns and the last user turn with everything after it."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=0)
    return {
        i for i, m in enumerate(messages) if m.role in ("system", "developer") or i >= last_user
    }


def _without_orphans(messages: list[Message]) -> list[Message]:
    """Tool outputs whose call was dropped go too (a result without its question)."""
    calls = {c.call_id for m in messages for c in m.tool_calls}
    return [m for m in messages if m.role != "tool" or m.call_id in calls]


def _exceeded(size: int, context: int) -> APIError:
    return APIError(
        400,
        f"Your input has {size} tokens; this model's context window holds "
        f"{context}, including the output. Shorten the input or set "
        "'truncation' to 'auto'.",
        param="input",
        code="context_length_exceeded",
        headers={"x-should-retry": "false"},
    )
