"""A streaming load client cheap enough to outrun the gateways it measures, and the
figures of a load phase (bench/upstream.py).

    conn = await Conn.open("127.0.0.1", port)
    got = await conn.stream(body)          # one streamed POST /v1/responses
    got.deltas, got.ttfd                   # delta events, seconds to the first one
    one, many = await load(...)            # 1 stream, then rounds of N: deltas/s, TTFD, CPU

Raw HTTP/1.1 over asyncio streams on a keep-alive connection: the request is written as
bytes, the response's delta events are counted in the raw bytes (`event:
response.output_text.delta` lines) and its end is the chunked body's last chunk. No HTTP
library and no SSE parsing: httpx costs tens of microseconds per network read, and at
50 streams the client (which shares a core with the upstream) would be the limit
before the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

import _server
from _report import progress

MARK = b"event: response.output_text.delta\n"
END = b"\r\n0\r\n\r\n"  # a chunked body's terminating chunk (sizes have no leading 0)


@dataclass(frozen=True)
class Stream:
    """One streamed response, times from `time.perf_counter()`."""

    started: float
    first: float  # the first delta event arrived
    done: float
    deltas: int

    @property
    def ttfd(self) -> float:
        return self.first - self.started


def request_bytes(host: str, port: int, body: bytes) -> bytes:
    return (
        f"POST /v1/responses HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Conn:
    """One keep-alive connection to a gateway; one stream at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        conn = cls(host, port)
        conn.reader, conn.writer = await asyncio.open_connection(host, port)
        return conn

    async def stream(self, body: bytes, started: float | None = None) -> Stream:
        """POST `body`, read the streamed answer to its end. `started` (default now) is
        when the request counts as sent: a round of streams shares one start."""
        assert self.reader is not None and self.writer is not None
        started = time.perf_counter() if started is None else started
        self.writer.write(request_bytes(self.host, self.port, body))
        first, deltas, tail, head = 0.0, 0, b"", True
        while True:
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                raise ConnectionError("the gateway closed the connection mid-stream")
            data = tail + chunk
            if head:
                if not data.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"gateway answered {data[:300]!r}")
                head = False
            found = data.count(MARK)
            if found:
                first = first or time.perf_counter()
                deltas += found
            if data.endswith(END):
                break
            # Too short to hold a whole mark, so no mark is counted twice.
            tail = data[-(len(MARK) - 1) :]
        return Stream(started, first, time.perf_counter(), deltas)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def singles(
    host: str, port: int, body: bytes, n: int, tick: Callable[[int], object]
) -> tuple[list[Stream], float]:
    """`n` streams one after another on one connection; (streams, wall seconds)."""
    conn = await Conn.open(host, port)
    try:
        got = []
        started = time.perf_counter()
        for _ in range(n):
            got.append(await conn.stream(body))
            tick(1)
        return got, time.perf_counter() - started
    finally:
        await conn.close()


async def rounds(
    host: str, port: int, body: bytes, streams: int, n: int, tick: Callable[[int], object]
) -> tuple[list[Stream], float]:
    """`n` rounds of `streams` streams that start together (one connection each, opened
    beforehand); a round ends with its last stream. (streams, wall seconds of the rounds)."""
    conns = [await Conn.open(host, port) for _ in range(streams)]
    try:
        got: list[Stream] = []
        wall = 0.0
        for _ in range(n):
            started = time.perf_counter()
            got += await asyncio.gather(*[c.stream(body, started) for c in conns])
            wall += time.perf_counter() - started
            tick(streams)
        return got, wall
    finally:
        for c in conns:
            await c.close()


@dataclass(frozen=True)
class Load:
    """One load phase against one gateway."""

    rate: float  # deltas/s over the phase
    p50: float  # time to first delta, ms
    p99: float
    cpu: float  # gateway CPU ms per 1,000 deltas
    core: float  # gateway CPU / wall: 1.0 is its core saturated
    busy: float  # the load side's CPU (this client + the upstream) / wall


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants (a gateway may fork workers)."""
    total = _server.cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            for child in task.read_text().split():
                total += tree_cpu(int(child))
    return total


async def measure(
    gateway_pid: int,
    upstream_pid: int,
    phase: Awaitable[tuple[list[Stream], float]],
    deltas_each: int,
) -> Load:
    """Run one load phase, with the CPU the gateway and the load side spent on it."""

    def side() -> float:
        return time.process_time() + _server.cpu_seconds(upstream_pid)

    gateway, load_side = tree_cpu(gateway_pid), side()
    got, wall = await phase
    gateway, load_side = tree_cpu(gateway_pid) - gateway, side() - load_side
    short = [s.deltas for s in got if s.deltas != deltas_each]
    assert not short, f"streams with {short[:5]} deltas, not {deltas_each}"
    deltas = sum(s.deltas for s in got)
    ttfd = [s.ttfd * 1e3 for s in got]
    return Load(
        rate=deltas / wall,
        p50=_server.percentile(ttfd, 50),
        p99=_server.percentile(ttfd, 99),
        cpu=gateway / deltas * 1e6,
        core=gateway / wall,
        busy=load_side / wall,
    )


async def load(
    name: str,
    port: int,
    pids: tuple[int, int],
    tokens: int,
    singles_n: int,
    streams: int,
    rounds_n: int,
) -> tuple[Load, Load]:
    """(1 stream, `streams` streams) of `tokens`-token responses of the model `fast`, after
    a warm-up; `pids` are the gateway's and the upstream's."""
    host = _server.HOST

    def body(n: int) -> bytes:
        return orjson.dumps({"model": "fast", "input": f"LENGTH={n}", "stream": True})

    await rounds(host, port, body(20), streams, 2, lambda _: None)
    with progress(total=singles_n, desc=f"{name}: 1 stream", unit="response") as bar:
        one = await measure(*pids, singles(host, port, body(tokens), singles_n, bar.update), tokens)
    total = rounds_n * streams
    with progress(total=total, desc=f"{name}: {streams} streams", unit="response") as bar:
        phase = rounds(host, port, body(tokens), streams, rounds_n, bar.update)
        many = await measure(*pids, phase, tokens)
    return one, many
