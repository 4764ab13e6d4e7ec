"""Prometheus metrics: every metric object, and the one-line hooks the rest of tether calls.

Metrics are per process: each `tether serve` replica and each `tether worker` exposes its
own on `GET /metrics` (scrape them all; sum across processes). Every name starts with
`tether_`, and they live in a registry of their own, so nothing else ends up on the page.

The hooks sit on hot paths (a run's token loop, every group commit, every stream), so
they are cheap by construction: label children are bound once here, never looked up per
call; tokens are counted once per response, when its terminal transition commits (the
exact count of its log), not per token; and what can be read off existing state (runs in
flight) is computed at scrape time instead of being tracked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Sized
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response

from tether.engines.base import Delta, ReasoningDelta, Step, ToolCallDelta

P = ParamSpec("P")
T = TypeVar("T")

# `*_created` timestamp series would double every counter and read like our own
# `tether_responses_created_total`; Prometheus does not need them.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry()
ProcessCollector(namespace="tether", registry=REGISTRY)  # tether_process_cpu_seconds_total...

ENDINGS = ("completed", "failed", "incomplete", "cancelled")
UPSTREAM_KINDS = ("chat", "responses")

RESPONSES_CREATED = Counter(
    "tether_responses_created",
    "Responses created (an idempotent replay is not counted).",
    registry=REGISTRY,
)
RESPONSES_FINISHED = Counter(
    "tether_responses_finished",
    "Responses that reached a terminal status, by status.",
    ["status"],
    registry=REGISTRY,
)
OUTPUT_TOKENS = Counter(
    "tether_output_tokens",
    "Output tokens in the event logs of responses that ended (their usage.output_tokens).",
    registry=REGISTRY,
)
REASONING_TOKENS = Counter(
    "tether_reasoning_tokens",
    "The part of tether_output_tokens that was the model's thinking (the responses' "
    "usage.output_tokens_details.reasoning_tokens).",
    registry=REGISTRY,
)
TOKENS_AFTER_CANCEL = Counter(
    "tether_tokens_after_cancel",
    "Output tokens an engine emitted after its run was cancelled (the step in flight).",
    registry=REGISTRY,
)
CANCEL_SECONDS = Histogram(
    "tether_cancel_seconds",
    "From a cancel request to the response being ended with its engine stopped.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
ACTIVE_RUNS = Gauge(
    "tether_active_runs",
    "Runs (engine generations) in progress in this process.",
    registry=REGISTRY,
)
ACTIVE_READERS = Gauge(
    "tether_active_readers",
    "Open readers of an event log (SSE streams and synchronous waits).",
    registry=REGISTRY,
)
APPEND_SECONDS = Histogram(
    "tether_event_log_append_seconds",
    "Time to commit one batch (group commit) of appended events to the event log.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
    registry=REGISTRY,
)
TASKS = Gauge(
    "tether_tasks",
    "asyncio tasks alive in this process (a leak shows as steady growth).",
    registry=REGISTRY,
)
LOG_CACHE_BYTES = Gauge(
    "tether_log_cache_bytes",
    "Bytes of event logs cached in memory for readers (bounded by --log-cache-bytes).",
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "tether_upstream_errors",
    "Failed upstream attempts (HTTP error, unreachable, timeout, broken or failed stream), "
    "retried ones included, by engine kind.",
    ["engine"],
    registry=REGISTRY,
)
WEBHOOK_ATTEMPTS = Counter(
    "tether_webhook_attempts",
    "Webhook delivery attempts by this process, by result: delivered, retried (failed, "
    "tried again later) or gave_up (failed past the retry window).",
    ["result"],
    registry=REGISTRY,
)
WEBHOOKS_PENDING = Gauge(
    "tether_webhooks_pending",
    "Webhook deliveries in the outbox neither delivered nor given up (every process's; "
    "counted every 2 s by this process's sender).",
    registry=REGISTRY,
)
WEBHOOK_RESULTS = ("delivered", "retried", "gave_up")

QUEUED_RUNS = Gauge(
    "tether_queued_runs",
    "Responses waiting in this process's run queue, by class (`soonest`, `deferred`: "
    "a `2h`/`8h` completion window). Scaled out the queue is in Redis: not counted here.",
    ["class"],
    registry=REGISTRY,
)
DEFERRED_STARTS = Counter(
    "tether_deferred_starts",
    "Runs of deferred responses (`2h`/`8h` completion window) started, by whether they "
    "started before their deadline (`on_time`) or after it (`late`).",
    ["start"],
    registry=REGISTRY,
)

# Label children bound once: a hook never looks a label up.
_finished = {status: RESPONSES_FINISHED.labels(status) for status in ENDINGS}
_upstream = {kind: UPSTREAM_ERRORS.labels(kind) for kind in UPSTREAM_KINDS}
_created_inc = RESPONSES_CREATED.inc
_tokens_inc = OUTPUT_TOKENS.inc
_reasoning_inc = REASONING_TOKENS.inc
_readers_inc = ACTIVE_READERS.inc
_readers_dec = ACTIVE_READERS.dec
_cancel_observe = CANCEL_SECONDS.observe
_append_observe = APPEND_SECONDS.observe
_webhook = {result: WEBHOOK_ATTEMPTS.labels(result) for result in WEBHOOK_RESULTS}


# --- hooks ---------------------------------------------------------------------------------


def created() -> None:
    """A response was created (`Lifecycle.create`)."""
    _created_inc()


def ended(status: str, usage: dict[str, Any]) -> None:
    """A terminal transition committed (the store's CAS was won): its status, and the
    final snapshot's usage (the output tokens its log holds, the reasoning part of them):
    the numbers the client and the usage ledger got."""
    _finished[status].inc()
    output_tokens = usage["output_tokens"]
    if output_tokens > 0:
        _tokens_inc(output_tokens)
        reasoning_tokens = usage["output_tokens_details"]["reasoning_tokens"]
        if reasoning_tokens > 0:
            _reasoning_inc(reasoning_tokens)


def after_stop(step: Step) -> None:
    """The engine emitted `step` although its run had been cancelled. Called only in that
    case (the caller checks the run's stop reason), so the token loop pays one check."""
    if type(step) is Delta or type(step) is ToolCallDelta or type(step) is ReasoningDelta:
        TOKENS_AFTER_CANCEL.inc(step.tokens)


def webhook_attempt(result: str) -> None:
    """A webhook delivery attempt was recorded (`webhook_sender`)."""
    _webhook[result].inc()


def webhooks_pending(count: int) -> None:
    WEBHOOKS_PENDING.set(count)


def upstream_error(kind: str) -> None:
    """An upstream attempt failed (`chat` or `responses` engine)."""
    _upstream[kind].inc()


def watch_runs(runs: Sized) -> None:
    """Active runs are the size of the lifecycle's run table, read at scrape time."""
    ACTIVE_RUNS.set_function(lambda: len(runs))


def watch_queue(waiting: Callable[[], dict[str, int]]) -> None:
    """The run queue's length by class, read at scrape time."""
    for kind in ("soonest", "deferred"):
        QUEUED_RUNS.labels(kind).set_function(functools.partial(_waiting, waiting, kind))


def _waiting(waiting: Callable[[], dict[str, int]], kind: str) -> int:
    return waiting()[kind]


def deferred_started(on_time: bool) -> None:
    """A deferred response's run started (`tether.worker`)."""
    DEFERRED_STARTS.labels("on_time" if on_time else "late").inc()


class _Sized(Protocol):
    size: int


def watch_log_cache(cache: _Sized) -> None:
    """The log cache's bytes, read at scrape time."""
    LOG_CACHE_BYTES.set_function(lambda: cache.size)


def _tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped outside the server's loop (a test): none of ours
        return 0


TASKS.set_function(_tasks)


class CancelTimer:
    """Times one cancel from its request to the response's end (`Lifecycle.cancel`).
    A cancel of a response that was already over is not observed: nothing was stopped."""

    __slots__ = ("_start",)

    def __init__(self, live: bool) -> None:
        self._start = time.perf_counter() if live else None

    def stop(self) -> None:
        if self._start is not None:
            _cancel_observe(time.perf_counter() - self._start)
            self._start = None


class _AppendTimer:
    """`with` (or `async with`) around one group commit of the event log."""

    __slots__ = ("_start",)

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _append_observe(time.perf_counter() - self._start)

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(kind, exc, tb)


def append_timer() -> _AppendTimer:
    """Times one batch commit: `with metrics.append_timer(), transaction:`."""
    return _AppendTimer()


def reader(follow: Callable[P, AsyncIterator[T]]) -> Callable[P, AsyncIterator[T]]:
    """Decorates `Lifecycle.follow`: counts its open iterations (every stream is one).
    The cost is one generator hop per batch of log entries, not per event."""

    @functools.wraps(follow)
    async def counted(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        _readers_inc()
        try:
            # Closed with us, not left to the garbage collector: the count stays exact.
            async with contextlib.aclosing(follow(*args, **kwargs)) as batches:  # type: ignore[type-var]
                async for batch in batches:
                    yield batch
        finally:
            _readers_dec()

    return counted


# --- the route -----------------------------------------------------------------------------


async def endpoint(request: Request) -> Response:
    """`GET /metrics`: this process's metrics, in the format the scraper asks for
    (Prometheus text by default, OpenMetrics on request)."""
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(REGISTRY), headers={"content-type": content_type})
