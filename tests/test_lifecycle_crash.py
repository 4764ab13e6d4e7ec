"""SIGKILL at random points, restart on the same database (docs/contract.md §6.2, §2.1-2.3).

Each round starts responses in different phases — reading the prompt, mid-stream, being
cancelled, finishing — kills the server at a random moment, restarts it and checks every
response: it ends within the lease timeout, its log ends with one terminal event, readers
lose nothing they had seen, and no second run ever wrote to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from conftest import Server, raw_events

LEASE = 1.5
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


class Reader(threading.Thread):
    """Reads a response's raw stream until the connection dies or the stream ends."""

    def __init__(self, server: Server, rid: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.base_url}/responses/{rid}"
        self.events: list[dict[str, Any]] = []
        self.got_first = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, params={"stream": "true"}, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.events.append(json.loads(line[6:]))
                        self.got_first.set()
        except httpx.HTTPError:
            pass  # the server was killed under us: what we saw is checked against the log


def create(server: Server, prompt: str, **body: Any) -> str:
    r = httpx.post(
        f"{server.base_url}/responses",
        timeout=10,
        json={"model": "scripted", "input": prompt, "background": True, **body},
    )
    r.raise_for_status()
    return str(r.json()["id"])


def check_after_restart(
    server: Server, rid: str, seen: list[dict[str, Any]], deadline: float
) -> dict[str, Any]:
    log = raw_events(server, rid, timeout=LEASE * 4)
    assert time.monotonic() <= deadline, f"{rid} ended after the lease timeout"
    types = [e["type"] for e in log]
    assert [e["sequence_number"] for e in log] == list(range(len(log)))
    assert sum(t in TERMINAL for t in types) == 1 and types[-1] in TERMINAL
    assert log[: len(seen)] == seen  # nothing a reader saw was lost or changed
    assert types.count("response.in_progress") <= 1  # one run at most ever wrote
    assert len({e["item_id"] for e in log if e["type"] == "response.output_text.delta"}) <= 1
    final = log[-1]["response"]
    deltas = sum(t == "response.output_text.delta" for t in types)
    assert final["usage"]["output_tokens"] == deltas
    retrieved = httpx.get(f"{server.base_url}/responses/{rid}", timeout=5).json()
    assert retrieved["status"] == final["status"]
    return final


@pytest.mark.parametrize("round_", range(3))
def test_sigkill_at_random_points(make_server, round_: int) -> None:  # type: ignore[no-untyped-def]
    seed = int(os.environ.get("TETHER_SEED", random.randrange(2**32))) + round_
    print(f"seed={seed} (rerun with TETHER_SEED={seed - round_})")
    rng = random.Random(seed)
    server = make_server("--lease-timeout", str(LEASE), "--scripted-length", "40")
    phases = {
        "prompt": create(server, "PREFILL=3 hello"),
        "stream": create(server, "hello"),
        "finishing": create(server, "LINGER=0.5 hi", max_output_tokens=rng.randint(1, 10)),
        "cancelling": create(server, "hello"),
    }
    readers = {phase: Reader(server, rid) for phase, rid in phases.items()}
    for reader in readers.values():
        reader.start()
    for reader in readers.values():
        assert reader.got_first.wait(10)

    def cancel_it() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the kill may cut the cancel
            httpx.post(f"{server.base_url}/responses/{phases['cancelling']}/cancel", timeout=10)

    cancel = threading.Thread(target=cancel_it, daemon=True)
    time.sleep(rng.uniform(0.0, 0.3))  # a random moment into the runs
    cancel.start()
    time.sleep(rng.uniform(0.0, 0.01))  # the kill races the cancel
    server.kill()
    for reader in readers.values():
        reader.join(10)
    cancel.join(10)
    server.start()
    deadline = time.monotonic() + LEASE * 1.5 + 2.0
    for phase, rid in phases.items():
        final = check_after_restart(server, rid, readers[phase].events, deadline)
        assert final["status"] in {"completed", "incomplete", "failed", "cancelled"}
        if final["status"] == "failed":
            assert final["error"]["code"] == "server_error"


def test_sigkill_then_restart_twice_keeps_logs(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--lease-timeout", str(LEASE))
    rid = create(server, "hello")
    reader = Reader(server, rid)
    reader.start()
    assert reader.got_first.wait(10)
    server.stop(signal.SIGKILL)
    reader.join(10)
    server.start()
    first = raw_events(server, rid, timeout=LEASE * 4)
    server.stop(signal.SIGKILL)
    server.start()
    assert raw_events(server, rid) == first
    assert first[: len(reader.events)] == reader.events
