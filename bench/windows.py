"""Completion windows on the embedded model: does a backlog of deferred responses slow down
interactive ones? (issue 19)

Run: `python bench/windows.py` (about 2-3 minutes on a quiet 2-core machine). Two setups,
each on its own `tether serve --engine local`:

- **one slot** (the acceptance setup): `--workers 1`, a backlog of `--slot-backlog`
  `2h` responses: a started deferred run holds the one run slot, and an interactive
  request must take it over (preemption) to start at once;
- **8 slots** (the default process): a backlog of `--backlog` `8h` responses, half of them
  running (`--deferred-slots`' default).

In each, rounds (`--rounds`) alternate a phase *alone* (`--interactive` streamed responses
one after the other, `--tokens` output tokens each, temperature 0) and a phase *beside
the backlog* (the same, after submitting the backlog and waiting for a deferred run to
start; the phase then waits for the backlog to finish), so a burst of other load on a
shared machine spreads over both. Per interactive response it takes the client's time to
first delta (TTFD) and whole response, and splits the TTFD into phases from the engine
trace (`/debug/engine/{id}`): to engine (HTTP, create, queue, run slot, claim), engine
wait (until the scheduler admits it: the step in flight), prefill, first token, to client
(the event's way to the client).

It prints the TTFD and total per setup and phase, the phase split (medians), the ratio
beside / alone (the goal: <= 1.10), and checks that every deferred response completed,
with usage equal to its output, and started before its deadline
(`tether_deferred_starts_total{start="late"}` is 0). Results also go to
bench/out/windows.md and .png. The machine's load average is printed: figures from a busy
machine mean little.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field

import httpx
import openai

from _report import Chart, progress, save
from _server import Server, tether_cmd

MODEL = "smollm2-135m"
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a bicycle is.",
    "Name three fruits and say why you like them.",
    "Describe a cat in two sentences.",
]
PHASES = ("to engine", "engine wait", "prefill", "first token", "to client")


@dataclass
class Sample:
    ttfd: float
    total: float
    phases: tuple[float, ...]  # seconds, in PHASES order


@dataclass
class Setup:
    name: str
    extra: list[str]
    window: str
    backlog: int
    alone: list[Sample] = field(default_factory=list)
    beside: list[Sample] = field(default_factory=list)
    on_time: float = 0
    late: float = 0
    checked: int = 0
    failures: list[str] = field(default_factory=list)


def interactive(srv: Server, client: openai.OpenAI, n: int, tokens: int, bar) -> list[Sample]:  # type: ignore[no-untyped-def]
    """`n` streamed responses one after the other."""
    out = []
    for i in range(n):
        sent = time.time()
        first = None
        rid = ""
        with client.responses.stream(
            model=MODEL,
            input=PROMPTS[i % len(PROMPTS)],
            max_output_tokens=tokens,
            temperature=0,
        ) as stream:
            for event in stream:
                if event.type == "response.created":
                    rid = event.response.id
                elif event.type == "response.output_text.delta" and first is None:
                    first = time.time()
        done = time.time()
        trace = httpx.get(f"{srv.url}/debug/engine/{rid}", timeout=5).json()
        first = first if first is not None else float("nan")
        marks = (
            sent,
            trace["started_at"],
            trace["admitted_at"],
            trace["prompt_read_at"],
            trace["token_times"][0] if trace["token_times"] else float("nan"),
            first,
        )
        phases = tuple(b - a for a, b in itertools.pairwise(marks))
        out.append(Sample(first - sent, done - sent, phases))
        bar.update(1)
    return out


def metric(url: str, prefix: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def backlog_phase(
    srv: Server, client: openai.OpenAI, setup: Setup, args: argparse.Namespace, bar
) -> list[Sample]:  # type: ignore[no-untyped-def]
    deferred = [
        client.responses.create(
            model=MODEL,
            input=PROMPTS[i % len(PROMPTS)] + " Go on at length.",
            background=True,
            max_output_tokens=args.backlog_tokens,
            background_options={"completion_window": setup.window},  # type: ignore[typeddict-item]
        )
        for i in range(setup.backlog)
    ]
    # A deferred run is decoding before the first measurement.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if client.responses.retrieve(deferred[0].id).status != "queued":
            break
        time.sleep(0.05)
    got = interactive(srv, client, args.interactive, args.tokens, bar)
    for r in deferred:
        while (final := client.responses.retrieve(r.id)).status in ("queued", "in_progress"):
            time.sleep(0.2)
        setup.checked += 1
        events = list(client.responses.retrieve(r.id, stream=True))
        deltas = sum(e.type == "response.output_text.delta" for e in events)
        usage = final.usage.output_tokens if final.usage else -1
        if final.status not in ("completed", "incomplete") or usage != deltas:
            setup.failures.append(f"{r.id}: {final.status}, usage {usage}, {deltas} deltas")
    return got


def run_setup(setup: Setup, args: argparse.Namespace, bar) -> None:  # type: ignore[no-untyped-def]
    cmd = tether_cmd(rate=0, length=0, engine="local", extra=setup.extra)
    with Server(cmd, name="windows") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        interactive(srv, client, 2, args.tokens, progress(total=2, desc="warm-up"))
        for _ in range(args.rounds):
            setup.alone += interactive(srv, client, args.interactive, args.tokens, bar)
            setup.beside += backlog_phase(srv, client, setup, args, bar)
        setup.late = metric(srv.url, 'tether_deferred_starts_total{start="late"}')
        setup.on_time = metric(srv.url, 'tether_deferred_starts_total{start="on_time"}')
        if setup.late or setup.on_time != setup.checked:
            setup.failures.append(f"deferred starts: {setup.on_time} on time, {setup.late} late")


def pcts(values: list[float]) -> tuple[float, float, float]:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return statistics.median(values) * 1000, p90 * 1000, values[-1] * 1000


def fmt(values: list[float]) -> str:
    return " / ".join(f"{v:.0f}" for v in pcts(values))


def tables(setups: list[Setup]) -> str:
    lines = [
        "| setup | backlog | interactive TTFD p50 / p90 / max (ms) | total p50 / p90 / max (ms) "
        "| TTFD p50 beside / alone | deferred checked / on time / late |",
        "|---|---|---|---|---|---|",
    ]
    for s in setups:
        ratio = pcts([x.ttfd for x in s.beside])[0] / pcts([x.ttfd for x in s.alone])[0]
        for label, samples in (("none", s.alone), (f"{s.backlog} × {s.window}", s.beside)):
            last = samples is s.beside
            lines.append(
                f"| {s.name} | {label} | {fmt([x.ttfd for x in samples])} "
                f"| {fmt([x.total for x in samples])} | {f'{ratio:.2f}' if last else ''} "
                f"| {f'{s.checked} / {s.on_time:.0f} / {s.late:.0f}' if last else ''} |"
            )
    lines += [
        "",
        "| setup | backlog | " + " | ".join(f"{p} p50 (ms)" for p in PHASES) + " |",
        "|---|---|" + "---|" * len(PHASES),
    ]
    for s in setups:
        for label, samples in (("none", s.alone), (f"{s.backlog} × {s.window}", s.beside)):
            cells = [
                f"{statistics.median(x.phases[i] for x in samples) * 1000:.1f}"
                for i in range(len(PHASES))
            ]
            lines.append(f"| {s.name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactive", type=int, default=8, help="per phase")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--backlog", type=int, default=6, help="8h responses (8 slots)")
    ap.add_argument("--slot-backlog", type=int, default=3, help="2h responses (one slot)")
    ap.add_argument("--backlog-tokens", type=int, default=200)
    ap.add_argument("--only", choices=("one-slot", "8-slots"))
    args = ap.parse_args()
    setups = [
        Setup("one slot", ["--workers", "1"], "2h", args.slot_backlog),
        Setup("8 slots", [], "8h", args.backlog),
    ]
    if args.only:
        setups = [s for s in setups if s.name.replace(" ", "-") == args.only]
    load = os.getloadavg()[0]
    bar = progress(total=len(setups) * args.rounds * 2 * args.interactive, desc="interactive")
    for setup in setups:
        run_setup(setup, args, bar)
    bar.close()
    head = (
        f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after; "
        f"{args.rounds} rounds of {args.interactive} interactive responses per phase, "
        f"{args.tokens} tokens each; backlog responses {args.backlog_tokens} tokens"
    )
    markdown = head + "\n\n" + tables(setups)
    print(markdown)
    failures = [f"{s.name}: {f}" for s in setups for f in s.failures]
    print("\nchecks:", "FAILED\n" + "\n".join(failures) if failures else "passed")
    save(
        "windows",
        markdown,
        Chart(
            "interactive time to first delta, p50",
            "ms",
            [s.name for s in setups],
            {
                "alone": [pcts([x.ttfd for x in s.alone])[0] for s in setups],
                "beside the backlog": [pcts([x.ttfd for x in s.beside])[0] for s in setups],
            },
        ),
        Chart(
            "where the TTFD goes beside the backlog (p50)",
            "ms",
            list(PHASES),
            {
                f"{s.name} {label}": [
                    statistics.median(x.phases[i] for x in samples) * 1000
                    for i in range(len(PHASES))
                ]
                for s in setups
                for label, samples in (("alone", s.alone), ("beside", s.beside))
            },
        ),
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
