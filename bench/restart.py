"""Restart after SIGKILL on the embedded store: how soon the new process ends the dead
one's running response and runs its queued ones (docs/contract.md §8.7: within 2 s).

Each round: a `tether serve` (scripted engine, `--workers 1`, `--lease-timeout 30`) runs
one long response while `--queued` more wait behind it; SIGKILL; a new `tether serve` on
the same database. Times are from the new process's spawn: /health answering, and (by
the `finished_at` the server stored) the orphan ended `failed`, the first and the last
queued response ended; and the time from the new process holding its owner lock (the
lifecycle's start, after the store opened) to the last one ended. Without the owner
locks (`tether.store.owners`) the orphan and the queue would wait for the 30 s lease.

    PYTHONPATH=src python bench/restart.py [--rounds 5] [--queued 20]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from _report import Chart, Transcript, progress, save
from _server import Server, machine, percentile, table, tether_cmd

LIVE = ("queued", "in_progress")


def create(http: httpx.Client, srv: Server, prompt: str, **body: object) -> str:
    r = http.post(
        f"{srv.base_url}/responses",
        json={"model": "scripted", "input": prompt, "background": True, **body},
    )
    r.raise_for_status()
    return str(r.json()["id"])


def status(http: httpx.Client, srv: Server, rid: str) -> str:
    return str(http.get(f"{srv.base_url}/responses/{rid}").json()["status"])


def one_round(workdir: Path, queued: int) -> list[float]:
    cmd = tether_cmd(rate=100, length=3000, extra=["--workers", "1", "--lease-timeout", "30"])
    srv = Server(cmd, workdir=workdir, name="tether")
    srv.start()
    with httpx.Client(timeout=10) as http:
        running = create(http, srv, "hello")
        while status(http, srv, running) != "in_progress":
            time.sleep(0.01)  # polling the server: no push API
        waiting = [create(http, srv, f"queued {i}", max_output_tokens=1) for i in range(queued)]
        assert all(status(http, srv, rid) == "queued" for rid in waiting)
        assert srv.proc is not None
        srv.proc.kill()
        srv.proc.wait()
        srv.proc = None
        began, spawned = time.monotonic(), time.time()
        srv.start()
        ready = time.monotonic() - began
        deadline = began + 60
        while any(status(http, srv, rid) in LIVE for rid in [running, *waiting]):
            assert time.monotonic() < deadline, "not recovered within 60 s"
            time.sleep(0.01)  # polling the server: no push API
        final = status(http, srv, running)
        # The new process took its owner lock right after opening the store.
        locks = Path(f"{workdir / 'bench.db'}.owners").glob("*.lock")
        started = max(p.stat().st_mtime for p in locks) - spawned
    srv.stop()
    assert final == "failed", final
    # When each ended, by the server's clock (the `finished_at` it stored).
    with sqlite3.connect(workdir / "bench.db") as db:
        ended = dict(db.execute("SELECT id, finished_at FROM responses").fetchall())
    orphan = ended[running] - spawned
    queue = [ended[rid] - spawned for rid in waiting]
    first, last = min(queue), max(queue)
    return [ready, started, orphan, first, last, last - started]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queued", type=int, default=20)
    args = parser.parse_args()
    with Transcript() as printed:
        rows = measure(args)
    columns = list(zip(*[r[1:] for r in rows[: args.rounds]], strict=True))
    save(
        "restart",
        printed.text,
        Chart(
            "after SIGKILL: seconds from the new process's spawn",
            "s",
            [
                "/health",
                "lock held",
                "orphan\nended",
                "first queued\nended",
                f"all {args.queued}\nqueued ended",
                "all ended\n− lock held",
            ],
            {
                "p50": [percentile(list(c), 50) for c in columns],
                "max": [max(c) for c in columns],
            },
            marks={"2 s (contract §8.7)": 2.0},
        ),
    )


def measure(args: argparse.Namespace) -> list[list[Any]]:
    print(
        f"{args.rounds} rounds, 1 running + {args.queued} queued responses, "
        f"lease 30 s; {machine()}\n"
    )
    rows: list[list[Any]] = []
    for i in progress(range(args.rounds), desc="restarts", unit="round"):
        with tempfile.TemporaryDirectory(prefix="tether-bench-restart-") as tmp:
            rows.append([i + 1, *one_round(Path(tmp), args.queued)])
    columns = list(zip(*[r[1:] for r in rows], strict=True))
    rows.append(["max", *(max(c) for c in columns)])
    rows.append(["p50", *(percentile(list(c), 50) for c in columns)])
    print(
        table(
            [
                "round",
                "/health",
                "store open, lock held",
                "orphan ended",
                "first queued ended",
                f"all {args.queued} queued ended",
                "all ended − lock held",
            ],
            rows,
        )
    )
    print(
        "\nSeconds from the new process's spawn (python start-up and migrations "
        "included), except the last column."
    )
    return rows


if __name__ == "__main__":
    main()
