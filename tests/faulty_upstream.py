"""A fault-injecting Responses server for the client tests (stdlib only, loopback only).

It streams a response like tether does, one delta every `interval` seconds, and misbehaves
on cancel according to the response's `model`:

- `ignore-cancel`: answers the cancel with `status: "cancelled"` but keeps generating and
  streaming (the hosted API's bug); a retrieve says `in_progress`, later `completed`.
- `no-terminal`: stops generating on cancel but never sends a terminal event; the stream
  stays open (keepalive comments only) and a retrieve says `in_progress` forever.
- `no-terminal-stopped`: the same, but a retrieve says `cancelled` (with usage).
- `refuse-sync`: refuses (400) to cancel a non-background response by id, and keeps
  generating when the client closes the connection.
- `refuse-sync-stops`: refuses the same way, but a closed connection stops the response
  (`cancelled`), as the hosted API does.
- `refuse-sync-unstored`: as `refuse-sync-stops`, but the response cannot be retrieved (404,
  like `store: false`), so the client cannot learn how it ended.

Each response records when a client closed its stream (`stream_closed`).
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = (
    "ignore-cancel",
    "no-terminal",
    "no-terminal-stopped",
    "refuse-sync",
    "refuse-sync-stops",
    "refuse-sync-unstored",
)


def _usage(output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": 1,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 1 + output_tokens,
    }


@dataclass
class FakeResponse:
    id: str
    mode: str
    background: bool
    length: int
    status: str = "in_progress"
    text: str = ""
    produced: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    stop: threading.Event = field(default_factory=threading.Event)
    stream_closed: threading.Event = field(default_factory=threading.Event)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    item_id: str = field(default_factory=lambda: f"msg_{secrets.token_hex(8)}")

    def snapshot(self, status: str | None = None, done: bool = False) -> dict[str, Any]:
        status = status or self.status
        output = []
        if self.produced or done:
            output = [
                {
                    "id": self.item_id,
                    "type": "message",
                    "role": "assistant",
                    "status": "completed" if done else "in_progress",
                    "content": [
                        {
                            "type": "output_text",
                            "text": self.text,
                            "annotations": [],
                            "logprobs": [],
                        }
                    ],
                }
            ]
        return {
            "id": self.id,
            "object": "response",
            "model": self.mode,
            "instructions": None,
            "previous_response_id": None,
            "tools": [],
            "tool_choice": "auto",
            "truncation": "disabled",
            "parallel_tool_calls": True,
            "text": {"format": {"type": "text"}},
            "top_p": 1.0,
            "temperature": 1.0,
            "max_output_tokens": None,
            "store": True,
            "background": self.background,
            "metadata": {},
            "created_at": 1_700_000_000,
            "status": status,
            "completed_at": None,
            "output": output,
            "usage": None if status in ("queued", "in_progress") else _usage(self.produced),
            "error": None,
            "incomplete_details": None,
        }

    def append(self, *events: dict[str, Any]) -> None:
        with self.cond:
            for event in events:
                event["sequence_number"] = len(self.log)
                self.log.append(event)
            self.cond.notify_all()

    def ended(self) -> bool:
        return bool(self.log) and self.log[-1]["type"] in ("response.completed", "response.failed")


class FaultyUpstream:
    """`with FaultyUpstream() as up: OpenAI(base_url=up.base_url)`."""

    def __init__(self, interval: float = 0.02, length: int = 1000) -> None:
        self.interval = interval
        self.length = length
        self.responses: dict[str, FakeResponse] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FaultyUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for response in self.responses.values():
            response.stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def create(self, body: dict[str, Any]) -> FakeResponse:
        mode = body.get("model", "")
        if mode not in MODES:
            raise ValueError(mode)
        response = FakeResponse(
            id=f"resp_{secrets.token_hex(12)}",
            mode=mode,
            background=bool(body.get("background")),
            length=self.length,
        )
        self.responses[response.id] = response
        first = "queued" if response.background else "in_progress"
        response.append({"type": "response.created", "response": response.snapshot(first)})
        if response.background:
            response.append({"type": "response.queued", "response": response.snapshot(first)})
        threading.Thread(target=self._generate, args=(response,), daemon=True).start()
        return response

    def _generate(self, r: FakeResponse) -> None:
        r.append(
            {"type": "response.in_progress", "response": r.snapshot()},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {
                    "id": r.item_id,
                    "type": "message",
                    "role": "assistant",
                    "status": "in_progress",
                    "content": [],
                },
            },
            {
                "type": "response.content_part.added",
                "item_id": r.item_id,
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            },
        )
        while r.produced < r.length:
            if r.stop.wait(self.interval):
                return
            word = (" " if r.produced else "") + f"w{r.produced}"
            r.text += word
            r.produced += 1
            r.append(
                {
                    "type": "response.output_text.delta",
                    "item_id": r.item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": word,
                    "logprobs": [],
                }
            )
        r.status = "completed"
        part = {"type": "output_text", "text": r.text, "annotations": [], "logprobs": []}
        r.append(
            {
                "type": "response.output_text.done",
                "item_id": r.item_id,
                "output_index": 0,
                "content_index": 0,
                "text": r.text,
                "logprobs": [],
            },
            {
                "type": "response.content_part.done",
                "item_id": r.item_id,
                "output_index": 0,
                "content_index": 0,
                "part": part,
            },
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": r.snapshot(done=True)["output"][0],
            },
            {"type": "response.completed", "response": r.snapshot(done=True)},
        )

    def cancel(self, r: FakeResponse) -> tuple[int, dict[str, Any]]:
        r.cancel_requested.set()
        if r.mode.startswith("refuse-sync") and not r.background:
            return 400, {
                "error": {
                    "message": "Only responses created with background=true can be cancelled.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        if r.mode == "no-terminal":
            r.stop.set()  # stops, but the status never leaves in_progress
        elif r.mode == "no-terminal-stopped":
            r.stop.set()
            r.status = "cancelled"
        return 200, r.snapshot("cancelled")  # ignore-cancel: says so, keeps going

    def disconnected(self, r: FakeResponse) -> None:
        r.stream_closed.set()
        if r.mode in ("refuse-sync-stops", "refuse-sync-unstored") and not r.ended():
            r.stop.set()
            r.status = "cancelled"


def _handler(up: FaultyUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-should-retry", "false")
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            parts = self.path.rstrip("/").split("/")
            if self.path == "/v1/responses" and body.get("stream"):
                self._stream(up.create(body))
            elif len(parts) == 5 and parts[4] == "cancel" and parts[3] in up.responses:
                self._json(*up.cancel(up.responses[parts[3]]))
            else:
                self._json(
                    404,
                    {
                        "error": {
                            "message": "Not found.",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": None,
                        }
                    },
                )

        def do_GET(self) -> None:
            rid = self.path.split("?")[0].rstrip("/").split("/")[-1]
            r = up.responses.get(rid)
            if r is None or "stream=true" in self.path or r.mode == "refuse-sync-unstored":
                self._json(
                    404,
                    {
                        "error": {
                            "message": "Not found.",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": None,
                        }
                    },
                )
                return
            self._json(200, r.snapshot(done=r.status == "completed"))

        def _stream(self, r: FakeResponse) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            sent = 0
            try:
                while True:
                    with r.cond:
                        r.cond.wait_for(lambda n=sent: len(r.log) > n, timeout=0.05)
                        batch = r.log[sent:]
                    sent += len(batch)
                    frames = (
                        "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in batch)
                        or ": keepalive\n\n"
                    )
                    self.wfile.write(frames.encode())
                    self.wfile.flush()
                    if batch and batch[-1]["type"] == "response.completed":
                        self.wfile.write(b"data: [DONE]\n\n")
                        return
            except OSError:
                up.disconnected(r)

    return Handler
