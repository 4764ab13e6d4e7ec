"""Completion windows on the embedded model: does a backlog of `8h` responses slow down
interactive ones?

Run: `python bench/windows.py` (about 2 minutes on a quiet 2-core machine). Starts
`tether serve --engine local` and runs, twice (without and with a backlog):

- an interactive client that sends `--interactive` streamed responses one after the
  other (each `--tokens` output tokens), measuring time to first delta and the whole
  response;
- with a backlog: first `--backlog` background responses with
  `background_options.completion_window="8h"`, each long (`--backlog-tokens`), so that
  deferred runs are decoding whenever an interactive request arrives.

It prints a table (p50 / p90 / max of the interactive time to first delta and total time,
per round), the ratio with/without backlog (the goal: within 10%), and checks that every
deferred response completed and started before its deadline
(`tether_deferred_starts_total{start="late"}` is 0). The machine's load average is
printed: figures from a busy machine mean little.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import httpx
import openai

from _server import Server, tether_cmd

MODEL = "smollm2-135m"
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a bicycle is.",
    "Name three fruits and say why you like them.",
    "Describe a cat in two sentences.",
]


def interactive(client: openai.OpenAI, n: int, tokens: int) -> list[tuple[float, float]]:
    """`n` streamed responses one after the other: (time to first delta, total) each."""
    out = []
    for i in range(n):
        start = time.perf_counter()
        first = None
        with client.responses.stream(
            model=MODEL,
            input=PROMPTS[i % len(PROMPTS)],
            max_output_tokens=tokens,
            temperature=0,
        ) as stream:
            for event in stream:
                if event.type == "response.output_text.delta" and first is None:
                    first = time.perf_counter() - start
        out.append((first if first is not None else float("nan"), time.perf_counter() - start))
        print(f"  interactive {i + 1}/{n}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    return out


def stats(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return f"{statistics.median(values) * 1000:.0f} / {p90 * 1000:.0f} / {values[-1] * 1000:.0f}"


def metric(url: str, prefix: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactive", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--backlog", type=int, default=6)
    ap.add_argument("--backlog-tokens", type=int, default=400)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    rows = []
    ok = True
    for backlog in (0, args.backlog):
        with Server(tether_cmd(rate=0, length=0, engine="local"), name="windows") as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
            interactive(client, 2, args.tokens)  # warm-up: model pages, caches
            deferred = [
                client.responses.create(
                    model=MODEL,
                    input=PROMPTS[i % len(PROMPTS)] + " Go on at length.",
                    background=True,
                    max_output_tokens=args.backlog_tokens,
                    background_options={"completion_window": "8h"},
                )
                for i in range(backlog)
            ]
            if deferred:  # the deferred runs are decoding before the first measurement
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if client.responses.retrieve(deferred[0].id).status != "queued":
                        break
                    time.sleep(0.05)
            got = interactive(client, args.interactive, args.tokens)
            for r in deferred:
                while client.responses.retrieve(r.id).status in ("queued", "in_progress"):
                    time.sleep(0.2)
                ok &= client.responses.retrieve(r.id).status in ("completed", "incomplete")
            late = metric(srv.url, 'tether_deferred_starts_total{start="late"}')
            on_time = metric(srv.url, 'tether_deferred_starts_total{start="on_time"}')
            ok &= late == 0 and on_time == backlog
            rows.append((backlog, got, on_time, late))
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print(
        "| backlog (8h) | interactive TTFD p50 / p90 / max (ms) | total p50 / p90 / max (ms) "
        "| deferred started on time / late |"
    )
    print("|---|---|---|---|")
    for backlog, got, on_time, late in rows:
        print(
            f"| {backlog} | {stats([g[0] for g in got])} | {stats([g[1] for g in got])} "
            f"| {on_time:.0f} / {late:.0f} |"
        )
    base = statistics.median(g[0] for g in rows[0][1])
    loaded = statistics.median(g[0] for g in rows[1][1])
    print(f"\nTTFD p50 with backlog / without: {loaded / base:.2f} (goal <= 1.10)")
    print("checks:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
