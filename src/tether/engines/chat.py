"""The `chat` engine: a Responses request run on any OpenAI-compatible
`/v1/chat/completions` server (vLLM, llama.cpp, Ollama, SGLang, a provider).

The request goes out with `stream: true` and `stream_options.include_usage`; each
content chunk becomes a `Delta`, each tool-call chunk a `ToolCall`/`ToolCallDelta`, each
thinking chunk (`reasoning_content`: vLLM, llama.cpp; `reasoning` or `thinking`: Ollama
and others; `<think>…</think>` inside `content` with the upstream's `think_tags`) a
`ReasoningDelta`. The conversation's earlier thinking (reasoning items) goes back on its
assistant message, in the field the upstream's `reasoning_field` names.
A cancel closes the upstream connection at once (see `upstream`): that is the only
stop signal chat-completions servers understand.

Usage (recorded with its source in the response's `usage.tether`, see README):
- output: one token per streamed chunk (thinking included) while streaming; replaced by
  the upstream's reported usage when it arrives (the last chunk, with `include_usage`), else — on a
  cancel (a `Report` emitted in the cancel's shielded cleanup), or from a server that
  does not report usage — recounted from the received text with the model's tokenizer
  when one is configured (`tokenizer=FILE.gguf`);
- input: the upstream's report; before it (and when it never comes), the prompt
  rendered with the GGUF's chat template and counted with its tokenizer, else an
  estimate of 4 characters a token.
- reasoning: the thinking chunks, or the upstream's `completion_tokens_details
  .reasoning_tokens`, or the tokenizer's count of the thinking text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio
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
    Report,
    Step,
    ToolCall,
    ToolCallDelta,
)
from tether.engines.think import Splitter
from tether.engines.upstream import (
    Clients,
    UpstreamGone,
    backoff,
    estimate_tokens,
    is_retryable,
    logprob_objects,
    sse_batches,
)

log = logging.getLogger("tether.engines.chat")


class Tokenizer:
    """A GGUF model's tokenizer and chat template (llama-cpp, vocabulary only)."""

    def __init__(self, path: str) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter

        self._llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        template = self._llm.metadata.get("tokenizer.chat_template", CHATML_CHAT_TEMPLATE)
        eos = self._llm.detokenize([self._llm.token_eos()], special=True).decode("utf-8", "replace")
        bos = self._llm.detokenize([self._llm.token_bos()], special=True).decode("utf-8", "replace")
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def count(self, text: str) -> int:
        if not text:
            return 0
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def count_prompt(self, messages: list[dict[str, Any]]) -> int:
        """The prompt as the upstream renders it (same GGUF, same template)."""
        plain = [{"role": m["role"], "content": _text_of(m.get("content"))} for m in messages]
        prompt = self._formatter(messages=plain).prompt  # type: ignore[arg-type]
        return len(self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))


def _text_of(content: Any) -> str:
    """A chat message's text (its text parts when it has images: the template counts
    text; the upstream counts the images its own way)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""


def chat_messages(
    messages: list[Message], reasoning_field: str = "reasoning_content"
) -> list[dict[str, Any]]:
    """Turns as chat messages; an assistant turn's earlier thinking goes in
    `reasoning_field` (`none`: left out)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        size = len(out)
        if m.role == "tool":
            out.append({"role": "tool", "tool_call_id": m.call_id, "content": m.text})
        elif m.role == "assistant" and m.tool_calls:
            out.append(
                {
                    "role": "assistant",
                    "content": m.text or None,
                    "tool_calls": [
                        {
                            "id": c.call_id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments},
                        }
                        for c in m.tool_calls
                    ],
                }
            )
        elif m.parts is not None:
            out.append(
                {
                    "role": m.role,
                    "content": [
                        {"type": "image_url", "image_url": {"url": p["url"], "detail": p["detail"]}}
                        if p["type"] == "image"
                        else {"type": "text", "text": p["text"]}
                        for p in m.parts
                    ],
                }
            )
        else:
            # `developer` is the Responses API's name for a system message; most
            # chat-completions servers know only `system`.
            out.append({"role": "system" if m.role == "developer" else m.role, "content": m.text})
        if m.reasoning and reasoning_field != "none" and len(out) > size:
            thinking = "\n\n".join(t.text for t in m.reasoning if t.text)
            if thinking:
                out[-1][reasoning_field] = thinking
    return out


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        fn = {
            k: tool[k]
            for k in ("name", "description", "parameters", "strict")
            if tool.get(k) is not None
        }
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def allowed_tools(tools: list[dict[str, Any]], choice: Any) -> tuple[list[dict[str, Any]], Any]:
    """`allowed_tools` as chat-completions servers understand it: only the allowed tools
    are sent, with the choice's `mode` (a hard limit, which few servers' own
    `allowed_tools` support would give)."""
    if not (isinstance(choice, dict) and choice.get("type") == "allowed_tools"):
        return tools, choice
    names = {t.get("name") for t in choice.get("tools", [])}
    return [t for t in tools if t.get("name") in names], choice.get("mode", "auto")


