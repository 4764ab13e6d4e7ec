"""The events and snapshot that close a response (docs/contract.md §3.4, §6.1).

Whoever ends a response — its run, a cancel that fenced the run out, the lease keeper —
closes it the same way: every item still open closed (`completed` or `incomplete`), an
`error` event when it failed, and one terminal lifecycle event carrying the final Response.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from tether import wire, wire_output

Ending = Literal["completed", "incomplete", "failed", "cancelled"]


def closing(
    snap: dict[str, Any],
    ending: Ending,
    still_open: list[wire_output.OpenItem],
    done: list[dict[str, Any]],
    input_tokens: int,
    output_tokens: int,
    error: str | None,
    error_code: str = "server_error",
    notes: dict[str, Any] | None = None,
    reasoning_tokens: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The terminal snapshot and the events that close a response (docs/contract.md §3.4, §6.1).
    `notes` (how an upstream engine counted) go into `usage.tether`."""
    item_status = "completed" if ending == "completed" else "incomplete"
    events = [ev for m in still_open for ev in m.closed(item_status)]
    output = done + [m.item(item_status) for m in still_open]
    err = None
    if ending == "failed":
        err = {"code": error_code, "message": error or "The response failed."}
    final = wire.snapshot(
        {k: v for k, v in snap.items() if k not in DERIVED},
        id=snap["id"],
        created_at=snap["created_at"],
        status=ending,
        output=output,
        usage=wire.usage(input_tokens, output_tokens, reasoning_tokens)
        | ({"tether": notes} if notes else {}),
        error=err,
        incomplete_reason="max_output_tokens" if ending == "incomplete" else None,
        completed_at=int(time.time()) if ending == "completed" else None,
    )
    if err is not None:
        events.append(wire.error_event(err["code"], err["message"]))
    kind = {"completed": "completed", "incomplete": "incomplete"}.get(ending, "failed")
    events.append(wire.lifecycle_event(kind, final))
    return final, events


DERIVED = {
    "id",
    "created_at",
    "status",
    "completed_at",
    "output",
    "usage",
    "error",
    "incomplete_details",
}
