"""The long randomized run of the lifecycle state machine (tests/test_lifecycle_stateful.py).

    python bench/stateful.py --steps 10000 --jobs 2 --seed 1   # ~20 min on 2 busy cores

`--jobs` independent runs of the machine, each in its own process against its own server
and database, share the steps; each job runs batches (a fresh server, `--examples`
hypothesis examples of up to `--steps-per-example` steps) until its share is done. Every
check of the test is made, as in CI: after every step, every response a cancel answered 200
still reads `cancelled`; when each example ends, every response of it gets
`invariants.check_response` (log, every reader, cancel replies, usage, engine trace).

One difference from CI, for speed: a restart (a new server process, ~0.8 s, ten times any
other rule) may happen only after `--restart-gap` other steps (CI: no gap). Without it,
hypothesis's swarm testing makes some examples nearly all restarts and a step costs ~0.45
s on average. Restarts, graceful and SIGKILL, still happen: the table counts every rule.

Prints every job's seed (job j of a run with `--seed S` uses `S + 1000 * j`, batch b of it
`S + 1000 * j + b`), progress, then steps, responses and invariant violations (the goal is
0; a violation stops its job, prints hypothesis's minimal failing program and makes the
exit code 1). Stops by itself: after `--steps` steps, or when `--max-minutes` have passed
(no new batch starts then).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _server
from _report import Chart, Transcript, progress, save


def job(
    index: int,
    seed: int,
    steps: int,
    args: argparse.Namespace,
    deadline: float,
    done: queue.Queue[tuple[int, int]],
) -> dict[str, Any]:
    """One independent run of the machine (in its own process); its step count goes to
    `done` every half second, for the parent's progress bar."""
    import test_lifecycle_stateful as machine

    machine.Lifecycle.restart_gap = args.restart_gap
    started = time.monotonic()
    violation = None
    batch = 0
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(0.5):
            done.put((index, machine.Lifecycle.steps))

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    with tempfile.TemporaryDirectory() as tmp:
        while machine.Lifecycle.steps < steps and time.time() < deadline:
            folder = Path(tmp) / str(batch)
            folder.mkdir()
            try:
                machine.run(
                    folder,
                    examples=args.examples,
                    steps=args.steps_per_example,
                    chosen_seed=seed + batch,
                    rate=args.rate,
                    scaled=args.scaled,
                )
            except Exception as exc:  # a violation: report it and stop this job
                violation = f"seed {seed + batch}: {exc!r}"
                print(
                    f"[job {index}] VIOLATION with seed {seed + batch}:\n{traceback.format_exc()}",
                    flush=True,
                )
                break
            batch += 1
            print(
                f"[job {index}] {machine.Lifecycle.steps} steps, "
                f"{machine.Lifecycle.created} responses, {batch} batches, "
                f"{time.monotonic() - started:.0f} s",
                flush=True,
            )
    stop.set()
    reporter.join()
    return {
        "job": index,
        "seed": seed,
        "batches": batch,
        "steps": machine.Lifecycle.steps,
        "responses": machine.Lifecycle.created,
        "rules": dict(machine.Lifecycle.rules),
        "violation": violation,
        "wall": time.monotonic() - started,
        "cpu": time.process_time(),
    }


def main() -> int:
    with Transcript() as printed:
        code, results = measure()
    save("stateful", printed.text, *charts(results))
    return code


def charts(results: list[dict[str, Any]]) -> list[Chart]:
    """Steps per rule (what the run exercised), and steps / responses / violations per job."""
    rules: Counter[str] = Counter()
    for r in results:
        rules.update(r["rules"])
    names = sorted(rules)
    jobs = [r["job"] for r in results]
    return [
        Chart("steps per rule", "steps", names, {"steps": [rules[n] for n in names]}),
        Chart(
            "per job (goal: 0 violations)",
            "count",
            jobs,
            {
                "steps": [r["steps"] for r in results],
                "responses": [r["responses"] for r in results],
                "violations": [1 if r["violation"] else 0 for r in results],
            },
            xlabel="job",
        ),
    ]


def wait(pending: list[Any], done: queue.Queue[tuple[int, int]], total: int) -> None:
    """Show the jobs' steps (as they report them) until every job has ended."""
    counts: dict[int, int] = {}
    with progress(total=total, desc="steps", unit="step") as bar:
        while not all(p.ready() for p in pending):
            try:
                index, steps = done.get(timeout=0.5)
            except queue.Empty:
                continue
            counts[index] = steps
            bar.update(min(total, sum(counts.values())) - bar.n)


def measure() -> tuple[int, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="total steps (500)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel runs sharing the steps")
    parser.add_argument("--examples", type=int, default=10, help="examples per batch (10)")
    parser.add_argument("--steps-per-example", type=int, default=25)
    parser.add_argument(
        "--restart-gap", type=int, default=3, help="steps between two restarts, at least (3; CI: 0)"
    )
    parser.add_argument("--rate", type=int, default=100, help="scripted tokens/s (100)")
    parser.add_argument(
        "--max-minutes", type=float, default=60, help="start no new batch after this (60)"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--scaled",
        action="store_true",
        help="two API replicas and two workers on PostgreSQL + Redis",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    seeds = [seed + 1000 * j for j in range(args.jobs)]
    shares = [args.steps // args.jobs + (j < args.steps % args.jobs) for j in range(args.jobs)]
    print(
        f"command: python bench/stateful.py --steps {args.steps} --jobs {args.jobs} "
        f"--examples {args.examples} --steps-per-example {args.steps_per_example} "
        f"--restart-gap {args.restart_gap} --rate {args.rate} "
        f"--max-minutes {args.max_minutes:g} --seed {seed}"
    )
    print(f"job seeds: {seeds}; {_server.machine()}", flush=True)
    started = time.monotonic()
    deadline = time.time() + 60 * args.max_minutes
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(args.jobs) as pool:
        done = manager.Queue()
        pending = [
            pool.apply_async(job, (j, seeds[j], shares[j], args, deadline, done))
            for j in range(args.jobs)
        ]
        wait(pending, done, args.steps)
        results = [p.get() for p in pending]
    wall = time.monotonic() - started
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    print()
    print(
        _server.table(
            ["job", "seed", "batches", "steps", "responses", "invariant violations", "wall s"],
            [
                [
                    r["job"],
                    r["seed"],
                    r["batches"],
                    r["steps"],
                    r["responses"],
                    1 if r["violation"] else 0,
                    r["wall"],
                ]
                for r in results
            ]
            + [
                [
                    "all",
                    seed,
                    sum(r["batches"] for r in results),
                    sum(r["steps"] for r in results),
                    sum(r["responses"] for r in results),
                    sum(1 for r in results if r["violation"]),
                    wall,
                ]
            ],
        )
    )
    rules: Counter[str] = Counter()
    for r in results:
        rules.update(r["rules"])
    total = sum(rules.values())
    print()
    print(
        _server.table(
            ["rule", "steps", "share"],
            [[name, n, f"{n / total:.1%}"] for name, n in sorted(rules.items())],
        )
    )
    print(f"\nwall time {wall / 60:.1f} min; load average at the end {load}")
    for r in results:
        if r["violation"]:
            print(f"job {r['job']}: {r['violation']}")
    return 1 if any(r["violation"] for r in results) else 0, results


if __name__ == "__main__":
    sys.exit(main())
