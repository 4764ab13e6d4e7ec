"""Tokens/s of the embedded SmolLM2 model: llama-cpp driven directly vs through LocalEngine,
and LocalEngine's continuous batching at 1, 2, 4 and 8 concurrent streams.

Run: `PYTHONPATH=src python bench/local_speed.py` (`--streams-only`: the batching table
alone, `--single-only`: the single-stream one; tables and plots also go to
bench/out/local_speed.md and .png). The single-stream paths decode the same chat prompt
greedily for the same number of tokens; the difference is what LocalEngine adds (scheduler
thread, queue hand-off, per-token detokenizing; measure_raw() gives what llama.cpp alone
does with N sequences) and what serving adds (`tether serve` over HTTP, every event
persisted). Over HTTP, two clients: one reads the raw SSE bytes and parses only the
terminal event (what tether serves), one is the official SDK parsing every event into its
model (~0.5 ms of CPU a token here, on the cores llama.cpp's two threads use). Each
single-stream row runs in a fresh process (`--row`), one request after a warm-up, and the
rows take turns for `RUNS` rounds: a second llama.cpp context in one process (a second
OpenMP thread team) slowed whichever row ran second, and taking turns spreads other load
over all rows.

The batching table runs N different prompts at once (`STREAM_TOKENS` each, greedy) and
prints aggregate tokens/s, time to first token (median and worst of the N), and the time
to first token of one more request that arrives while N - 1 streams are decoding, beside
what one prefill plus one step costs (the goal: no more). `measure_direct()`, `measure_engine()` and
`measure_streams()` are importable so other benchmarks can add rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from _report import Chart, save
from tether.engines.base import Delta, Finished, Generation, Message, Step
from tether.engines.local import LocalEngine, find_model_file
from tether.engines.local_worker import Trace

TOKENS = 128
RUNS = 5
STREAM_TOKENS = 96
STREAMS = (1, 2, 4, 8)
#: different prompts SmolLM2 answers at length (one per concurrent stream)
STREAM_PROMPTS = [
    "Write a long, detailed story about a robot who learns to paint.",
    "Explain in detail how a bicycle works.",
    "Describe the life of a honey bee over one summer, at length.",
    "Tell me the long history of the river Thames.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Explain in detail how bread is made, step by step.",
    "Describe a busy city market in the morning, at length.",
    "Write a long essay about why people love music.",
    "Tell a long fairy tale about a fox and a crow.",
]
# A prompt SmolLM2 answers at length, so greedy decoding reaches TOKENS without an EOS;
# measure_engine() checks that it did (the Engine API has no way to suppress EOS).
PROMPT = "Write a long, detailed story about a robot who learns to paint."


def measure_direct(tokens: int = TOKENS, runs: int = RUNS) -> float:
    """Median tokens/s of a bare `Llama.generate` loop, EOS ignored, same prompt and settings."""
    llm = llama_cpp.Llama(str(find_model_file()), n_ctx=2048, n_threads=2, verbose=False)
    try:
        template = llm.metadata["tokenizer.chat_template"]
        prompt_text = Jinja2ChatFormatter(template=template, eos_token="", bos_token="")(
            messages=[{"role": "user", "content": PROMPT}]
        ).prompt
        prompt = llm.tokenize(prompt_text.encode("utf-8"), add_bos=False, special=True)
        rates = []
        # The first run is discarded: it warms caches and reads the whole prompt; later runs
        # (on both paths) reuse the prompt's KV cache, so this measures decoding.
        for _ in range(runs + 1):
            started = time.perf_counter()
            stream = llm.generate(prompt, temp=0.0, top_k=0, min_p=0.05, repeat_penalty=1.0)
            for produced, token in enumerate(stream, start=1):
                llm.detokenize([token])
                if produced == tokens:
                    break
            stream.close()
            rates.append(tokens / (time.perf_counter() - started))
        return statistics.median(rates[1:])
    finally:
        llm.close()


async def _engine_rates(tokens: int, runs: int) -> list[float]:
    engine = LocalEngine()
    await engine.start()
    try:
        request = Generation(
            response_id="resp_bench",
            model="smollm2-135m",
            messages=[Message("user", PROMPT)],
            max_output_tokens=tokens,
            temperature=0.0,
        )
        rates = []
        for _ in range(runs + 1):
            started = time.perf_counter()
            produced, end = 0, None

            async def emit(step: Step) -> None:
                nonlocal produced, end
                if isinstance(step, Delta):
                    produced += step.tokens
                elif isinstance(step, Finished):
                    end = step

            await engine.generate(request, emit)
            elapsed = time.perf_counter() - started
            if end != Finished("length"):
                raise RuntimeError(f"model stopped after {produced} tokens; change PROMPT")
            rates.append(produced / elapsed)
        return rates[1:]
    finally:
        await engine.close()


def measure_engine(tokens: int = TOKENS, runs: int = RUNS) -> float:
    """Median tokens/s of `LocalEngine.generate` (PromptRead to Finished) for `tokens` tokens."""
    return statistics.median(asyncio.run(_engine_rates(tokens, runs)))


def _sdk_rate(base_url: str, tokens: int) -> float:
    """One streamed response read with the official SDK (every event parsed into its
    pydantic model): output tokens / (request sent -> terminal event)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused")
    started = time.perf_counter()
    stream = client.responses.create(
        model="smollm2-135m",
        input=PROMPT,
        stream=True,
        max_output_tokens=tokens,
        temperature=0.0,
    )
    events = list(stream)
    elapsed = time.perf_counter() - started
    return _rate(events[-1].response.model_dump(), elapsed)  # type: ignore[union-attr]


