"""The ceiling for bench/upstream.py: a relay that only re-frames upstream chunks.

Run: `python bench/bare_upstream_relay.py --port 8003 --upstream MODEL=URL ...`.

`POST /v1/responses` with `stream: true` opens the model's upstream
`/chat/completions` stream (`tether.engines.http1`, the reader tether's chat engine uses)
and turns each content chunk into a `response.output_text.delta` event (tether.wire's
builders, orjson, one SSE frame per event), between the same opening and closing events
tether sends. Nothing is stored: no log, no sequence numbers from a store, no lifecycle,
no cancel endpoint. A client that disconnects closes the upstream stream (the generator
is cancelled, which leaves the pool's stream context: the connection is aborted).
`GET /health` answers 200.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator

import orjson
import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tether import wire, wire_output
from tether.engines import http1


class Relay:
    def __init__(self, upstreams: dict[str, str]) -> None:
        self.upstreams = upstreams
        self.pools: dict[str, http1.Http1Pool] = {}

    def pool(self, model: str) -> http1.Http1Pool:
        # Made on first use: a pool belongs to the event loop that serves.
        if model not in self.pools:
            self.pools[model] = http1.Http1Pool(
                self.upstreams[model],
                {"accept": "text/event-stream"},
                connect_timeout=10.0,
                read_timeout=300.0,
                keepalive=1000,
            )
        return self.pools[model]

    async def create(self, request: Request) -> Response:
        req = wire.parse_create(orjson.loads(await request.body()))
        # The same response class as tether's routes (its disconnect handling included).
        return EventSourceResponse(self.relay(req), ping=15, sep="\n")

    async def relay(self, req: wire.CreateRequest) -> AsyncIterator[bytes]:
        """Everything that one network read of the upstream brought is re-framed and sent
        in one write (tether's readers also send everything pending at once), so a fast
        upstream is not relayed one small write per token. The generator itself awaits
        the upstream read: a client that leaves cancels it, which closes the upstream."""
        seq = 0

        def frame(event: dict[str, object]) -> bytes:
            nonlocal seq
            event["sequence_number"] = seq
            seq += 1
            return wire.sse_frame(str(event["type"]), orjson.dumps(event))

        snap = wire.snapshot(
            wire.echo_fields(req),
            id=wire.new_id("resp"),
            created_at=int(time.time()),
            status="in_progress",
        )
        yield frame(wire.lifecycle_event("created", snap)) + frame(
            wire.lifecycle_event("in_progress", snap)
        )
        item = wire_output.MessageItem()
        opened = False
        text = req.input if isinstance(req.input, str) else ""
        body = {
            "model": req.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": text}],
        }
        buffer = b""
        pool = self.pool(req.model)
        async with pool.stream("POST", "chat/completions", orjson.dumps(body)) as resp:
            while data := await resp.read():
                *events, buffer = (buffer + data).split(b"\n\n")
                out = []
                for raw in events:
                    if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
                        continue
                    for choice in orjson.loads(raw[6:]).get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            if not opened:
                                out += [frame(e) for e in item.opened()]
                                opened = True
                            out.append(frame(item.delta(content)))
                if out:
                    yield b"".join(out)
        final = wire.snapshot(
            wire.echo_fields(req),
            id=snap["id"],
            created_at=snap["created_at"],
            status="completed",
            output=[item.item("completed")],
            usage=wire.usage(5, len(item.text)),
            completed_at=int(time.time()),
        )
        yield (
            b"".join(frame(e) for e in item.closed("completed"))
            + frame(wire.lifecycle_event("completed", final))
            + wire.DONE_FRAME
        )


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", action="append", default=[], help="MODEL=BASE_URL")
    args = parser.parse_args()
    relay = Relay(dict(u.split("=", 1) for u in args.upstream))
    app = Starlette(
        routes=[
            Route("/v1/responses", relay.create, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ]
    )
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
