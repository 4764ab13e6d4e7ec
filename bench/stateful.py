"""The long randomized run of the lifecycle state machine (tests/test_lifecycle_stateful.py).

    python bench/stateful.py --steps 10000      # >= 10,000 steps; about an hour on 2 cores

Prints the seed, steps, responses and invariant violations (the goal is 0; a violation
stops the run and prints hypothesis's minimal failing program).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_lifecycle_stateful as machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="total steps (500)")
    parser.add_argument("--steps-per-example", type=int, default=25)
    parser.add_argument("--rate", type=int, default=100, help="scripted tokens/s (100)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed={seed} steps>={args.steps} steps/example={args.steps_per_example} "
          f"rate={args.rate}", flush=True)
    started = time.monotonic()
    violations = 0
    batch = 0
    with tempfile.TemporaryDirectory() as tmp:
        while machine.Lifecycle.steps < args.steps:
            folder = Path(tmp) / str(batch)
            folder.mkdir()
            try:
                machine.run(folder, examples=20,
                            steps=args.steps_per_example, chosen_seed=seed + batch,
                            rate=args.rate)
            except Exception as exc:  # a violation: report it and stop
                violations += 1
                print(f"VIOLATION with seed {seed + batch}: {exc!r}", flush=True)
                break
            batch += 1
            print(f"  {machine.Lifecycle.steps} steps, {machine.Lifecycle.created} responses, "
                  f"{time.monotonic() - started:.0f} s", flush=True)
    print()
    print("| seed | steps | responses | invariant violations | wall s |")
    print("|---|---|---|---|---|")
    print(f"| {seed} | {machine.Lifecycle.steps} | {machine.Lifecycle.created} | {violations} | "
          f"{time.monotonic() - started:.0f} |")


if __name__ == "__main__":
    main()
