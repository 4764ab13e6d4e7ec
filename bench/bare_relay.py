"""A baseline for bench/relay.py: the same scripted events, relayed as SSE, stored nowhere.

Run: `python bench/bare_relay.py --port 8001 --length 2000` (relay.py starts it itself).
A tiny Starlette app on uvicorn (uvloop + httptools, like tether) with just enough of the
Responses API for the relay benchmark's client:

- `POST /v1/responses` with `stream`/`background`: starts a producer that builds the same
  event dicts tether's scripted engine run would (tether.wire's builders, orjson, one SSE
  frame per event) at full speed, yielding to the loop every 64 tokens as the scripted
  engine does; with `stream: true` the reply is a reader from event 0, else the JSON snapshot;
- `GET /v1/responses/{id}?stream=true[&starting_after=N]`: a reader from N + 1;
- `GET /health`.

The fan-out is in memory: the producer appends each frame's bytes to a list and wakes the
readers; each reader keeps its own index and writes everything new in one chunk. Nothing
is persisted, no sequence number is assigned by a store, no keepalive task runs: this is
the cost of relaying alone, the floor tether's relay is compared against.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tether import wire, wire_output
from tether.engines.scripted import WORDS


class Log:
    """One response's events as SSE frames, appended by the producer, read by index."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.frames: list[bytes] = []
        self.done = False
        self._wake = asyncio.Event()

    def append(self, event: dict[str, Any]) -> None:
        event["sequence_number"] = len(self.frames)
        self.frames.append(wire.sse_frame(event["type"], orjson.dumps(event)))
        self._wake.set()

    def close(self) -> None:
        self.done = True
        self._wake.set()

    def publish(self) -> None:
        """Wake the readers waiting now; later waiters get a fresh event."""
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def read(self, after: int) -> AsyncIterator[bytes]:
        index = after + 1
        while True:
            end = len(self.frames)
            if index < end:
                yield b"".join(self.frames[index:end])
                index = end
                continue
            if self.done:
                yield wire.DONE_FRAME
                return
            await self._wake.wait()


class Relay:
    def __init__(self, length: int) -> None:
        self.length = length
        self.logs: dict[str, Log] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def produce(
        self, log: Log, echo: dict[str, Any], created_at: int, background: bool
    ) -> None:
        rid = log.snapshot["id"]
        snap = {**log.snapshot, "status": "in_progress"}
        log.snapshot = snap
        log.append(wire.lifecycle_event("in_progress", snap))
        item = wire_output.MessageItem()
        for event in item.opened():
            log.append(event)
        for i in range(self.length):
            log.append(item.delta((" " if i else "") + WORDS[i % len(WORDS)]))
            if i % 64 == 63:
                log.publish()
                await asyncio.sleep(0)  # as the scripted engine does at full speed
        for event in item.closed("completed"):
            log.append(event)
        final = wire.snapshot(
            echo,
            id=rid,
            created_at=created_at,
            status="completed",
            output=[item.item("completed")],
            usage=wire.usage(1, self.length),
            completed_at=int(time.time()),
        )
        log.snapshot = final
        log.append(wire.lifecycle_event("completed", final))
        log.close()
        log.publish()

    def start(self, req: wire.CreateRequest) -> Log:
        background = bool(req.background)
        rid = wire.new_id("resp")
        echo = wire.echo_fields(req)
        created_at = int(time.time())
        snap = wire.snapshot(
            echo, id=rid, created_at=created_at, status="queued" if background else "in_progress"
        )
        log = self.logs[rid] = Log(snap)
        log.append(wire.lifecycle_event("created", snap))
        if background:
            log.append(wire.lifecycle_event("queued", snap))
        task = asyncio.create_task(self.produce(log, echo, created_at, background))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return log


def _sse(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def create_app(length: int) -> Starlette:
    relay = Relay(length)

    async def create(request: Request) -> Response:
        req = wire.parse_create(orjson.loads(await request.body()))
        log = relay.start(req)
        if req.stream:
            return _sse(log.read(-1))
        return _json(log.snapshot)

    async def get(request: Request) -> Response:
        log = relay.logs.get(request.path_params["response_id"])
        if log is None:
            return _json(
                {
                    "error": {
                        "message": "not found",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                404,
            )
        if request.query_params.get("stream", "false").lower() != "true":
            return _json(log.snapshot)
        after = int(request.query_params.get("starting_after", "-1"))
        return _sse(log.read(after))

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/responses", create, methods=["POST"]),
            Route("/v1/responses/{response_id}", get, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--length", type=int, default=2000, help="scripted tokens per response")
    args = p.parse_args()
    uvicorn.run(
        create_app(args.length),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
    )


if __name__ == "__main__":
    main()
