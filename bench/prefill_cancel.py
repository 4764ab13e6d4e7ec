"""Cancel during prefill on the embedded model (issue 14): how long the cancel reply takes
when it lands while a long prompt is being read, and how soon the next response starts.

    python bench/prefill_cancel.py [--rounds 10] [--words 1100] [--after 0.05]

Each round: a background response whose prompt is ~1,500 tokens, cancelled `--after`
seconds after its create returned; then a short response, timed to its first delta. The
server's cancel fence (`--cancel-timeout`) is 5 s, so a reply well under it came from the
engine stopping, not from the fence. Prints a table (milliseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx
import openai

from _report import Chart, Transcript, progress, save
from _server import machine, run, table, tether_server


async def round_trip(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient, words: int, after: float, i: int
) -> tuple[float, float, bool]:
    prompt = " ".join(f"word{(i * 7919 + k) % 5000}" for k in range(words))
    created = await client.responses.create(
        model="smollm2-135m", background=True, input=f"Summarise: {prompt}"
    )
    await asyncio.sleep(after)
    start = time.perf_counter()
    reply = await client.responses.cancel(created.id)
    cancel_ms = (time.perf_counter() - start) * 1000
    assert reply.status == "cancelled", reply.status
    trace = (await http.get(f"/debug/engine/{created.id}")).json()
    start = time.perf_counter()
    stream = await client.responses.create(
        model="smollm2-135m", input="Say hi.", stream=True, max_output_tokens=4
    )
    async for event in stream:
        if event.type == "response.output_text.delta":
            break
    await stream.close()
    next_ms = (time.perf_counter() - start) * 1000
    return cancel_ms, next_ms, bool(trace.get("aborted_in_prefill"))


async def main(rounds: int, words: int, after: float) -> list[Chart]:
    with tether_server(engine="local", extra=["--cancel-timeout", "5"]) as srv:
        client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            results = [
                await round_trip(client, http, words, after, i)
                for i in progress(range(rounds), desc="rounds", unit="round")
            ]
    cancels = [r[0] for r in results]
    nexts = [r[1] for r in results]
    print(machine())
    print(
        table(
            ["", "p50 ms", "max ms"],
            [
                ["cancel reply", round(statistics.median(cancels)), round(max(cancels))],
                ["next response's first delta", round(statistics.median(nexts)), round(max(nexts))],
            ],
        )
    )
    print(f"aborted during prefill: {sum(r[2] for r in results)} of {rounds}")
    measures = ["cancel reply", "next response's\nfirst delta"]
    return [
        Chart(
            "cancel during prefill (ms)",
            "ms",
            measures,
            {
                "p50": [statistics.median(cancels), statistics.median(nexts)],
                "max": [max(cancels), max(nexts)],
            },
            marks={"cancel fence 5 s": 5000.0} if max(cancels) > 2500 else {},
        ),
        Chart(
            "per round (ms)",
            "ms",
            list(range(1, rounds + 1)),
            {"cancel reply": cancels, "next first delta": nexts},
            kind="line",
            xlabel="round",
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--words", type=int, default=1100)
    parser.add_argument("--after", type=float, default=0.05)
    args = parser.parse_args()
    with Transcript() as printed:
        figures = run(main(args.rounds, args.words, args.after))
    save("prefill_cancel", printed.text, *figures)
