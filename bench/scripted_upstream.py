"""A scripted OpenAI-compatible chat-completions upstream for bench/upstream.py.

Run: `python bench/scripted_upstream.py --port 8002 --rate 50` (upstream.py starts it).

`POST /v1/chat/completions` (stream only) streams `LENGTH=n` words (from the last user
message; default 200) at `--rate` tokens/s (0 = as fast as it can, `--batch` chunks a
write: 32 by default; bench/upstream.py uses 1, a write per token as a server streaming
its tokens does), then a usage chunk and `data: [DONE]`. Every chunk's bytes are built
once, so the upstream stays far from the limit of its core. Tokens are generated only as
they are sent, like a real server streaming one generation: once the client disconnects,
generation stops.

A request whose last user message holds `RUN=<id>` is recorded: when it started, the
time of every token, and when the client disconnected (`GET /records/<id>`).
`GET /health` answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog")
BATCH = 32


@functools.cache
def token_frames(model: str) -> tuple[bytes, ...]:
    """Every chunk this upstream can send for `model`, built once: the first token's
    frame for each word, then each word after a space. Building a frame per token (orjson
    and concatenations) made this upstream a visible share of the load core's CPU, and it
    must outrun every gateway it feeds."""
    head = (
        b'data: {"id":"chatcmpl-b","object":"chat.completion.chunk","model":'
        + orjson.dumps(model)
        + b',"choices":[{"index":0,"delta":{"content":'
    )
    tail = b'},"finish_reason":null}]}\n\n'
    words = [*WORDS, *(" " + w for w in WORDS)]
    return tuple(head + orjson.dumps(w) + tail for w in words)


@functools.cache
def ending(length: int) -> bytes:
    """The stop chunk, the usage chunk and `[DONE]` of a `length`-token answer."""
    stop = {
        "id": "chatcmpl-b",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }
    usage = {"prompt_tokens": 5, "completion_tokens": length, "total_tokens": 5 + length}
    return (
        b"data: "
        + orjson.dumps(stop)
        + b"\n\ndata: "
        + orjson.dumps({"id": "chatcmpl-b", "choices": [], "usage": usage})
        + b"\n\ndata: [DONE]\n\n"
    )


class Upstream:
    def __init__(self, rate: float, batch: int) -> None:
        self.rate = rate
        self.batch = batch
        self.records: dict[str, dict[str, Any]] = {}

    async def chat(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        text = str(body["messages"][-1].get("content", ""))
        length = int(m.group(1)) if (m := re.search(r"LENGTH=(\d+)", text)) else 200
        run = m.group(1) if (m := re.search(r"RUN=(\w+)", text)) else None
        record: dict[str, Any] = {
            "started": time.time(),
            "tokens": [],
            "disconnected": None,
            "finished": False,
        }
        if run is not None:
            self.records[run] = record
        return StreamingResponse(
            self.stream(body.get("model", ""), length, record), media_type="text/event-stream"
        )

    async def stream(self, model: str, length: int, record: dict[str, Any]) -> AsyncIterator[bytes]:
        frames = token_frames(model)
        tokens = record["tokens"]
        try:
            batch: list[bytes] = []
            for i in range(length):
                if self.rate:
                    await asyncio.sleep(1 / self.rate)
                tokens.append(time.time())
                batch.append(frames[i % len(WORDS) + (len(WORDS) if i else 0)])
                if self.rate or len(batch) == self.batch:
                    yield b"".join(batch)
                    batch = []
            yield b"".join(batch) + ending(length)
            record["finished"] = True
        finally:
            if not record["finished"]:
                record["disconnected"] = time.time()

    async def get_record(self, request: Request) -> Response:
        return JSONResponse(self.records.get(request.path_params["run"]))


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument(
        "--batch", type=int, default=BATCH, help="chunks a write at full speed (--rate 0)"
    )
    args = parser.parse_args()
    upstream = Upstream(args.rate, args.batch)
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", upstream.chat, methods=["POST"]),
            Route("/records/{run}", upstream.get_record, methods=["GET"]),
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
