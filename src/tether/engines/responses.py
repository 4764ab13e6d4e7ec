"""The `responses` engine: forwards to an upstream Responses API (OpenAI, Azure, another
tether) and relays its stream.

The whole conversation goes out as `input` items every time (never the upstream's
`previous_response_id`), so tether's own history, tenants and retention decide what a
response sees, and any Responses server works as the upstream. The upstream response
is streamed, and is a background one when tether's is, so it has an id to cancel and
to resume from: if a background upstream's stream breaks mid-run, the engine resumes it
(`GET /responses/{id}?stream=true&starting_after=N`) instead of failing.

A cancel lands in the read of the upstream stream, which closes it; then, in the
cancel's shielded cleanup, the engine calls `POST /responses/{upstream id}/cancel`
(bounded by `CANCEL_CALL_TIMEOUT`), emits what it learnt as a `Report`, and re-raises,
which lets the lifecycle end and fence tether's log. So tether's clients get the whole
contract even from an upstream that ignores cancels (the hosted API does for background
streams, openai-python#2643). Whether the upstream confirmed the stop goes into the
response's `usage.tether.upstream_stop` (`confirmed` / `unconfirmed`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import orjson

from tether import metrics
from tether.config import UpstreamConfig
from tether.engines.base import (
    Delta,
    Emit,
    EngineError,
    Finished,
    Generation,
    Message,
    ModelInfo,
    Outbox,
    PromptRead,
    ReasoningDelta,
    ReasoningSource,
    Report,
    Step,
    SummaryDelta,
    ToolCall,
    ToolCallDelta,
)
from tether.engines.upstream import (
    OPENED,
    Clients,
    UpstreamGone,
    backoff,
    estimate_tokens,
    is_retryable,
    logprob_objects,
    sse_events,
)

log = logging.getLogger("tether.engines.responses")
#: the longest a cancel waits for the upstream's cancel reply; tether's own cancel bound
#: (2 s by default) must leave room to end the response after it.
CANCEL_CALL_TIMEOUT = 1.0
_CODES = {"rate_limit_exceeded", "invalid_prompt", "server_error"}


def _code(code: object) -> str:
    """An upstream's error code, if it is one the Response error type allows."""
    return code if isinstance(code, str) and code in _CODES else "server_error"


def reasoning_items(m: Message) -> list[dict[str, Any]]:
    """An assistant turn's earlier thinking as the reasoning items it came from: the
    upstream's own (`id`, `encrypted_content`) when it made them, with the summary, and
    the thinking text as `content` when there is any."""
    items = []
    for thought in m.reasoning:
        item: dict[str, Any] = {
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": t} for t in thought.summary],
        }
        if thought.text:
            item["content"] = [{"type": "reasoning_text", "text": thought.text}]
        items.append(item | (thought.upstream or {}))
    return items


