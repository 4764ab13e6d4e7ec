"""Fuzz every operation of a `tether serve` with Schemathesis (tests/fuzz_api.py), long.

    python bench/fuzz.py                    # 1,000 examples per operation
    python bench/fuzz.py --examples 5000 --seed 7

Each operation gets `--examples` generated requests (valid and invalid: bodies, query
parameters, headers, ids; real response ids most of the time), sent over HTTP to a
scripted-engine server. Every reply is judged: no 5xx, every error in OpenAI's shape
without a stack trace, every JSON body and SSE event valid against the vendored specs.
Problems are counted, not stopped at; the table shows per operation the examples sent,
their statuses and the problems (the first few are printed with a curl reproducer).
Operations whose whole input space is smaller than `--examples` (no parameters: `GET
/health`) get what Hypothesis can generate (it stops when the space is exhausted).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests")]

import fuzz_api  # noqa: E402
import spec  # noqa: E402
from _report import Chart, Transcript, progress, save  # noqa: E402
from _server import machine, table, tether_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1414)
    args = parser.parse_args()
    with Transcript() as printed:
        rows = measure(args)
    save("fuzz", printed.text, *charts(rows))


def charts(rows: list[list[Any]]) -> list[Chart]:
    """Per operation: replies by status class, and the problems (goal: 0)."""
    names = [r[0] for r in rows]
    classes: dict[str, list[float]] = {"2xx": [], "4xx": [], "5xx": []}
    for r in rows:
        statuses = [tuple(map(int, part.split(":"))) for part in r[4].split()]
        for cls in classes:
            classes[cls].append(sum(n for s, n in statuses if str(s)[0] == cls[0]))
    return [
        Chart("replies by status, per operation", "replies", names, classes, horizontal=True),
        Chart(
            "problems per operation (goal: 0)",
            "count",
            names,
            {"problems": [r[3] for r in rows], "5xx": [r[2] for r in rows]},
            horizontal=True,
        ),
    ]


def measure(args: argparse.Namespace) -> list[list[Any]]:
    print(f"examples per operation: {args.examples}, seed {args.seed}; {machine()}")
    spec.install()
    rows: list[list[Any]] = []
    problems = []
    started = time.monotonic()
    with tether_server(rate=100, length=10) as srv:
        spec.TETHER_PORTS.add(srv.port)
        fuzzer = fuzz_api.Fuzzer(srv.url)
        operations = fuzz_api.operations()
        bar = progress(total=len(operations) * args.examples, desc="examples", unit="req")
        counted(fuzzer, bar)
        try:
            for i, operation in enumerate(operations):
                bar.set_postfix_str(operation.label)
                t0 = time.monotonic()
                tally = fuzz_api.fuzz(
                    fuzzer, operation, args.examples, args.seed, stop_on_problem=False
                )
                statuses = " ".join(f"{s}:{n}" for s, n in sorted(tally.statuses.items()))
                server_errors = sum(n for s, n in tally.statuses.items() if s >= 500)
                rows.append(
                    [
                        operation.label,
                        tally.examples,
                        server_errors,
                        len(tally.problems),
                        statuses,
                        f"{time.monotonic() - t0:.0f}",
                    ]
                )
                problems += tally.problems
                bar.update((i + 1) * args.examples - bar.n)  # an operation may stop short
                print(
                    f"  {operation.label}: {tally.examples} examples, "
                    f"{len(tally.problems)} problems",
                    flush=True,
                )
        finally:
            fuzzer.close()
            bar.close()
    print()
    print(table(["operation", "examples", "5xx", "problems", "statuses", "seconds"], rows))
    total = sum(r[1] for r in rows)  # type: ignore[misc]
    print(
        f"\n{total} requests in {time.monotonic() - started:.0f} s; "
        f"{len(problems)} problems; spec violations: {len(spec.VIOLATIONS)}"
    )
    for problem in problems[:10]:
        print(" -", problem)
    return rows


def counted(fuzzer: fuzz_api.Fuzzer, bar: Any) -> None:
    """Advance `bar` at each request the fuzzer sends (set right as each operation ends)."""
    send = fuzzer.send

    def send_counted(case: Any, rng: Any) -> list[str]:
        try:
            return send(case, rng)
        finally:
            bar.update(1)

    fuzzer.send = send_counted  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
