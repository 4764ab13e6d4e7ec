"""A naive Responses relay for bench/upstream.py: what a plain gateway would write first.

Run: `python bench/naive_relay.py --port 8004 --upstream MODEL=URL ...`.

Starlette + httpx on uvicorn's pure-Python stack (`--http h11 --loop asyncio`: no uvloop,
no httptools), like the "naive bare relay" of issue 20's table. `POST /v1/responses` with
`stream: true` calls the model's upstream `/chat/completions` with `stream: true` and,
line by line (`httpx.Response.aiter_lines`, stdlib `json`), re-frames each content chunk
as one `response.output_text.delta` SSE event, one write each, between a
`response.created` and a `response.completed` event. Nothing is stored, there is no
lifecycle and no cancel endpoint; a client that leaves ends the stream at its next write
(Starlette), which closes the upstream stream. `GET /health` answers 200.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


class NaiveRelay:
    def __init__(self, upstreams: dict[str, str]) -> None:
        self.upstreams = upstreams
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=300.0), limits=httpx.Limits(max_connections=None)
        )

    async def create(self, request: Request) -> Response:
        body = await request.json()
        return StreamingResponse(self.relay(body), media_type="text/event-stream")

    async def relay(self, body: dict[str, Any]) -> AsyncIterator[str]:
        rid, item = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        response = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "model": body["model"],
            "output": [],
        }
        seq = 0
        yield sse({"type": "response.created", "sequence_number": seq, "response": response})
        text = body["input"] if isinstance(body["input"], str) else ""
        chat = {
            "model": body["model"],
            "stream": True,
            "messages": [{"role": "user", "content": text}],
        }
        url = self.upstreams[body["model"]] + "/chat/completions"
        parts: list[str] = []
        async with self.client.stream("POST", url, json=chat) as upstream:
            async for line in upstream.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        seq += 1
                        parts.append(content)
                        yield sse(
                            {
                                "type": "response.output_text.delta",
                                "sequence_number": seq,
                                "item_id": item,
                                "output_index": 0,
                                "content_index": 0,
                                "delta": content,
                            }
                        )
        text_out = "".join(parts)
        message = {
            "type": "message",
            "id": item,
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text_out, "annotations": []}],
        }
        response.update(status="completed", output=[message])
        yield sse({"type": "response.completed", "sequence_number": seq + 1, "response": response})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", action="append", default=[], help="MODEL=BASE_URL")
    args = parser.parse_args()
    relay = NaiveRelay(dict(u.split("=", 1) for u in args.upstream))
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
        loop="asyncio",
        http="h11",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