def response_format(fmt: dict[str, Any]) -> dict[str, Any]:
    if fmt.get("type") == "json_schema":
        schema = {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None
        }
        return {"type": "json_schema", "json_schema": schema}
    return {"type": fmt.get("type", "text")}


LOGPROBS = "message.output_text.logprobs"
# Request fields a chat-completions body carries under the same name (docs/fields.md).
CHAT_FIELDS = (
    "prompt_cache_key",
    "safety_identifier",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "verbosity",
)


def chat_fields(forward: dict[str, Any], tools: bool) -> dict[str, Any]:
    """The forwarded request fields, as a chat-completions body names them:
    `reasoning.effort` is `reasoning_effort`; `parallel_tool_calls` only goes with tools
    (servers refuse it alone)."""
    out = {name: forward[name] for name in CHAT_FIELDS if name in forward}
    effort = (forward.get("reasoning") or {}).get("effort")
    if effort is not None:
        out["reasoning_effort"] = effort
    if tools and "parallel_tool_calls" in forward:
        out["parallel_tool_calls"] = forward["parallel_tool_calls"]
    return out


@dataclass(slots=True)
class _Received:
    """What one generation got from the upstream so far."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)  # the thinking text
    chunks: int = 0
    calls: dict[int, str] = field(default_factory=dict)  # upstream index -> call id
    finish: str | None = None
    done: bool = False  # `data: [DONE]` seen
    prompt_read: bool = False
    usage: dict[str, Any] | None = None
    think: Splitter | None = None  # `<think>` tags are split out of `content`

    @property
    def produced(self) -> bool:
        return self.chunks > 0

    def content(self, text: str, logprobs: list[dict[str, Any]] | None) -> list[Step]:
        """The steps of a `content` chunk."""
        self.chunks += 1
        if self.think is None:
            self.text.append(text)
            return [Delta(text, 1, logprobs)]
        return self.noted(self.think.steps(text))

    def tail(self) -> list[Step]:
        """At the end of the stream (or a cancel): text held back by the tag splitter."""
        return self.noted(self.think.end()) if self.think is not None else []

    def noted(self, steps: list[Delta | ReasoningDelta]) -> list[Step]:
        for step in steps:
            (self.reasoning if type(step) is ReasoningDelta else self.text).append(step.text)
        return list(steps)


#: the chunk fields servers stream a reasoning model's thinking in
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


def thinking_of(delta: dict[str, Any]) -> str | None:
    for name in REASONING_FIELDS:
        text = delta.get(name)
        if isinstance(text, str) and text:
            return text
    return None


class ChatEngine:
    """One model id served by one chat-completions upstream."""

    def __init__(self, spec: UpstreamConfig) -> None:
        self.spec = spec
        self.concurrency = spec.concurrency
        self._clients = Clients(spec)
        self._tokenizer: Tokenizer | None = None

    def models(self) -> list[ModelInfo]:
        # Upstreams apply function tools and `text.format` themselves.
        return [ModelInfo(id=self.spec.model, owned_by="upstream", context=self.spec.context)]

    async def start(self) -> None:
        if self.spec.tokenizer:
            self._tokenizer = await asyncio.to_thread(Tokenizer, self.spec.tokenizer)

    async def close(self) -> None:
        await self._clients.aclose()

    def body(self, request: Generation) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.spec.upstream_model or self.spec.model,
            "messages": chat_messages(request.messages, self.spec.reasoning_field),
            "stream": True,
            "stream_options": {"include_usage": True},
            # Always sent: servers' own defaults differ (llama.cpp 0.8, vLLM the model's),
            # and the response says 1.0 when the client set nothing.
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.max_output_tokens is not None:
            body[self.spec.max_tokens_param] = request.max_output_tokens
        tools, choice = allowed_tools(request.tools, request.tool_choice)
        if tools:
            body["tools"] = chat_tools(tools)
            # Sent explicitly: some servers (llama.cpp's) drop tools without it.
            body["tool_choice"] = chat_tool_choice(choice or "auto")
        elif request.tool_choice == "none":
            body["tool_choice"] = "none"
        if request.text_format is not None:
            body["response_format"] = response_format(request.text_format)
        body.update(chat_fields(request.forward, bool(tools)))
        if LOGPROBS in (request.forward.get("include") or ()):
            body["logprobs"] = True
            body["top_logprobs"] = request.forward.get("top_logprobs", 0)
        return body

    async def generate(self, request: Generation, emit: Emit) -> None:
        body = self.body(request)
        tags = self.spec.think_tags
        got = _Received(think=Splitter(opened=tags == "open") if tags else None)
        out = Outbox(emit)
        try:
            await self._stream(body, got, out)
        except anyio.get_cancelled_exc_class():
            # The connection is closed. Usage stays exact: what was received but not yet
            # emitted still is, then the count (the upstream's, a recount, or chunks).
            if got.prompt_read:
                await out.flush(*got.tail(), self._report(got))
            raise
        if got.finish is None and not got.done:
            metrics.upstream_error("chat")
            raise UpstreamGone("Upstream closed the stream before it finished.", retryable=False)
        await out.send(
            *got.tail(), self._report(got), Finished("length" if got.finish == "length" else "stop")
        )

    async def _stream(self, body: dict[str, Any], got: _Received, out: Outbox) -> None:
        """Relay the upstream's reply, retrying a failure before the first token."""
        attempt = 0
        while True:
            try:
                await self._relay(body, got, out)
                return
            except EngineError as exc:
                metrics.upstream_error("chat")
                # Retried only before the first token: after it, a retry would produce a
                # different text than the one already streamed.
                if got.produced or attempt >= self.spec.retries or not is_retryable(exc):
                    raise
                attempt += 1
                log.info(
                    "upstream %s failed before the first token (%s); retry %d",
                    self.spec.url,
                    exc,
                    attempt,
                )
                await backoff(attempt, exc)

    async def _relay(self, body: dict[str, Any], got: _Received, out: Outbox) -> None:
        batches = sse_batches(self._clients.streams, "POST", "chat/completions", body)
        async with contextlib.aclosing(batches):  # closed (the connection too) on any exit
            async for batch in batches:
                if not batch:  # the upstream accepted the request
                    if not got.prompt_read:
                        got.prompt_read = True
                        await out.send(PromptRead(self._input_tokens(body)))
                    continue
                # A network read's chunks are emitted together: one call for all.
                steps: list[Step] = []
                try:
                    self._chunks(batch, got, steps)
                except EngineError:  # an error chunk: what came before it stands
                    await out.send(*steps)
                    raise
                if steps:
                    await out.send(*steps)

    def _chunks(self, batch: list[tuple[str, bytes]], got: _Received, steps: list[Step]) -> None:
        """Add a network read's chunks' steps to `steps`. The chunk of almost every token
        (one choice, its text alone, nothing else) is handled here, in one loop with the
        checks `_chunk` and `_steps` make, in their order; any other goes to `_chunk`."""
        loads, add, texts = orjson.loads, steps.append, got.text
        plain = got.think is None
        for _, data in batch:
            if plain and data != b"[DONE]":
                try:
                    chunk = loads(data)
                except orjson.JSONDecodeError:
                    self._chunk(data, got, steps)  # raises the invalid-JSON error
                    return
                if type(chunk) is dict and not chunk.get("error") and not chunk.get("usage"):
                    choices = chunk.get("choices")
                    if type(choices) is list and len(choices) == 1:
                        choice = choices[0]
                        delta = choice.get("delta")
                        if (
                            type(delta) is dict
                            and len(delta) == 1
                            and choice.get("index", 0) == 0
                            and not choice.get("logprobs")
                            and not choice.get("finish_reason")
                        ):
                            text = delta.get("content")
                            if text:
                                got.chunks += 1
                                texts.append(text)
                                add(Delta(text))
                                continue
                self._parsed(chunk, got, steps)
            else:
                self._chunk(data, got, steps)

    def _chunk(self, data: bytes, got: _Received, steps: list[Step]) -> None:
        """Add one upstream chunk's steps to `steps`."""
        if data == b"[DONE]":
            got.done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamGone(
                f"Upstream sent invalid JSON: {data[:200].decode('utf-8', 'replace')!r}",
                retryable=False,
            ) from None
        self._parsed(chunk, got, steps)

    def _parsed(self, chunk: Any, got: _Received, steps: list[Step]) -> None:
        if not isinstance(chunk, dict):
            return
        if chunk.get("error"):
            err = chunk["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise EngineError(f"Upstream error: {message}")
        if chunk.get("usage"):
            got.usage = chunk["usage"]
        self._steps(chunk, got, steps)

    def _steps(self, chunk: dict[str, Any], got: _Received, steps: list[Step]) -> None:
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # n > 1 is never asked for
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text and len(delta) == 1 and got.think is None and not choice.get("logprobs"):
                got.chunks += 1  # the chunk of almost every token: its text alone
                got.text.append(text)
                steps.append(Delta(text))
            else:
                self._delta(chunk, choice, delta, got, steps)
            if choice.get("finish_reason"):
                got.finish = choice["finish_reason"]

    def _delta(
        self,
        chunk: dict[str, Any],
        choice: dict[str, Any],
        delta: dict[str, Any],
        got: _Received,
        steps: list[Step],
    ) -> None:
        """The steps of a choice's `delta`: thinking, text, tool calls."""
        thought = thinking_of(delta)
        if thought is not None:
            got.reasoning.append(thought)
            got.chunks += 1
            steps.append(ReasoningDelta(thought, 1))
        text = delta.get("content")
        if text:
            logprobs = logprob_objects((choice.get("logprobs") or {}).get("content"))
            steps += got.content(text, logprobs)
        for call in delta.get("tool_calls") or []:
            index = int(call.get("index", 0))
            fn = call.get("function") or {}
            if index not in got.calls:
                got.calls[index] = call.get("id") or f"call_{chunk.get('id', '')}_{index}"
                steps.append(ToolCall(index, got.calls[index], fn.get("name") or ""))
            if fn.get("arguments"):
                got.text.append(fn["arguments"])
                got.chunks += 1
                steps.append(ToolCallDelta(index, fn["arguments"], 1))

    async def count_tokens(self, request: Generation) -> int:
        """The prompt as `generate` sends it, counted like its input before the
        upstream reports usage: the GGUF tokenizer when configured, else the estimate.
        (chat-completions servers have no standard tokenize endpoint.)"""
        return await asyncio.to_thread(self._input_tokens, self.body(request))

    def _input_tokens(self, body: dict[str, Any]) -> int:
        if self._tokenizer is not None:
            return self._tokenizer.count_prompt(body["messages"])
        # Earlier thinking given back counts too (the template may show it).
        field = self.spec.reasoning_field
        return estimate_tokens(
            "".join(str(m.get("content") or "") + (m.get(field) or "") for m in body["messages"])
        )

    def _report(self, got: _Received) -> Report:
        usage = got.usage
        if usage and not isinstance(usage.get("completion_tokens"), int):
            usage = None
        if usage is not None:
            details = usage.get("completion_tokens_details") or {}
            reasoning = details.get("reasoning_tokens")
            return Report(
                usage.get("prompt_tokens"),
                usage["completion_tokens"],
                {"input_tokens": "upstream", "output_tokens": "upstream"},
                reasoning if isinstance(reasoning, int) else None,
            )
        notes = {"input_tokens": "tokenizer" if self._tokenizer else "estimate"}
        if self._tokenizer is not None:
            thought = self._tokenizer.count("".join(got.reasoning))
            count = self._tokenizer.count("".join(got.text)) + thought
            return Report(None, count, notes | {"output_tokens": "tokenizer"}, thought)
        # Chunks: the steps' tokens are the chunks, but for a trailing `<think>` tag
        # whose chunk yielded no step (engines/think.py).
        chunks = got.chunks if got.think is not None else None
        return Report(None, chunks, notes | {"output_tokens": "chunks"})
