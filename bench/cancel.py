"""Cancel while streaming: how fast a cancel is answered, and whether it really stops.

Run: `python bench/cancel.py` (about 15 s). Starts a scripted-engine tether
(`--scripted-rate 100 --scripted-length 200 --debug-routes`) on a free loopback port with
a temp database, then runs `--responses` background+stream responses, `--concurrency` at a
time, through the official `openai.AsyncOpenAI` client:

- each response is created with `background=True, stream=True` (stream A); as soon as its
  first event names the id, a second reader (stream B) is opened with
  `responses.retrieve(id, stream=True, starting_after=<that event's sequence_number>)`;
- after a random number of deltas on stream A (uniform in [--min-deltas, --max-deltas],
  seeded RNG), a separate task calls `responses.cancel(id)`;
- afterwards `GET /debug/engine/{id}` gives the engine's per-token unix times.

It prints the parameters (with the seed), a latency table (p50/p99/max, ms) and a checks
table; the exit code is 1 if any check failed. Measured (client and server share a clock):

- cancel reply: cancel call sent -> reply received;
- cancel -> terminal, every stream: cancel call sent -> terminal event received on that
  stream (both streams of every response pooled), and the slowest stream per response;
- terminal - reply: terminal event received minus reply received (negative: the stream had
  the terminal event before the caller had the reply; CONTRACT §3.4 says "about the moment");
- tokens after the reply: engine `token_times` strictly after the reply was received (goal 0,
  CONTRACT §3.3); tokens after the call (one token step in flight is allowed).

Checks per response: every stream ends with `response.failed` whose `response.status` is
"cancelled" and `response.error` null, preceded by `output_item.done` with status
"incomplete"; no event after the terminal one; each stream's delta count == reply
`usage.output_tokens` == engine trace `produced` == a later retrieve's `output_tokens`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson

import _server

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


@dataclass
class StreamResult:
    name: str
    events: int = 0
    deltas: int = 0
    terminal: Any = None  # the terminal event
    terminal_at: float | None = None
    after_terminal: int = 0  # events seen after the terminal one (must be 0)
    deltas_after_reply: int = 0  # deltas received after the cancel reply (informational)
    closed_incomplete: bool = False  # output_item.done with status incomplete was seen
    done_marker: bool = False  # `data: [DONE]` came after the terminal event
    error: str | None = None


@dataclass
class Result:
    index: int
    cancel_after: int
    rid: str | None = None
    cancel_sent: float | None = None
    cancel_reply_at: float | None = None
    reply: Any = None
    cancel_error: str | None = None
    streams: list[StreamResult] = field(default_factory=list)
    trace: dict[str, Any] | None = None
    retrieved_output_tokens: int | None = None
    error: str | None = None


async def _sse(response: Any) -> AsyncIterator[dict[str, Any] | None]:
    """Events of a raw SSE body as dicts (orjson); None for the `[DONE]` marker."""
    async for line in response.iter_lines():
        if line.startswith("data: "):
            if line == "data: [DONE]":
                yield None
            else:
                yield orjson.loads(line[6:])


async def _sdk(stream: Any) -> AsyncIterator[dict[str, Any] | None]:
    """Events typed by the SDK, as dicts of what the checks need (the SDK eats `[DONE]`)."""
    async for event in stream:
        kind = event.type
        if kind in TERMINAL or kind in ("response.created", "response.output_item.done"):
            yield event.to_dict()
        else:
            yield {"type": kind, "sequence_number": event.sequence_number}
    yield None


async def _read(events: AsyncIterator[dict[str, Any] | None], res: Result, out: StreamResult,
                on_event: Any = None) -> None:
    try:
        async for event in events:
            now = time.time()
            if event is None:
                out.done_marker = True
                continue
            out.events += 1
            if out.terminal is not None or out.done_marker:
                out.after_terminal += 1
                continue
            kind = event["type"]
            if kind == "response.output_text.delta":
                out.deltas += 1
                if res.cancel_reply_at is not None and now > res.cancel_reply_at:
                    out.deltas_after_reply += 1
            elif kind == "response.output_item.done":
                out.closed_incomplete = event["item"]["status"] == "incomplete"
            elif kind in TERMINAL:
                out.terminal, out.terminal_at = event, now
            if on_event is not None:
                await on_event(event)
    except Exception as exc:  # reported in the checks table
        out.error = f"{type(exc).__name__}: {exc}"


async def _cancel(client: openai.AsyncOpenAI, res: Result) -> None:
    assert res.rid is not None
    res.cancel_sent = time.time()
    try:
        res.reply = await client.responses.cancel(res.rid)
    except Exception as exc:
        res.cancel_error = f"{type(exc).__name__}: {exc}"
    res.cancel_reply_at = time.time()


async def one(client: openai.AsyncOpenAI, debug: httpx.AsyncClient, res: Result,
              sdk_events: bool) -> None:
    main = StreamResult("A (POST)")
    extra = StreamResult("B (resume)")
    res.streams = [main, extra]
    tasks: list[asyncio.Task[None]] = []
    raw = client.responses.with_streaming_response

    async def resume(after: int) -> None:
        assert res.rid is not None
        try:
            if sdk_events:
                stream = await client.responses.retrieve(
                    res.rid, stream=True, starting_after=after)
                await _read(_sdk(stream), res, extra)
            else:
                async with raw.retrieve(res.rid, stream=True, starting_after=after) as resp:
                    await _read(_sse(resp), res, extra)
        except Exception as exc:
            extra.error = f"{type(exc).__name__}: {exc}"

    async def on_event(event: dict[str, Any]) -> None:
        if res.rid is None:
            res.rid = event["response"]["id"]
            tasks.append(asyncio.create_task(resume(event["sequence_number"])))
        if (event["type"] == "response.output_text.delta" and main.deltas == res.cancel_after
                and res.cancel_sent is None):
            tasks.append(asyncio.create_task(_cancel(client, res)))

    body: dict[str, Any] = {"model": "scripted", "input": f"bench cancel {res.index}",
                            "background": True, "stream": True}
    try:
        if sdk_events:
            await _read(_sdk(await client.responses.create(**body)), res, main, on_event)
        else:
            async with raw.create(**body) as resp:
                await _read(_sse(resp), res, main, on_event)
        await asyncio.gather(*tasks)
        if res.rid is not None:
            trace = await debug.get(f"/debug/engine/{res.rid}")
            res.trace = trace.json() if trace.status_code == 200 else None
            retrieved = await client.responses.retrieve(res.rid)
            res.retrieved_output_tokens = retrieved.usage.output_tokens \
                if retrieved.usage else None
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        for t in tasks:
            t.cancel()


def checks(res: Result) -> dict[str, bool]:
    reply_tokens = res.reply.usage.output_tokens if res.reply and res.reply.usage else None
    produced = res.trace["produced"] if res.trace else None
    streams = res.streams
    term_ok = all(
        s.terminal is not None and s.terminal["type"] == "response.failed"
        and s.terminal["response"]["status"] == "cancelled"
        and s.terminal["response"]["error"] is None for s in streams)
    return {
        "no client error": res.error is None and all(s.error is None for s in streams),
        "cancel reply 200, status cancelled": res.cancel_error is None
            and res.reply is not None and res.reply.status == "cancelled",
        "every stream: response.failed / cancelled / error null": term_ok,
        "every stream: open item closed incomplete": all(s.closed_incomplete for s in streams),
        "no event after the terminal one, then [DONE]": all(
            s.after_terminal == 0 and s.done_marker for s in streams),
        "reply output_tokens == trace produced": reply_tokens is not None
            and reply_tokens == produced,
        "every stream's deltas == reply output_tokens": all(
            s.deltas == reply_tokens for s in streams),
        "terminal event usage == reply usage": all(
            s.terminal is not None and s.terminal["response"]["usage"] is not None
            and s.terminal["response"]["usage"]["output_tokens"] == reply_tokens
            for s in streams),
        "later retrieve output_tokens == reply": res.retrieved_output_tokens == reply_tokens,
        "0 tokens after the cancel reply": _after(res, res.cancel_reply_at) == 0,
    }


def _after(res: Result, moment: float | None) -> int | None:
    if res.trace is None or moment is None:
        return None
    return sum(1 for t in res.trace["token_times"] if t > moment)


def _ms(values: list[float]) -> list[object]:
    ms = [v * 1000 for v in values]
    return [len(ms), _server.percentile(ms, 50), _server.percentile(ms, 99),
            max(ms) if ms else float("nan")]


async def bench(url: str, args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    results = [Result(i, rng.randint(args.min_deltas, args.max_deltas))
               for i in range(args.responses)]
    limits = httpx.Limits(max_connections=4 * args.concurrency + 10,
                          max_keepalive_connections=4 * args.concurrency + 10)
    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60.0,
        http_client=httpx.AsyncClient(limits=limits, timeout=60.0))
    slots = asyncio.Semaphore(args.concurrency)

    async def limited(res: Result) -> None:
        async with slots:
            await one(client, debug, res, args.sdk_events)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as debug, client:
        await asyncio.gather(*(limited(r) for r in results))
    wall = time.perf_counter() - started

    reply = [r.cancel_reply_at - r.cancel_sent for r in results
             if r.reply is not None and r.cancel_sent and r.cancel_reply_at]
    term_all = [s.terminal_at - r.cancel_sent for r in results for s in r.streams
                if r.cancel_sent and s.terminal_at]
    term_slowest = [max(s.terminal_at for s in r.streams) - r.cancel_sent for r in results
                    if r.cancel_sent and all(s.terminal_at for s in r.streams)]
    term_vs_reply = [s.terminal_at - r.cancel_reply_at for r in results for s in r.streams
                     if r.cancel_reply_at and s.terminal_at]
    after_reply = [n for r in results if (n := _after(r, r.cancel_reply_at)) is not None]
    after_call = [n for r in results if (n := _after(r, r.cancel_sent)) is not None]
    late_deltas = [s.deltas_after_reply for r in results for s in r.streams]

    print(_server.table(["latency (ms)", "n", "p50", "p99", "max"], [
        ["cancel call -> reply", *_ms(reply)],
        ["cancel call -> terminal event, every stream", *_ms(term_all)],
        ["cancel call -> terminal event, slowest stream of the response", *_ms(term_slowest)],
        ["terminal event - reply received (every stream)", *_ms(term_vs_reply)],
    ]))
    print()
    print(_server.table(["per response", "max", "total", "responses > 0"], [
        ["engine tokens after the cancel reply (goal 0)", max(after_reply, default="-"),
         sum(after_reply), sum(1 for n in after_reply if n)],
        ["engine tokens after the cancel call (<= 1 in flight)", max(after_call, default="-"),
         sum(after_call), sum(1 for n in after_call if n)],
        ["deltas received after the cancel reply (all in log before it)",
         max(late_deltas, default="-"), sum(late_deltas), sum(1 for n in late_deltas if n)],
    ]))
    print()
    verdicts = [checks(r) for r in results]
    names = list(verdicts[0]) if verdicts else []
    rows = []
    failed = 0
    for name in names:
        bad = [r.index for r, v in zip(results, verdicts, strict=True) if not v[name]]
        failed += len(bad)
        rows.append([name, len(results) - len(bad), len(bad),
                     ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")])
    print(_server.table(["check", "pass", "fail", "failing responses (index)"], rows))
    for r in results:
        problems = [r.error, r.cancel_error, *(s.error for s in r.streams)]
        for p in filter(None, problems):
            print(f"  response {r.index} ({r.rid}): {p}")
            break
    print(f"\nwall time {wall:.1f} s for {len(results)} responses")
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--responses", type=int, default=200, help="responses in all (200)")
    p.add_argument("--concurrency", type=int, default=20, help="responses at a time (20)")
    p.add_argument("--rate", type=float, default=100.0, help="scripted tokens/s (100)")
    p.add_argument("--length", type=int, default=200, help="scripted tokens per response")
    p.add_argument("--min-deltas", type=int, default=1, help="cancel after >= this many deltas")
    p.add_argument("--max-deltas", type=int, default=150, help="... and <= this many (150)")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random)")
    p.add_argument("--sdk-events", action="store_true",
                   help="parse stream events with the SDK's typed models (costs the client "
                        "~0.2 ms/event: at the default size the client, not tether, lags)")
    p.add_argument("--url", help="use a running tether (started with --debug-routes and "
                                 "the scripted engine) instead of starting one")
    args = p.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    if args.max_deltas >= args.length:
        p.error("--max-deltas must be below --length, or responses complete before the cancel")
    print("# tether cancel benchmark")
    print(_server.table(["parameter", "value"], [
        ["responses", args.responses], ["concurrency", args.concurrency],
        ["streams per response", "2 (POST + 1 resume)"],
        ["scripted rate (tokens/s)", args.rate], ["scripted length", args.length],
        ["cancel after deltas", f"uniform [{args.min_deltas}, {args.max_deltas}]"],
        ["seed", args.seed], ["client", f"openai {openai.__version__} AsyncOpenAI"],
        ["stream parsing", "SDK typed events" if args.sdk_events
         else "raw SSE + orjson (via with_streaming_response)"],
        ["server", args.url or "tether serve --engine scripted (temp db, started here)"],
    ]))
    print()
    if args.url:
        return _server.run(bench(args.url.rstrip("/"), args))
    with _server.tether_server(rate=args.rate, length=args.length) as srv:
        return _server.run(bench(srv.url, args))


if __name__ == "__main__":
    sys.exit(main())
