"""Cancel while streaming: how fast a cancel is answered, and whether it really stops.

Run: `python bench/cancel.py` (about 15 s on a quiet machine). Starts a scripted-engine tether
(`--scripted-rate 100 --scripted-length 200 --debug-routes`) on a free loopback port with
a temp database, then runs `--responses` background+stream responses, `--concurrency` at a
time, through the official `openai.AsyncOpenAI` client:

- each response is created with `background=True, stream=True` (stream A); as soon as its
  first event names the id, a second reader (stream B) is opened with
  `responses.retrieve(id, stream=True, starting_after=<that event's sequence_number>)`;
- after a random number of deltas on stream A (uniform in [--min-deltas, --max-deltas],
  seeded RNG), a separate task calls `responses.cancel(id)`;
- afterwards `GET /debug/engine/{id}` gives the engine's per-token unix times.

Streams are read through the SDK (`with_streaming_response`) but parsed with orjson: the
SDK's typed events cost ~0.2 ms each, and at 40 streams x 100 events/s the client, not
tether, would be what lags (`--sdk-events` parses them with the SDK anyway). One untimed
response warms the SDK up first, and the client's GC is paused while measuring (a full
collection over the SDK's model classes stalls the client for 100-300 ms).

It prints the parameters (seed, machine load), a latency table (p50/p99/max, ms), a
tokens table and a checks table; the exit code is 1 if any check failed. Client and
server share a clock:

- cancel call -> reply: what the caller of `responses.cancel` waits; "of which HTTP" is
  the part between httpx handing the request to the transport and reading the reply's
  headers (the rest is SDK and client event-loop time);
- cancel request sent -> engine saw the abort: the trace's `aborted_at`;
- cancel call -> terminal event: until each stream (both streams of every response
  pooled; and the slowest stream per response) received its terminal event;
- terminal - reply: terminal event received minus reply received (negative: the stream had
  it first; docs/contract.md §3.4 says "at about the moment the caller has the reply");
- engine tokens after the cancel reply: trace `token_times` strictly after the reply was
  received (goal 0, docs/contract.md §3.3); tokens between the call and its reply, and deltas that
  reached a stream after the reply, are informational.

Checks per response: the reply is 200 `cancelled`; every stream ends with
`response.failed` whose `response.status` is "cancelled" and `response.error` null,
preceded by `output_item.done` with status "incomplete" (if an item was opened), then
`[DONE]`, with nothing after the terminal event; each stream's delta count == reply
`usage.output_tokens` == engine trace `produced` == the terminal event's and a later
retrieve's `output_tokens`. A cancel that arrives after the response ended by itself (a
very slow client; the embedded model ending its turn) is counted apart: it must get a 400
and every stream the natural terminal event, and it is left out of the figures.

`--engine local` measures the embedded model instead (SmolLM2 via llama-cpp, model
`smollm2-135m`, `LocalEngine` traces on the same debug route). It runs one generation at a
time, so with many responses open most are queued: `--cancel-queued F` cancels a share F
of the responses (seeded) at a random moment in [0, `--cancel-within`] seconds after their
id is known, whatever they are doing, and the rest after k deltas as above. Every row is
split into responses that were running when the cancel was sent (the engine trace's
`started_at` is earlier) and responses still queued (the engine never started them:
no trace, 0 tokens).
On a 2-core machine the client uses about half a core and competes with the server: the
parameters table prints the load average, and the last line the CPU each side used.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import orjson

import _server
from _report import Chart, Transcript, progress, save

try:  # the SDK's HTTP library: httpx2 for openai 3.x, httpx before
    import httpx2 as sdk_httpx
except ImportError:
    import httpx as sdk_httpx  # type: ignore[no-redef]

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
NOT_STARTED: dict[str, Any] = {
    "started_at": None,
    "produced": 0,
    "token_times": [],
    "aborted_at": None,
}
MODELS = {"scripted": "scripted", "local": "smollm2-135m"}


@dataclass
class StreamResult:
    name: str
    events: int = 0
    deltas: int = 0
    terminal: Any = None  # the terminal event
    terminal_at: float | None = None
    after_terminal: int = 0  # events seen after the terminal one (must be 0)
    deltas_after_reply: int = 0  # deltas received after the cancel reply (informational)
    opened_item: bool = False  # output_item.added was seen
    closed_incomplete: bool = False  # output_item.done with status incomplete was seen
    done_marker: bool = False  # `data: [DONE]` came after the terminal event
    error: str | None = None


@dataclass
class Result:
    index: int
    cancel_after: int
    rid: str | None = None
    cancel_sent: float | None = None
    cancel_request_at: float | None = None  # httpx request hook: handed to the transport
    cancel_response_at: float | None = None  # httpx response hook: status + headers read
    cancel_reply_at: float | None = None
    reply: Any = None
    cancel_error: str | None = None
    cancel_at_s: float | None = None  # cancel this long after the id is known (not deltas)
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


async def _read(
    events: AsyncIterator[dict[str, Any] | None],
    res: Result,
    out: StreamResult,
    on_event: Any = None,
) -> None:
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
            elif kind == "response.output_item.added":
                out.opened_item = True
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


async def _cancel_later(client: openai.AsyncOpenAI, res: Result, delay: float) -> None:
    await asyncio.sleep(delay)
    if res.cancel_sent is None:
        await _cancel(client, res)


async def one(
    client: openai.AsyncOpenAI,
    debug: httpx.AsyncClient,
    res: Result,
    sdk_events: bool,
    by_id: dict[str, Result],
    model: str,
) -> None:
    main = StreamResult("A (POST)")
    extra = StreamResult("B (resume)")
    res.streams = [main, extra]
    tasks: list[asyncio.Task[None]] = []
    raw = client.responses.with_streaming_response

    async def resume(after: int) -> None:
        assert res.rid is not None
        try:
            if sdk_events:
                stream = await client.responses.retrieve(res.rid, stream=True, starting_after=after)
                await _read(_sdk(stream), res, extra)
            else:
                async with raw.retrieve(res.rid, stream=True, starting_after=after) as resp:
                    await _read(_sse(resp), res, extra)
        except Exception as exc:
            extra.error = f"{type(exc).__name__}: {exc}"

    async def on_event(event: dict[str, Any]) -> None:
        if res.rid is None:
            res.rid = event["response"]["id"]
            by_id[res.rid] = res
            tasks.append(asyncio.create_task(resume(event["sequence_number"])))
            if res.cancel_at_s is not None:
                tasks.append(asyncio.create_task(_cancel_later(client, res, res.cancel_at_s)))
        if (
            res.cancel_at_s is None
            and event["type"] == "response.output_text.delta"
            and main.deltas == res.cancel_after
            and res.cancel_sent is None
        ):
            tasks.append(asyncio.create_task(_cancel(client, res)))

    prompt = (
        f"bench cancel {res.index}"
        if model == "scripted"
        else f"Write a very long story, number {res.index}, about a lighthouse keeper."
    )
    body: dict[str, Any] = {"model": model, "input": prompt, "background": True, "stream": True}
    try:
        if sdk_events:
            await _read(_sdk(await client.responses.create(**body)), res, main, on_event)
        else:
            async with raw.create(**body) as resp:
                await _read(_sse(resp), res, main, on_event)
        await asyncio.gather(*tasks)
        if res.rid is not None:
            trace = await debug.get(f"/debug/engine/{res.rid}")
            # 404: the engine never started it (cancelled while queued)
            res.trace = (
                trace.json()
                if trace.status_code == 200
                else (NOT_STARTED if trace.status_code == 404 else None)
            )
            retrieved = await client.responses.retrieve(res.rid)
            res.retrieved_output_tokens = retrieved.usage.output_tokens if retrieved.usage else None
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        for t in tasks:
            t.cancel()


def ended_first(res: Result) -> bool:
    """The cancel came after the response had ended by itself (it lost the race, §3.7)."""
    return (
        res.reply is None
        and res.cancel_error is not None
        and "400" in res.cancel_error
        and all(
            s.terminal is not None and s.terminal["type"] != "response.failed" for s in res.streams
        )
    )


def running_at_cancel(res: Result) -> bool:
    """The engine had started the response when the cancel request was sent."""
    if res.trace is None:
        return False
    started = res.trace.get("started_at") or res.trace.get("prompt_read_at")
    sent = res.cancel_request_at or res.cancel_sent
    return started is not None and sent is not None and started <= sent


def checks(res: Result) -> dict[str, bool]:
    if ended_first(res):
        return lost_race_checks(res)
    reply_tokens = res.reply.usage.output_tokens if res.reply and res.reply.usage else None
    produced = res.trace["produced"] if res.trace else None
    streams = res.streams
    term_ok = all(
        s.terminal is not None
        and s.terminal["type"] == "response.failed"
        and s.terminal["response"]["status"] == "cancelled"
        and s.terminal["response"]["error"] is None
        for s in streams
    )
    return {
        "no client error": res.error is None and all(s.error is None for s in streams),
        "cancel reply 200, status cancelled": res.cancel_error is None
        and res.reply is not None
        and res.reply.status == "cancelled",
        "every stream: response.failed / cancelled / error null": term_ok,
        "every stream: open item closed incomplete": all(
            s.closed_incomplete or not s.opened_item for s in streams
        ),
        "no event after the terminal one, then [DONE]": all(
            s.after_terminal == 0 and s.done_marker for s in streams
        ),
        "reply output_tokens == trace produced": reply_tokens is not None
        and reply_tokens == produced,
        "every stream's deltas == reply output_tokens": all(
            s.deltas == reply_tokens for s in streams
        ),
        "terminal event usage == reply usage": all(
            s.terminal is not None
            and s.terminal["response"]["usage"] is not None
            and s.terminal["response"]["usage"]["output_tokens"] == reply_tokens
            for s in streams
        ),
        "later retrieve output_tokens == reply": res.retrieved_output_tokens == reply_tokens,
        "0 tokens after the cancel reply": _after(res, res.cancel_reply_at) == 0,
    }


def lost_race_checks(res: Result) -> dict[str, bool]:
    """A response that ended before its cancel: 400, natural ends, nothing else to measure."""
    ok = {name: True for name in checks_names()}
    ok["no client error"] = res.error is None and all(s.error is None for s in res.streams)
    ok["no event after the terminal one, then [DONE]"] = all(
        s.after_terminal == 0 and s.done_marker for s in res.streams
    )
    return ok


def checks_names() -> list[str]:
    return [
        "no client error",
        "cancel reply 200, status cancelled",
        "every stream: response.failed / cancelled / error null",
        "every stream: open item closed incomplete",
        "no event after the terminal one, then [DONE]",
        "reply output_tokens == trace produced",
        "every stream's deltas == reply output_tokens",
        "terminal event usage == reply usage",
        "later retrieve output_tokens == reply",
        "0 tokens after the cancel reply",
    ]


def _after(res: Result, moment: float | None) -> int | None:
    if res.trace is None or moment is None:
        return None
    return sum(1 for t in res.trace["token_times"] if t > moment)


def _gap(later: float | None, earlier: float | None) -> list[float]:
    return [] if later is None or earlier is None else [later - earlier]


def _latest(times: list[float | None]) -> float | None:
    known = [t for t in times if t is not None]
    return max(known) if known and len(known) == len(times) else None


def _server_cpu(pid: int | None) -> float:
    return _server.cpu_seconds(pid) if pid is not None else float("nan")


def _ms(values: list[float]) -> list[object]:
    ms = [v * 1000 for v in values]
    return [
        len(ms),
        _server.percentile(ms, 50),
        _server.percentile(ms, 99),
        max(ms) if ms else float("nan"),
    ]


async def bench(
    url: str, args: argparse.Namespace, server_pid: int | None
) -> tuple[int, list[Chart]]:
    rng = random.Random(args.seed)
    results = [
        Result(i, rng.randint(args.min_deltas, args.max_deltas)) for i in range(args.responses)
    ]
    for res in results:  # drawn after the delta counts: a run without it keeps its draws
        if args.cancel_queued and rng.random() < args.cancel_queued:
            res.cancel_at_s = rng.uniform(0, args.cancel_within)
    model = MODELS[args.engine]
    pool = 4 * args.concurrency + 10
    limits = sdk_httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    by_id: dict[str, Result] = {}

    async def on_request(request: Any) -> None:
        parts = request.url.path.rsplit("/", 2)
        if parts[-1] == "cancel" and parts[-2] in by_id:
            by_id[parts[-2]].cancel_request_at = time.time()

    async def on_response(response: Any) -> None:
        parts = response.request.url.path.rsplit("/", 2)
        if parts[-1] == "cancel" and parts[-2] in by_id:
            by_id[parts[-2]].cancel_response_at = time.time()

    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="x",
        max_retries=0,
        timeout=60.0,
        http_client=openai.DefaultAsyncHttpxClient(
            limits=limits,
            timeout=60.0,
            event_hooks={"request": [on_request], "response": [on_response]},
        ),
    )
    slots = asyncio.Semaphore(args.concurrency)
    bar = progress(total=args.responses, desc="responses cancelled", unit="resp")

    async def limited(res: Result) -> None:
        async with slots:
            await one(client, debug, res, args.sdk_events, by_id, model)
        bar.update(1)

    async with httpx.AsyncClient(base_url=url, timeout=30.0) as debug, client:
        # Warm-up, not measured: the SDK imports modules and builds its pydantic models
        # lazily on first use, blocking the client's loop for up to ~2 s.
        await one(client, debug, Result(-1, 1), args.sdk_events, by_id, model)
        # With the SDK's thousands of model classes loaded, a full GC pauses the client
        # 100-300 ms; keep such client pauses out of the measured latencies.
        gc.collect()
        gc.freeze()
        gc.disable()
        started = time.perf_counter()
        cpu0, server_cpu0 = _server.cpu_seconds(), _server_cpu(server_pid)
        try:
            await asyncio.gather(*(limited(r) for r in results))
        finally:
            gc.enable()
            bar.close()
        wall = time.perf_counter() - started
        client_cpu = _server.cpu_seconds() - cpu0
        server_cpu = _server_cpu(server_pid) - server_cpu0

    measured = [r for r in results if not ended_first(r)]
    groups = [("", measured)]
    running = [r for r in measured if running_at_cancel(r)]
    if len(running) < len(measured):  # some were queued: rows per kind too
        queued = [r for r in measured if not running_at_cancel(r)]
        groups += [("running: ", running), ("queued: ", queued)]
    latency_rows: list[list[object]] = []
    token_rows: list[list[object]] = []
    for prefix, group in groups:
        latency_rows += latency(prefix, group)
        token_rows += tokens(prefix, group)
    print(_server.table(["latency (ms)", "n", "p50", "p99", "max"], latency_rows))
    print()
    print(_server.table(["per response", "n", "max", "total", "responses > 0"], token_rows))
    print()
    verdicts = [checks(r) for r in results]
    names = checks_names()
    rows = []
    failed = 0
    for name in names:
        bad = [r.index for r, v in zip(results, verdicts, strict=True) if not v[name]]
        failed += len(bad)
        rows.append(
            [
                name,
                len(results) - len(bad),
                len(bad),
                ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else ""),
            ]
        )
    print(_server.table(["check", "pass", "fail", "failing responses (index)"], rows))
    lost = [r.index for r in results if ended_first(r)]
    print(
        f"\nresponses cancelled: running at the cancel {len(running)}, queued "
        f"{len(measured) - len(running)}; ended by themselves before the cancel (a 400, "
        f"left out of the figures) {len(lost)}" + (f": {lost[:8]}" if lost else "")
    )
    for r in results:
        if ended_first(r):
            continue
        problems = [r.error, r.cancel_error, *(s.error for s in r.streams)]
        for p in filter(None, problems):
            print(f"  response {r.index} ({r.rid}): {p}")
            break
    if args.dump:
        with open(args.dump, "wb") as out:
            for r in results:
                out.write(
                    orjson.dumps(
                        {
                            "index": r.index,
                            "id": r.rid,
                            "cancel_after": r.cancel_after,
                            "cancel_at_s": r.cancel_at_s,
                            "cancel_sent": r.cancel_sent,
                            "cancel_request_at": r.cancel_request_at,
                            "cancel_reply_at": r.cancel_reply_at,
                            "output_tokens": r.reply.usage.output_tokens
                            if r.reply is not None and r.reply.usage
                            else None,
                            "terminal_at": [s.terminal_at for s in r.streams],
                            "deltas": [s.deltas for s in r.streams],
                            "trace": r.trace,
                        }
                    )
                    + b"\n"
                )
    print(
        f"\nwall time {wall:.1f} s for {len(results)} responses; CPU busy: client "
        f"{client_cpu / wall:.0%}, server {server_cpu / wall:.0%} of one core"
    )
    return 1 if failed else 0, charts(latency_rows, token_rows)


def charts(latency_rows: list[list[object]], token_rows: list[list[object]]) -> list[Chart]:
    """Latency p50 / p99 / max per measure, and the token counts, of all responses."""
    short = ["reply", "HTTP", "engine abort", "terminal", "slowest\nterminal", "terminal\n− reply"]
    lat = [r for r in latency_rows if not str(r[0]).startswith(("running", "queued"))]
    names = [s for s, r in zip(short, lat, strict=False) if r[1]]
    shown = [r for r in lat if r[1]]
    tok = [r for r in token_rows if not str(r[0]).startswith(("running", "queued"))]
    return [
        Chart(
            "cancel latency (ms)",
            "ms",
            names,
            {
                stat: [float(r[i]) for r in shown]  # type: ignore[arg-type]
                for i, stat in ((2, "p50"), (3, "p99"), (4, "max"))
            },
        ),
        Chart(
            "tokens after the cancel (goal: 0 after the reply)",
            "tokens (responses > 0: responses)",
            ["engine tokens\nafter reply", "engine tokens\ncall → reply", "deltas\nafter reply"],
            {
                "max": [_num(r[2]) for r in tok],
                "total": [_num(r[3]) for r in tok],
                "responses > 0": [_num(r[4]) for r in tok],
            },
        ),
    ]


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def latency(prefix: str, group: list[Result]) -> list[list[object]]:
    ok = [r for r in group if r.reply is not None]
    reply = [x for r in ok for x in _gap(r.cancel_reply_at, r.cancel_sent)]
    exchange = [x for r in ok for x in _gap(r.cancel_response_at, r.cancel_request_at)]
    stopped = [
        x
        for r in ok
        if r.trace and r.trace["aborted_at"]
        for x in _gap(r.trace["aborted_at"], r.cancel_request_at)
    ]
    term_all = [x for r in group for s in r.streams for x in _gap(s.terminal_at, r.cancel_sent)]
    term_slowest = [
        x for r in group for x in _gap(_latest([s.terminal_at for s in r.streams]), r.cancel_sent)
    ]
    term_vs_reply = [
        x for r in group for s in r.streams for x in _gap(s.terminal_at, r.cancel_reply_at)
    ]
    rows = [
        [f"{prefix}cancel call -> reply (SDK call, as the caller sees it)", *_ms(reply)],
        [f"{prefix}  of which HTTP request sent -> reply headers read", *_ms(exchange)],
        [f"{prefix}cancel request sent -> engine saw the abort (trace)", *_ms(stopped)],
        [f"{prefix}cancel call -> terminal event, every stream", *_ms(term_all)],
        [
            f"{prefix}cancel call -> terminal event, slowest stream of the response",
            *_ms(term_slowest),
        ],
        [f"{prefix}terminal event - reply received (every stream)", *_ms(term_vs_reply)],
    ]
    if prefix == "queued: ":  # the engine never ran them: no abort to see
        del rows[2]
    return rows


def tokens(prefix: str, group: list[Result]) -> list[list[object]]:
    after_reply = [n for r in group if (n := _after(r, r.cancel_reply_at)) is not None]
    after_call = [n for r in group if (n := _after(r, r.cancel_sent)) is not None]
    late_deltas = [s.deltas_after_reply for r in group for s in r.streams]

    def row(name: str, values: list[int]) -> list[object]:
        return [
            f"{prefix}{name}",
            len(values),
            max(values, default="-"),
            sum(values),
            sum(1 for n in values if n),
        ]

    return [
        row("engine tokens after the cancel reply (goal 0)", after_reply),
        row("engine tokens between the cancel call and its reply", after_call),
        row("deltas received after the cancel reply (all in log before it)", late_deltas),
    ]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--responses", type=int, default=200, help="responses in all (200)")
    p.add_argument("--concurrency", type=int, default=20, help="responses at a time (20)")
    p.add_argument("--rate", type=float, default=100.0, help="scripted tokens/s (100)")
    p.add_argument("--length", type=int, default=200, help="scripted tokens per response")
    p.add_argument("--min-deltas", type=int, default=1, help="cancel after >= this many deltas")
    p.add_argument("--max-deltas", type=int, default=150, help="... and <= this many (150)")
    p.add_argument(
        "--engine",
        choices=sorted(MODELS),
        default="scripted",
        help="scripted (default) or local: the embedded model, one at a time",
    )
    p.add_argument(
        "--cancel-queued",
        type=float,
        default=0.0,
        metavar="F",
        help="share of responses cancelled at a random time instead of after "
        "k deltas (0; for --engine local, where most responses queue)",
    )
    p.add_argument(
        "--cancel-within",
        type=float,
        default=20.0,
        metavar="S",
        help="... uniform in [0, S] seconds after the id is known (20)",
    )
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random)")
    p.add_argument(
        "--sdk-events",
        action="store_true",
        help="parse stream events with the SDK's typed models (costs the client "
        "~0.2 ms/event: at the default size the client, not tether, lags)",
    )
    p.add_argument(
        "--dump",
        metavar="FILE",
        help="write each response's times, reply "
        "usage and engine trace to FILE (JSON lines), to look into outliers",
    )
    p.add_argument(
        "--url",
        help="use a running tether (started with --debug-routes and "
        "the scripted engine) instead of starting one",
    )
    args = p.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    if args.engine == "scripted" and args.max_deltas >= args.length:
        p.error("--max-deltas must be below --length, or responses complete before the cancel")
    return args


def measure(args: argparse.Namespace) -> tuple[int, list[Chart]]:
    print("# tether cancel benchmark")
    print(
        _server.table(
            ["parameter", "value"],
            [
                ["responses", args.responses],
                ["concurrency", args.concurrency],
                ["streams per response", "2 (POST + 1 resume)"],
                *(
                    [["scripted rate (tokens/s)", args.rate], ["scripted length", args.length]]
                    if args.engine == "scripted"
                    else [["engine", "local: SmolLM2-135M via llama-cpp, one generation at a time"]]
                ),
                ["cancel after deltas", f"uniform [{args.min_deltas}, {args.max_deltas}]"],
                [
                    "cancelled at a random time instead",
                    f"share {args.cancel_queued:g}, uniform "
                    f"[0, {args.cancel_within:g}] s after the id"
                    if args.cancel_queued
                    else "none",
                ],
                ["seed", args.seed],
                ["client", f"openai {openai.__version__} AsyncOpenAI"],
                [
                    "stream parsing",
                    "SDK typed events"
                    if args.sdk_events
                    else "raw SSE + orjson (via with_streaming_response)",
                ],
                [
                    "server",
                    args.url or f"tether serve --engine {args.engine} (temp db, started here)",
                ],
                ["machine", _server.machine()],
            ],
        )
    )
    print()
    if args.url:
        return _server.run(bench(args.url.rstrip("/"), args, None))
    with _server.tether_server(rate=args.rate, length=args.length, engine=args.engine) as srv:
        return _server.run(bench(srv.url, args, srv.pid))


def main() -> int:
    args = parse()
    with Transcript() as printed:
        code, figures = measure(args)
    save("cancel" if args.engine == "scripted" else "cancel-local", printed.text, *figures)
    return code


if __name__ == "__main__":
    sys.exit(main())