def _raw_rate(base_url: str, tokens: int) -> float:
    """One streamed response read as raw SSE bytes (only the terminal event parsed):
    what tether serves, without a client's per-event parsing on the model's cores."""
    import httpx

    body = {
        "model": "smollm2-135m",
        "input": PROMPT,
        "stream": True,
        "max_output_tokens": tokens,
        "temperature": 0.0,
    }
    received = bytearray()
    started = time.perf_counter()
    with httpx.stream("POST", f"{base_url}/responses", json=body, timeout=120) as reply:
        reply.raise_for_status()
        for chunk in reply.iter_raw():
            received += chunk
    elapsed = time.perf_counter() - started
    # The terminal event is the last one with an `event:` line (`data: [DONE]` follows).
    last = bytes(received)[: received.rindex(b"\n\ndata: [DONE]")].rsplit(b"\n\n", 1)[-1]
    data = last.split(b"\ndata: ", 1)[1]
    return _rate(json.loads(data)["response"], elapsed)


def _rate(response: dict[str, object], elapsed: float) -> float:
    if response["status"] != "incomplete":
        raise RuntimeError(f"model stopped early: {response['usage']}; change PROMPT")
    usage = response["usage"]
    assert isinstance(usage, dict)
    return float(usage["output_tokens"]) / elapsed


def _http_rates(read: Callable[[str, int], float], tokens: int, runs: int) -> float:
    """Median tokens/s through `tether serve --engine local` over HTTP (a streamed
    response, every event persisted), request sent to terminal event, `read` reading it."""
    from _server import HOST, Server

    srv = Server(
        [
            sys.executable,
            "-m",
            "tether",
            "serve",
            "--engine",
            "local",
            "--db",
            "bench.db",
            "--host",
            HOST,
            "--port",
            "{port}",
        ],
        name="tether",
    )
    srv.start()
    try:
        rates = [read(srv.base_url, tokens) for _ in range(runs + 1)]
        return statistics.median(rates[1:])  # the first one warms up
    finally:
        srv.stop()
        srv.cleanup()


def measure_http(tokens: int = TOKENS, runs: int = RUNS) -> float:
    """Tokens/s through tether over HTTP, the client reading raw SSE bytes."""
    return _http_rates(_raw_rate, tokens, runs)


def measure_http_sdk(tokens: int = TOKENS, runs: int = RUNS) -> float:
    """Tokens/s through tether over HTTP, the official SDK parsing every event (its
    ~0.5 ms of CPU per event competes with llama.cpp's two threads on a 2-core machine)."""
    return _http_rates(_sdk_rate, tokens, runs)


@dataclass(slots=True)
class StreamRow:
    streams: int
    tokens_per_s: float
    best_tokens_per_s: float  # the best run: the least disturbed by other load
    ttft_median: float
    ttft_worst: float
    joiner_ttft: float  # one more request, arriving while streams - 1 decode
    budget: float  # one prefill (alone) + one step at `streams`


async def _stream(
    engine: LocalEngine, rid: str, prompt: str, tokens: int
) -> tuple[int, float, float]:
    """(tokens, seconds to the first token, seconds in all) of one greedy stream."""
    request = Generation(rid, "smollm2-135m", [Message("user", prompt)], tokens, 0.0)
    started = time.perf_counter()
    first: float | None = None
    produced = 0

    async def emit(step: Step) -> None:
        nonlocal first, produced
        if isinstance(step, Delta):
            produced += 1
            if first is None:
                first = time.perf_counter() - started

    await engine.generate(request, emit)
    return produced, first or 0.0, time.perf_counter() - started


