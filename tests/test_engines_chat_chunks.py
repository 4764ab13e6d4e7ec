"""The chat engine's per-token fast path (`ChatEngine._chunks`) gives exactly the steps
and the account (`_Received`) that the general path (`_chunk`, chunk by chunk) gives, for
the common chunk and for every shape that must leave the fast path."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tether.config import UpstreamConfig
from tether.engines.base import EngineError, Step
from tether.engines.chat import ChatEngine, _Received
from tether.engines.think import Splitter


def chunk(delta: Any = None, **choice: Any) -> bytes:
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": "m"}
    body["choices"] = [{"index": 0, "delta": {"content": "x"} if delta is None else delta}]
    body["choices"][0].update(choice)
    return orjson.dumps(body)


LOGPROBS = {"content": [{"token": "x", "logprob": -0.5, "bytes": [120], "top_logprobs": []}]}
CHUNKS = [
    chunk({"content": 'say "hi"\\ \n\u00e9\u2603 \x01'}),
    chunk({"content": "a"}, finish_reason=None, logprobs=None),
    chunk({"content": ""}),  # no text: no step
    chunk({"content": "b"}, logprobs=LOGPROBS),
    chunk({"content": "c"}, finish_reason="stop"),
    chunk({"content": "d"}, index=1),  # n > 1 is never asked for
    chunk({"role": "assistant", "content": "e"}),
    chunk({"reasoning_content": "hm"}),
    chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f"}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
    orjson.dumps({"id": "c1", "choices": [], "usage": {"completion_tokens": 3}}),
    orjson.dumps({"id": "c1", "choices": [{"index": 0, "delta": {"content": "f"}}], "usage": {}}),
    orjson.dumps({"choices": [{"delta": {"content": "g"}}, {"index": 1, "delta": {}}]}),
    orjson.dumps({"choices": None}),
    orjson.dumps([1, 2]),  # not an object: ignored
    chunk({"content": "h"}),
    b"[DONE]",
]


def engine() -> ChatEngine:
    return ChatEngine(UpstreamConfig(model="m", url="http://127.0.0.1:9/v1"))


def both(chunks: list[bytes], think: bool = False) -> tuple[Any, Any]:
    fast, slow = engine(), engine()
    got_fast = _Received(think=Splitter() if think else None)
    got_slow = _Received(think=Splitter() if think else None)
    steps_fast: list[Step] = []
    steps_slow: list[Step] = []
    fast._chunks([("", data) for data in chunks], got_fast, steps_fast)
    for data in chunks:
        slow._chunk(data, got_slow, steps_slow)
    return (steps_fast, got_fast), (steps_slow, got_slow)


def account(got: _Received) -> tuple[Any, ...]:
    return (got.text, got.reasoning, got.chunks, got.calls, got.finish, got.done, got.usage)


@pytest.mark.parametrize("think", [False, True], ids=["plain", "think-tags"])
def test_the_fast_path_gives_what_the_general_path_gives(think: bool) -> None:
    (steps_fast, got_fast), (steps_slow, got_slow) = both(CHUNKS, think)
    assert steps_fast == steps_slow
    assert account(got_fast) == account(got_slow)
    assert len(steps_fast) > 5


def test_each_chunk_alone_too() -> None:
    for data in CHUNKS:
        (steps_fast, got_fast), (steps_slow, got_slow) = both([data])
        assert steps_fast == steps_slow, data
        assert account(got_fast) == account(got_slow), data


@pytest.mark.parametrize(
    "bad",
    [b"{not json", orjson.dumps({"error": {"message": "boom"}})],
    ids=["invalid-json", "error"],
)
def test_errors_keep_the_steps_before_them(bad: bytes) -> None:
    steps: list[Step] = []
    got = _Received()
    with pytest.raises(EngineError):
        engine()._chunks([("", chunk()), ("", bad), ("", chunk())], got, steps)
    assert len(steps) == 1 and got.chunks == 1
