"""Restarts and lost runs on the embedded store (docs/contract.md §6.2, §8.7).

A process proves it is alive with a lock it holds (`tether.store.owners`): after a
SIGKILL the next process on the same database takes that lock at once and recovers the
dead process's responses, without waiting for their leases. A run that ends without its
terminal transition stops renewing its lease, so its response is ended like a lost run.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from conftest import Server, raw_events, wait_for

TERMINAL = {"completed", "incomplete", "failed", "cancelled"}


def create(server: Server, prompt: str = "hello", **body: Any) -> str:
    r = httpx.post(
        f"{server.base_url}/responses",
        timeout=10,
        json={"model": "scripted", "input": prompt, "background": True, **body},
    )
    r.raise_for_status()
    return str(r.json()["id"])


def status(server: Server, rid: str) -> str:
    r = httpx.get(f"{server.base_url}/responses/{rid}", timeout=5)
    r.raise_for_status()
    return str(r.json()["status"])


def active_runs(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    found = re.search(r"^tether_active_runs (\S+)$", text, re.M)
    assert found is not None
    return float(found[1])


def owner_files(db: Path) -> list[str]:
    return sorted(p.name for p in Path(f"{db}.owners").glob("*.lock"))


def test_restart_recovers_at_once_not_after_the_lease(make_server) -> None:  # type: ignore[no-untyped-def]
    # §8.7: with a 30 s lease, the running response ends and the queued ones run again
    # within seconds of the restart: the dead process's lock, not its lease, tells.
    server = make_server("--lease-timeout", "30", "--workers", "1", "--scripted-length", "3000")
    running = create(server, "hello")
    wait_for(lambda: status(server, running) == "in_progress", what="the run to start")
    # One run slot: these wait behind it, `queued`.
    queued = [create(server, f"queued {i}", max_output_tokens=5) for i in range(2)]
    assert {status(server, rid) for rid in queued} == {"queued"}
    dead = owner_files(server.db)
    server.kill()
    began = time.monotonic()
    server.start()
    wait_for(
        lambda: status(server, running) != "in_progress",
        timeout=10,
        what="the dead process's run to end",
    )
    wait_for(
        lambda: all(status(server, rid) == "incomplete" for rid in queued),
        timeout=10,
        what="its queued responses to run",
    )
    elapsed = time.monotonic() - began
    assert elapsed < 10, elapsed  # the lease (30 s) did not decide it
    log = raw_events(server, running)
    final = log[-1]["response"]
    assert log[-1]["type"] == "response.failed"
    assert final["status"] == "failed" and final["error"]["code"] == "server_error"
    deltas = sum(e["type"] == "response.output_text.delta" for e in log)
    assert final["usage"]["output_tokens"] == deltas
    # The new process holds its own lock; the dead one's file is gone with its responses.
    assert len(dead) == 1 and len(owner_files(server.db)) == 1
    assert owner_files(server.db) != dead


def test_a_live_owner_is_never_taken_over(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Two processes on one database: the second one's start does not end or re-run what
    # the first one runs (its lock is held), and the first one finishes it normally.
    first = make_server("--lease-timeout", "30", "--scripted-length", "500")
    rid = create(first, "hello")
    wait_for(lambda: status(first, rid) == "in_progress", what="the run to start")
    second = make_server("--lease-timeout", "30", db=first.db)
    assert len(owner_files(first.db)) == 2
    assert status(second, rid) == "in_progress"  # the second one is up, the run goes on
    wait_for(lambda: status(first, rid) in TERMINAL, timeout=20, what="the run to end")
    final = raw_events(first, rid)[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["output_tokens"] == 500
    assert status(second, rid) == "completed"


def test_graceful_restart_runs_queued_responses_at_once(make_server) -> None:  # type: ignore[no-untyped-def]
    # A stop leaves queued responses for the next process, which takes them at once.
    server = make_server("--lease-timeout", "30", "--workers", "1", "--scripted-length", "3000")
    running = create(server, "hello")
    wait_for(lambda: status(server, running) == "in_progress", what="the run to start")
    queued = create(server, "queued", max_output_tokens=5)
    server.stop(signal.SIGTERM)
    server.start()
    assert status(server, running) == "failed"  # ended by the stop itself
    wait_for(
        lambda: status(server, queued) == "incomplete",
        timeout=10,
        what="the queued response to run after the restart",
    )


def test_a_run_that_ends_without_its_transition_is_not_renewed(make_server) -> None:  # type: ignore[no-untyped-def]
    # Issue 14 item 6: a run whose terminal transition (and the fallback `_end`) failed
    # exits leaving its response `in_progress`; no run renews its lease any more, so it
    # expires and is ended by the same process like any lost run.
    server = make_server("--lease-timeout", "1.5", "--scripted-length", "30")
    db = sqlite3.connect(server.db, isolation_level=None)
    db.execute("PRAGMA busy_timeout=5000")
    # A fault injected in the database: every terminal transition fails.
    db.execute(
        "CREATE TRIGGER no_end BEFORE UPDATE OF status ON responses "
        "WHEN NEW.status NOT IN ('queued', 'in_progress') "
        "BEGIN SELECT RAISE(ABORT, 'injected fault: no terminal transition'); END"
    )
    rid = create(server, "hello")
    wait_for(lambda: status(server, rid) == "in_progress", what="the run to start")
    wait_for(lambda: active_runs(server) == 0, what="the run to exit")
    assert status(server, rid) == "in_progress"  # the orphan
    db.execute("DROP TRIGGER no_end")
    db.close()
    # Within the lease (1.5 s) and a keeper round (0.5 s), with room for a busy machine.
    wait_for(
        lambda: status(server, rid) != "in_progress", timeout=10, what="the orphan to be ended"
    )
    log = raw_events(server, rid)
    final = log[-1]["response"]
    assert final["status"] == "failed" and final["error"]["code"] == "server_error"
    deltas = sum(e["type"] == "response.output_text.delta" for e in log)
    assert final["usage"]["output_tokens"] == deltas == 30
