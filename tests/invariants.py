"""The per-response invariants of docs/contract.md §1-4, checked the same way by every proof."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
FINAL_STATES = {"completed", "incomplete", "failed", "cancelled"}


@dataclass
class Seen:
    """What one reader received: its cursor, the events, and whether it reached [DONE]."""

    after: int
    events: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # saw `data: [DONE]`
    connected: bool = True  # False once the test (or a restart) closed it


@dataclass
class Cancel:
    status: int
    body: dict[str, Any]
    replied_at: float  # time.time() when the reply arrived


def check_response(
    base_url: str,
    rid: str,
    log: list[dict[str, Any]],
    readers: list[Seen],
    cancels: list[Cancel],
    trace: dict[str, Any] | None,
) -> None:
    """`log` is the full event log read after the response ended; `trace` is the scripted
    engine's record (None when the process that ran it is gone)."""
    types = [e["type"] for e in log]
    # §2.1-2.3: contiguous sequence numbers, exactly one terminal event, the last one
    assert [e["sequence_number"] for e in log] == list(range(len(log))), rid
    assert sum(t in TERMINAL for t in types) == 1 and types[-1] in TERMINAL, (rid, types)
    final = log[-1]["response"]
    assert final["status"] in FINAL_STATES
    # §2.4: every reader that stayed connected got exactly the log after its cursor
    for seen in readers:
        if seen.connected:
            assert seen.done, (rid, seen.after)
            assert seen.events == log[seen.after + 1 :], (rid, seen.after)
        else:
            assert seen.events == log[seen.after + 1 : seen.after + 1 + len(seen.events)], rid
    retrieved = httpx.get(f"{base_url}/responses/{rid}", timeout=10).json()
    assert retrieved["status"] == final["status"], rid
    assert retrieved["usage"] == final["usage"], rid
    # §3.2, §3.5-3.7: a 200 means cancelled forever; a 400 means another terminal state
    for cancel in cancels:
        if cancel.status == 200:
            assert final["status"] == "cancelled", rid
            assert cancel.body["usage"] == final["usage"], rid  # §3.9
        else:
            assert cancel.status == 400, (rid, cancel.status, cancel.body)
            assert final["status"] != "cancelled", rid
    # §1.2: usage counts the tokens produced; the text is the concatenated deltas
    deltas = [e["delta"] for e in log if e["type"] == "response.output_text.delta"]
    assert final["usage"]["output_tokens"] == len(deltas), rid
    text = "".join(part["text"] for item in final["output"] for part in item["content"])
    assert text == "".join(deltas), rid
    if trace is not None:
        assert trace["produced"] == len(deltas), (rid, trace["produced"], len(deltas))
        # §3.3: no token after the cancel reply (one step in flight allowed)
        replies = [c.replied_at for c in cancels if c.status == 200]
        if replies:
            late = [t for t in trace["token_times"] if t > min(replies)]
            assert len(late) <= 1, (rid, late)