def input_items(messages: list[Message]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for m in messages:
        items += reasoning_items(m)
        if m.role == "tool":
            items.append({"type": "function_call_output", "call_id": m.call_id, "output": m.text})
            continue
        if m.parts is not None:  # images go through as they came
            items.append(
                {
                    "type": "message",
                    "role": m.role,
                    "content": [
                        {"type": "input_image", "image_url": p["url"], "detail": p["detail"]}
                        if p["type"] == "image"
                        else {"type": "input_text", "text": p["text"]}
                        for p in m.parts
                    ],
                }
            )
        elif m.text or not m.tool_calls:
            items.append({"type": "message", "role": m.role, "content": m.text})
        items += [
            {
                "type": "function_call",
                "call_id": c.call_id,
                "name": c.name,
                "arguments": c.arguments,
            }
            for c in m.tool_calls
        ]
    return items


def forward_fields(body: dict[str, Any], forward: dict[str, Any]) -> dict[str, Any]:
    """The forwarded request fields, passed through as the client gave them
    (docs/fields.md); `verbosity` goes back into `text`."""
    for name, value in forward.items():
        if name == "verbosity":
            body["text"] = {**body.get("text", {}), "verbosity": value}
        elif name != "parallel_tool_calls" or "tools" in body:
            body[name] = value
    return body


@dataclass(slots=True)
class _Run:
    """One generation's state across stream (re)connections."""

    upstream_id: str | None = None
    last_seq: int = -1
    deltas: int = 0
    prompt_read: bool = False
    ended: bool = False
    #: summary parts of the upstream's earlier reasoning items (tether shows one item,
    #: so a later upstream item's parts are numbered after them), and of the current one
    summary_base: int = 0
    summary_parts: int = 0


class ResponsesEngine:
    """One model id served by one Responses API upstream."""

    def __init__(self, spec: UpstreamConfig) -> None:
        self.spec = spec
        self.concurrency = spec.concurrency
        self._clients = Clients(spec)

    def models(self) -> list[ModelInfo]:
        # Upstreams apply function tools and `text.format` themselves.
        return [ModelInfo(id=self.spec.model, owned_by="upstream")]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._clients.aclose()

    def body(self, request: Generation) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.spec.upstream_model or self.spec.model,
            "input": input_items(request.messages),
            "stream": True,
            # A background upstream response can be cancelled by id and resumed; the
            # hosted API requires `store` for it.
            "background": request.background,
            "store": request.background,
        }
        # Sent only when not the API default (1.0 for both): the hosted reasoning
        # models refuse them outright.
        if request.temperature != 1.0:
            body["temperature"] = request.temperature
        if request.top_p != 1.0:
            body["top_p"] = request.top_p
        if request.max_output_tokens is not None:
            body["max_output_tokens"] = request.max_output_tokens
        if request.tools:
            body["tools"] = request.tools
            body["tool_choice"] = request.tool_choice or "auto"
        if request.text_format is not None:
            body["text"] = {"format": request.text_format}
        return forward_fields(body, request.forward)

    async def generate(self, request: Generation, emit: Emit) -> None:
        body = self.body(request)
        run = _Run()
        out = Outbox(emit)
        try:
            await self._stream(request, body, run, out)
        except anyio.get_cancelled_exc_class():
            # The stream is closed; what was relayed but not emitted still is, then the
            # upstream is asked to stop too (unless it had ended already).
            with anyio.CancelScope(shield=True):
                await out.flush()
                if run.prompt_read and not run.ended:
                    await out.flush(await self._cancel_upstream(run))
            raise

    async def _stream(
        self, request: Generation, body: dict[str, Any], run: _Run, out: Outbox
    ) -> None:
        """Relay the upstream response to its end: a failure before the first token is
        retried, and a broken stream of a background upstream response is resumed."""
        attempt = 0
        while not run.ended:
            if run.upstream_id is None:
                source = sse_events(self._clients.streams, "POST", "responses", body)
            else:  # resume the background upstream response where its stream broke
                source = sse_events(
                    self._clients.streams,
                    "GET",
                    f"responses/{run.upstream_id}?stream=true&starting_after={run.last_seq}",
                    None,
                )
            try:
                await self._relay(source, run, body, out)
                if not run.ended:
                    raise UpstreamGone(
                        "Upstream closed the stream before it finished.", retryable=True
                    )
            except EngineError as exc:
                metrics.upstream_error("responses")
                # A broken stream of a background upstream response is resumed where it
                # broke; anything else is retried only before the first token.
                resumable = (
                    request.background
                    and run.upstream_id is not None
                    and isinstance(exc, UpstreamGone)
                )
                if attempt >= self.spec.retries or not (
                    resumable or (is_retryable(exc) and not run.deltas)
                ):
                    raise
                attempt += 1
                log.info("upstream %s: %s; retry %d", self.spec.url, exc, attempt)
                await backoff(attempt, exc)

    async def _relay(
        self,
        source: AsyncGenerator[tuple[str, str], None],
        run: _Run,
        body: dict[str, Any],
        out: Outbox,
    ) -> None:
        async with contextlib.aclosing(source):  # closed (the connection too) on any exit
            async for event, data in source:
                if (event, data) == OPENED or data == "[DONE]":
                    continue
                try:
                    ev = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamGone(
                        f"Upstream sent invalid JSON: {data[:200]!r}", retryable=False
                    ) from None
                seq = ev.get("sequence_number")
                if isinstance(seq, int):
                    if seq <= run.last_seq:
                        continue  # already relayed before a resume
                    run.last_seq = seq
                await out.send(*self._steps(ev, run, body))

    def _steps(self, ev: dict[str, Any], run: _Run, body: dict[str, Any]) -> list[Step]:
        kind = ev.get("type")
        steps: list[Step] = []
        if kind in ("response.created", "response.queued", "response.in_progress"):
            run.upstream_id = run.upstream_id or ev["response"]["id"]
            if not run.prompt_read:
                run.prompt_read = True
                text = orjson.dumps(body["input"]).decode()
                steps.append(PromptRead(estimate_tokens(text)))
        elif kind == "response.output_text.delta":
            run.deltas += 1
            steps.append(Delta(ev.get("delta", ""), 1, logprob_objects(ev.get("logprobs"))))
        elif kind == "response.reasoning_text.delta":
            # The upstream's reasoning items become tether's one reasoning item.
            run.deltas += 1
            steps.append(ReasoningDelta(ev.get("delta", ""), 1))
        elif kind == "response.reasoning_summary_text.delta":
            run.deltas += 1
            index = ev.get("summary_index")
            index = index if isinstance(index, int) and index >= 0 else 0
            run.summary_parts = max(run.summary_parts, index + 1)
            steps.append(SummaryDelta(ev.get("delta", ""), run.summary_base + index, 1))
        elif kind == "response.output_item.done" and ev["item"].get("type") == "reasoning":
            item = ev["item"]
            run.summary_base, run.summary_parts = run.summary_base + run.summary_parts, 0
            # Its id only with its encrypted content: an id alone names an item the
            # upstream may not keep (`store: false`), which it would refuse later.
            if isinstance(item.get("encrypted_content"), str) and isinstance(item.get("id"), str):
                fields = {"id": item["id"], "encrypted_content": item["encrypted_content"]}
                steps.append(ReasoningSource(fields))
        elif kind == "response.output_item.added" and ev["item"].get("type") == "function_call":
            item = ev["item"]
            steps.append(ToolCall(ev["output_index"], item["call_id"], item["name"]))
        elif kind == "response.function_call_arguments.delta":
            run.deltas += 1
            steps.append(ToolCallDelta(ev["output_index"], ev.get("delta", "")))
        elif kind in ("response.completed", "response.incomplete"):
            run.ended = True
            steps.append(self._usage_report(ev["response"], run))
            steps.append(Finished("stop" if kind == "response.completed" else "length"))
        elif kind == "response.failed":
            run.ended = True
            response = ev["response"]
            if response.get("status") == "cancelled":
                raise EngineError("The upstream response was cancelled upstream.")
            err = response.get("error") or {}
            raise EngineError(
                f"Upstream response failed: {err.get('message', 'no reason')}",
                _code(err.get("code")),
            )
        elif kind == "error":
            nested = ev["error"] if isinstance(ev.get("error"), dict) else {}
            message = ev.get("message") or nested.get("message") or "unknown error"
            raise EngineError(
                f"Upstream error: {message}", _code(ev.get("code") or nested.get("code"))
            )
        return steps

    def _usage_report(self, response: dict[str, Any], run: _Run) -> Report:
        usage = response.get("usage") or {}
        notes = {"upstream_response_id": run.upstream_id}
        if isinstance(usage.get("output_tokens"), int):
            reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens")
            return Report(
                usage.get("input_tokens"),
                usage["output_tokens"],
                notes | {"input_tokens": "upstream", "output_tokens": "upstream"},
                reasoning if isinstance(reasoning, int) else None,
            )
        return Report(None, None, notes | {"input_tokens": "estimate", "output_tokens": "chunks"})

    async def _cancel_upstream(self, run: _Run) -> Report:
        """Ask the upstream to stop (the stream is already closed). The usage stays what
        was relayed, so tether's text and counts agree; the upstream's own count, which
        may include tokens generated but never relayed, is kept in the notes."""
        notes: dict[str, Any] = {
            "upstream_response_id": run.upstream_id,
            "upstream_stop": "unconfirmed",
            "input_tokens": "estimate",
            "output_tokens": "chunks",
        }
        if run.upstream_id is None:
            return Report(notes=notes)  # cancelled before the upstream named it
        resp: httpx.Response | None = None
        try:
            with anyio.move_on_after(CANCEL_CALL_TIMEOUT):
                resp = await self._clients().post(f"responses/{run.upstream_id}/cancel")
        except httpx.HTTPError as exc:
            log.warning("upstream cancel of %s failed: %s", run.upstream_id, exc)
            return Report(notes=notes)
        if resp is None:
            log.warning(
                "upstream cancel of %s timed out after %.1f s", run.upstream_id, CANCEL_CALL_TIMEOUT
            )
            return Report(notes=notes)
        reply: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            reply = resp.json()
        if resp.status_code == 200 and reply.get("status") == "cancelled":
            notes["upstream_stop"] = "confirmed"
            usage = reply.get("usage") or {}
            if isinstance(usage.get("output_tokens"), int):
                notes["upstream_output_tokens"] = usage["output_tokens"]
            if isinstance(usage.get("input_tokens"), int):
                notes["input_tokens"] = "upstream"
                return Report(usage["input_tokens"], None, notes)
        else:
            log.warning(
                "upstream did not confirm the cancel of %s: HTTP %d %s",
                run.upstream_id,
                resp.status_code,
                reply.get("status"),
            )
        return Report(notes=notes)