async def _streams(counts: tuple[int, ...], tokens: int, runs: int) -> list[StreamRow]:
    engine = LocalEngine(sequences=max(counts))
    await engine.start()
    got: dict[int, dict[str, list[float]]] = {
        n: {"rates": [], "ttfts": [], "joins": [], "steps": [], "prefills": []} for n in counts
    }
    try:
        # Warm up: caches, and every prompt's template prefix.
        await asyncio.gather(*(_stream(engine, "w", p, 4) for p in STREAM_PROMPTS[:2]))
        # Rounds of every count in turn, so a burst of other load on this shared machine
        # spreads over the rows instead of spoiling one.
        for run in range(runs):
            for n in counts:
                m = got[n]
                # One prefill alone: the last prompt after another (its own part only).
                await _stream(engine, "x", STREAM_PROMPTS[0], 1)
                m["prefills"].append((await _stream(engine, "p", STREAM_PROMPTS[-1], 1))[1])
                started = time.perf_counter()
                res = await asyncio.gather(
                    *(_stream(engine, f"s{i}", STREAM_PROMPTS[i], tokens) for i in range(n))
                )
                elapsed = time.perf_counter() - started
                m["rates"].append(sum(g[0] for g in res) / elapsed)
                m["ttfts"].extend(g[1] for g in res)
                # A step at n streams: the slowest stream's time per token after its first.
                m["steps"].append(max((g[2] - g[1]) / max(g[0] - 1, 1) for g in res))
                m["joins"].append(await _joiner(engine, n, tokens))
                print(
                    f"  round {run + 1}/{runs}, {n} streams: {m['rates'][-1]:.1f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )  # progress on a run of a few minutes
    finally:
        await engine.close()
    med = statistics.median
    return [
        StreamRow(
            n,
            med(m["rates"]),
            max(m["rates"]),
            med(m["ttfts"]),
            max(m["ttfts"]),
            med(m["joins"]),
            med(m["prefills"]) + med(m["steps"]),
        )
        for n, m in got.items()
    ]


async def _joiner(engine: LocalEngine, n: int, tokens: int) -> float:
    """TTFT of a request arriving while n - 1 streams are decoding (their first token out)."""
    if n == 1:
        return (await _stream(engine, "j", STREAM_PROMPTS[-1], 2))[1]
    running = [
        asyncio.ensure_future(_stream(engine, f"r{i}", STREAM_PROMPTS[i], tokens))
        for i in range(n - 1)
    ]
    while any(not engine.traces.get(f"r{i}", Trace()).token_times for i in range(n - 1)):
        await asyncio.sleep(0.005)  # the bench polls; nothing is asserted on timing
    _, ttft, _ = await _stream(engine, "j", STREAM_PROMPTS[-1], 2)
    await asyncio.gather(*running)
    return ttft


def measure_streams(
    counts: tuple[int, ...] = STREAMS, tokens: int = STREAM_TOKENS, runs: int = 3
) -> list[StreamRow]:
    """LocalEngine at each number of concurrent streams (medians of `runs`)."""
    return asyncio.run(_streams(counts, tokens, runs))


def streams_table(rows: list[StreamRow]) -> str:
    base = rows[0].tokens_per_s
    lines = [
        "| streams | aggregate tokens/s | vs 1 stream | best run tokens/s | best vs 1 stream "
        "| TTFT median s | TTFT worst s | joining request TTFT s | one prefill + one step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    best = rows[0].best_tokens_per_s
    for r in rows:
        lines.append(
            f"| {r.streams} | {r.tokens_per_s:.1f} | {r.tokens_per_s / base:.2f}x "
            f"| {r.best_tokens_per_s:.1f} | {r.best_tokens_per_s / best:.2f}x "
            f"| {r.ttft_median:.3f} | {r.ttft_worst:.3f} | {r.joiner_ttft:.3f} | {r.budget:.3f} |"
        )
    return "\n".join(lines)


def measure_raw(counts: tuple[int, ...] = STREAMS, steps: int = 32) -> dict[int, float]:
    """What llama.cpp alone gives: aggregate tokens/s of one `llama_decode` of one token
    for each of n sequences (one context, a KV cache per sequence), best of 3 rounds. The
    ceiling for LocalEngine's batching on this machine."""
    llm = llama_cpp.Llama(str(find_model_file()), n_ctx=256, n_threads=2, verbose=False)
    params = llama_cpp.llama_context_default_params()
    top = max(counts)
    params.n_ctx, params.n_seq_max, params.kv_unified = top * 1024, top, False
    params.n_batch = params.n_ubatch = max(top, 8)
    params.n_threads = params.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    mem = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    token = llm.tokenize(b"Hello", add_bos=False)[0]
    rates: dict[int, float] = {}
    try:
        for n in counts:
            best = 0.0
            for _ in range(3):
                llama_cpp.llama_memory_clear(mem, True)
                started = time.perf_counter()
                for pos in range(steps):
                    for seq in range(n):
                        batch.token[seq], batch.pos[seq], batch.n_seq_id[seq] = token, pos, 1
                        batch.seq_id[seq][0], batch.logits[seq] = seq, 1
                    batch.n_tokens = n
                    llama_cpp.llama_decode(ctx, batch)
                best = max(best, n * steps / (time.perf_counter() - started))
            rates[n] = best
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llm.close()
    return rates


def charts(rows: list[StreamRow], raw: dict[int, float]) -> list[Chart]:
    xs = [r.streams for r in rows]
    return [
        Chart(
            "aggregate tokens/s",
            "tokens/s",
            xs,
            {
                "LocalEngine (median)": [r.tokens_per_s for r in rows],
                "LocalEngine (best run)": [r.best_tokens_per_s for r in rows],
                "llama.cpp alone (best)": [raw.get(n, 0.0) for n in xs],
            },
            kind="line",
            xlabel="concurrent streams",
        ),
        Chart(
            "time to first token",
            "seconds",
            xs,
            {
                "TTFT median": [r.ttft_median for r in rows],
                "joining request": [r.joiner_ttft for r in rows],
                "one prefill + one step": [r.budget for r in rows],
            },
            kind="line",
            xlabel="concurrent streams",
        ),
    ]


def single_chart(rows: list[tuple[str, float]]) -> Chart:
    return Chart(
        "one stream",
        "tokens/s",
        [name for name, _ in rows],
        {"median": [rate for _, rate in rows]},
        marks={"95% of direct (goal)": 0.95 * rows[0][1]},
        horizontal=True,
    )


def _load() -> str:
    # llama.cpp's 2 threads on a 2-core machine slow down sharply under any other load.
    return f"1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


ROWS = {
    "direct": ("llama-cpp directly", measure_direct),
    "engine": ("LocalEngine.generate", measure_engine),
    "http": ("tether over HTTP (raw SSE reader)", measure_http),
    "sdk": ("tether over HTTP (openai SDK, every event parsed)", measure_http_sdk),
}


def _isolated(row: str) -> object:
    """`row`'s result, measured in a fresh process (its own llama.cpp threads)."""
    done = subprocess.run(
        [sys.executable, __file__, "--row", row], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"row {row} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def single_rows(runs: int = RUNS) -> list[tuple[str, float]]:
    """Median tokens/s of each single-stream path: `runs` rounds, each row in turn in a
    fresh process (one request after a warm-up)."""
    rates: dict[str, list[float]] = {row: [] for row in ROWS}
    for run in range(runs):
        for row in ROWS:
            rate = _isolated(row)
            assert isinstance(rate, float)
            rates[row].append(rate)
            print(f"  round {run + 1}/{runs}, {row}: {rate:.1f} tokens/s", file=sys.stderr)
    return [(ROWS[row][0], statistics.median(r)) for row, r in rates.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams-only", action="store_true")
    parser.add_argument("--single-only", action="store_true", help="the single-stream table")
    parser.add_argument("--tokens", type=int, default=STREAM_TOKENS, help="per stream")
    parser.add_argument("--runs", type=int, default=3, help="runs at each number of streams")
    parser.add_argument("--row", choices=[*ROWS, "raw"], help="(internal) one row, as JSON")
    args = parser.parse_args()
    if args.row == "raw":
        print(json.dumps(measure_raw()))
        return
    if args.row:
        print(json.dumps(ROWS[args.row][1](TOKENS, 1)))
        return
    markdown = ""
    single: list[Chart] = []
    if not args.streams_only:
        rows = single_rows()
        single.append(single_chart(rows))
        base = rows[0][1]
        markdown += (
            f"SmolLM2-135M Q4_1, {TOKENS} tokens, greedy, n_threads=2, median of {RUNS} rounds "
            "(each row in a fresh process, rows in turn) "
            f"({_load()})\n\n| path | tokens/s | vs direct |\n|---|---|---|\n"
        )
        markdown += "".join(f"| {n} | {r:.1f} | {r / base:.0%} |\n" for n, r in rows)
        markdown += "\n"
    if args.single_only:
        print(markdown)
        save("local_speed", markdown, *single)
        return
    before = _load()
    table = measure_streams(tokens=args.tokens, runs=args.runs)
    got = _isolated("raw")  # in a process of its own too, for the same reason
    assert isinstance(got, dict)
    raw = {int(n): float(r) for n, r in got.items()}
    markdown += (
        f"LocalEngine, N different prompts at once, {args.tokens} tokens each, greedy, "
        f"median of {args.runs} runs ({before} before, {_load()} after)\n\n"
        + streams_table(table)
        + "\n\nllama.cpp alone, one token for each of N sequences a decode (best of 3): "
        + ", ".join(f"{n}: {r:.0f} tokens/s ({r / raw[1]:.2f}x)" for n, r in raw.items())
    )
    print(markdown)
    save("local_speed", markdown, *single, *charts(table, raw))


if __name__ == "__main__":
    main()
