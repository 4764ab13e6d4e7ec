"""Tokens/s of the embedded SmolLM2 model: llama-cpp driven directly vs through LocalEngine.

Run: `PYTHONPATH=src python bench/local_speed.py`. Both paths decode the same chat prompt
greedily for the same number of tokens; the difference is what LocalEngine adds (worker
thread, queue hand-off, per-token detokenizing). `measure_direct()` and `measure_engine()`
are importable so other benchmarks can add rows (e.g. through tether over HTTP).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from tether.engines.base import Delta, Finished, Generation, Message, Step
from tether.engines.local import LocalEngine, find_model_file

TOKENS = 128
RUNS = 5
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


def measure_http(tokens: int = TOKENS, runs: int = RUNS) -> float:
    """Median tokens/s through `tether serve --engine local` over HTTP with the official SDK
    (a streamed response, every event persisted), request sent to terminal event."""
    import openai

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
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused")
        rates = []
        for _ in range(runs + 1):
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
            final = events[-1].response  # type: ignore[union-attr]
            if final.status != "incomplete":
                raise RuntimeError(f"model stopped after {final.usage.output_tokens} tokens")
            rates.append(final.usage.output_tokens / elapsed)
        return statistics.median(rates[1:])
    finally:
        srv.stop()
        srv.cleanup()


def main() -> None:
    rows = [
        ("llama-cpp directly", measure_direct()),
        ("LocalEngine.generate", measure_engine()),
        ("tether over HTTP", measure_http()),
    ]
    base = rows[0][1]
    # llama.cpp's 2 threads on a 2-core machine slow down sharply under any other load.
    load = os.getloadavg()[0]
    print(f"SmolLM2-135M Q4_1, {TOKENS} tokens, greedy, n_threads=2, median of {RUNS} runs")
    print(f"(1-minute load average {load:.1f} on {os.cpu_count()} CPUs)")
    print(f"{'path':<24}{'tokens/s':>10}{'vs direct':>11}")
    for name, rate in rows:
        print(f"{name:<24}{rate:>10.1f}{rate / base:>10.0%}")


if __name__ == "__main__":
    main()
