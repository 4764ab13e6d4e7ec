"""The thread side of the embedded engine: the channel to the event loop, and the
blocking generation that drives llama.cpp token by token.

llama.cpp is blocking and not thread-safe per `Llama` object, so `ModelWorker.run` runs
on the engine's one worker thread (`LocalEngine` owns it). The worker pushes each step
onto the `Channel`'s asyncio queue (`call_soon_threadsafe` wakes the loop), so every
`Delta` is exactly one token. It computes a token only with a credit from the consumer,
and stops at its next token once the channel's stop flag is set.

The prompt is read in chunks with a stop check between them, so a cancel during a long
prompt is seen within one chunk (`PREFILL_CHUNK_SECONDS`). Function tools and
`text.format` are applied with constrained decoding (`local_tools`).
"""

from __future__ import annotations

import asyncio
import codecs
import random
import secrets
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter

from tether.engines import local_tools
from tether.engines.base import (
    Delta,
    EngineError,
    Finished,
    Generation,
    Outbox,
    PromptRead,
    Step,
    ToolCall,
    ToolCallDelta,
)

Ending = Literal["stop", "length"]
#: target time of one prompt chunk: a cancel during prefill waits at most about this.
PREFILL_CHUNK_SECONDS = 0.05


@dataclass(slots=True)
class Trace:
    """What the engine did for one response (debug route). `token_times` are unix times
    at which the worker sampled each output token, also one it sampled but the run never
    delivered (at most one, after a cancel); `produced` counts delivered tokens."""

    started_at: float = field(default_factory=time.time)
    prompt_read_at: float | None = None
    produced: int = 0
    token_times: array[float] = field(default_factory=lambda: array("d"))
    aborted_at: float | None = None  # the worker stopped: a cancel, or the consumer left
    aborted_in_prefill: bool = False  # ... while it was still reading the prompt
    prefill_tokens: int = 0  # prompt tokens evaluated (the rest came from the KV cache)
    finished: bool = False  # the model ended the run (end of turn or budget)

    def as_dict(self) -> dict[str, object]:
        return {
            "started_at": self.started_at,
            "prompt_read_at": self.prompt_read_at,
            "produced": self.produced,
            "token_times": self.token_times.tolist(),
            "aborted_at": self.aborted_at,
            "aborted_in_prefill": self.aborted_in_prefill,
            "prefill_tokens": self.prefill_tokens,
            "finished": self.finished,
        }


# What the worker thread sends to the event loop: a step, a failure, or None (= done).
_Item = Step | EngineError | None


class Channel:
    """Links one generation's worker thread to the coroutine consuming it.

    The worker's token credits and its stop flag share one condition, so the worker
    waiting for a credit is woken at once by a credit or by a stop (no polling). Two
    credits: the worker computes the next token while the consumer emits this one, but
    never more, so a cancel finds at most one token step in flight.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, trace: Trace) -> None:
        self.loop = loop
        self.trace = trace
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._cond = threading.Condition()
        self._credits = 2
        self._stopped = False

    def put(self, item: _Item) -> None:
        """(worker) Hand `item` to the consumer."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening
            self.stop()

    def give(self) -> None:
        """(consumer) A token was taken: the worker may compute one more."""
        with self._cond:
            self._credits += 1
            self._cond.notify()

    def stop(self) -> None:
        """Stop the worker at its next token (or prompt chunk); any thread, idempotent."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def next_turn(self, closing: threading.Event) -> bool:
        """(worker) Wait for a credit; False when the run must end."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopped or self._credits > 0)
            go = not self._stopped
            if go:
                self._credits -= 1
        if closing.is_set():
            raise EngineError("local engine closed during generation")
        if not go:
            self.trace.aborted_at = time.time()
        return go

    def undelivered(self, out: Outbox) -> list[Step]:
        """(consumer, once the worker is done) The steps the worker made that the
        consumer never took, up to one token step counting `out.pending`'s: the one in
        flight. A `Finished`, a failure or the end mark after a cancel are dropped."""
        tokens = sum(is_token(s) for s in out.pending)
        steps: list[Step] = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is None or isinstance(item, (EngineError, Finished)):
                continue
            if is_token(item):
                if tokens:
                    break  # generated, never delivered (the trace has its time)
                tokens += 1
            steps.append(item)
        return steps


@dataclass(frozen=True, slots=True)
class Sampling:
    """The engine's default sampling, beside the request's temperature and top_p (see
    `LocalEngine`): a min-p floor, a repetition penalty, and the output length after
    which ending is pushed ever harder."""

    min_p: float
    repeat_penalty: float
    wrap_up: int


class ModelWorker:
    """A loaded model and the blocking generation that drives it. `run` is called on the
    engine's one worker thread only; `prompt` (tokenizing) from any thread."""

    def __init__(
        self, llm: llama_cpp.Llama, n_ctx: int, sampling: Sampling, closing: threading.Event
    ) -> None:
        self.llm = llm
        self._n_ctx = n_ctx
        self._sampling = sampling
        self._closing = closing  # set by the engine's close(): every run fails
        # Use the GGUF's own chat template, so the prompt is exactly what the model was
        # trained on; ChatML is the family default if a GGUF lacks one.
        template = llm.metadata.get("tokenizer.chat_template", CHATML_CHAT_TEMPLATE)
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._n_vocab = llm.n_vocab()
        self._eos = llm.token_eos()
        self._marker_token = self._tokens(local_tools.MARKER)[0]
        self._closers: npt.NDArray[np.int64] = np.array(
            [t for t in range(self._n_vocab) if _closes(llm.detokenize([t]))], dtype=np.int64
        )
        # A new turn's opening is an ending too (the model starting to play the user).
        self._stops = frozenset(llm.tokenize(b"<|im_start|>", add_bos=False, special=True)[:1])
        self._chunk = 32  # prompt tokens per decode; adapted to PREFILL_CHUNK_SECONDS
        self._seed = 0

    def run(self, request: Generation, chan: Channel) -> None:
        """The blocking generation (worker thread). Never raises; always ends with None."""
        try:
            self._generate(request, chan)
        except EngineError as exc:
            chan.put(exc)
        except Exception as exc:  # any llama.cpp failure fails the run, never the server
            chan.put(EngineError(f"local engine failed: {type(exc).__name__}: {exc}"))
        finally:
            chan.put(None)

    def prompt(self, request: Generation, plan: local_tools.Plan) -> list[int]:
        """The prompt's tokens, as `run` reads them. Tokenizing reads only the
        vocabulary: safe beside a generation on the worker."""
        messages = local_tools.chat_messages(request, plan)
        prompt_text = self._formatter(messages=messages).prompt  # type: ignore[arg-type]
        # The template writes its own special tokens: parse them, add no extra BOS.
        return self.llm.tokenize(prompt_text.encode("utf-8"), add_bos=False, special=True)

    def _generate(self, request: Generation, chan: Channel) -> None:
        if self._closing.is_set():
            raise EngineError("local engine is closed")
        plan = local_tools.plan(request)
        prompt = self.prompt(request, plan)
        room = self._n_ctx - len(prompt)
        if room <= 0:
            raise EngineError(f"prompt has {len(prompt)} tokens; the context holds {self._n_ctx}")
        chan.put(PromptRead(input_tokens=len(prompt)))
        if not self._prefill(prompt, chan):
            return
        chan.trace.prompt_read_at = time.time()
        limit = request.max_output_tokens
        budget = room if limit is None else min(limit, room)
        if budget <= 0:
            chan.trace.finished = True
            chan.put(Finished("length"))
            return
        # llama-cpp keeps one seed per Llama; without a fresh one every sampled run of the
        # same prompt would produce the same text.
        self._seed = random.randrange(2**31)
        kind = plan.kind
        if kind == "auto":
            wanted = plan.relevant or self._call_probability() >= local_tools.CALL_THRESHOLD
            kind = "call" if wanted else "text"
        if kind == "call":
            reason = self._call(request, plan, chan, budget)
        else:
            grammar = (
                None if plan.text_schema is None else local_tools.schema_grammar(plan.text_schema)
            )
            reason = self._sample(request, chan, budget, grammar, _text_step)
        if reason is not None:
            chan.trace.finished = True
            chan.put(Finished(reason))

    def _prefill(self, prompt: list[int], chan: Channel) -> bool:
        """Evaluate the prompt in chunks of about `PREFILL_CHUNK_SECONDS` each, checking
        for a stop between them: llama.cpp cannot stop inside one `decode`, so the
        chunk is what bounds how long a cancel waits while a long prompt is read.
        The part of the prompt already in the KV cache (the previous run's) is kept."""
        llm = self.llm
        cached = 0
        limit = min(llm.n_tokens, len(prompt) - 1)  # at least one token for fresh logits
        while cached < limit and llm.input_ids[cached] == prompt[cached]:
            cached += 1
        llm.n_tokens = cached  # `eval` drops the cache after this position
        at = cached
        while at < len(prompt):
            if self._stopping(chan):
                chan.trace.aborted_at = time.time()
                chan.trace.aborted_in_prefill = True
                return False
            started = time.monotonic()
            llm.eval(prompt[at : at + self._chunk])
            at += self._chunk
            took = time.monotonic() - started
            # Adapt to this machine and its load: halve a chunk that took too long,
            # double one that was quick (bounded both ways).
            if took > PREFILL_CHUNK_SECONDS and self._chunk > 4:
                self._chunk //= 2
            elif took < PREFILL_CHUNK_SECONDS / 3 and self._chunk < 256:
                self._chunk *= 2
        chan.trace.prefill_tokens = len(prompt) - cached
        return True

    def _stopping(self, chan: Channel) -> bool:
        if self._closing.is_set():
            raise EngineError("local engine closed during generation")
        return chan.stopped

    def _call_probability(self) -> float:
        """How likely the model is to open a tool call now (after the prompt)."""
        logits = self._logits().astype(np.float64)
        top = float(logits.max())
        probs = np.exp(logits - top)
        return float(probs[self._marker_token] / probs.sum())

    def _logits(self) -> npt.NDArray[np.float32]:
        """The last evaluated position's logits (a view: writes change sampling)."""
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _call(
        self, request: Generation, plan: local_tools.Plan, chan: Channel, budget: int
    ) -> Ending | None:
        """A function call: the opening and the name are written into the context by
        the engine (the name chosen by the model's ranking of the allowed ones); the
        arguments are sampled under the function's schema grammar, one token a step."""
        llm = self.llm
        tools = plan.relevant or plan.tools
        # The opening, the name and `, "arguments": ` are written into the context too:
        # leave them room, or the context overflows (the call then ends at its length).
        written = len(self._tokens(local_tools.CALL_OPEN + local_tools.ARGS_OPEN)) + max(
            len(self._tokens(t["name"] + '"')) for t in tools
        )
        if written >= budget:
            return "length"
        budget -= written
        llm.eval(self._tokens(local_tools.CALL_OPEN))
        tool = self._pick_tool(tools, chan)
        if tool is None or self._stopping(chan):
            chan.trace.aborted_at = time.time()
            return None  # stopped while choosing: no call opened after a stop
        name = tool["name"]
        chan.put(ToolCall(0, "call_" + secrets.token_hex(12), name))
        grammar = local_tools.schema_grammar(tool.get("parameters"))
        return self._sample(request, chan, budget, grammar, _args_step)

    def _pick_tool(self, tools: list[dict[str, Any]], chan: Channel) -> dict[str, Any] | None:
        llm = self.llm
        names = {t["name"]: self._tokens(t["name"] + '"') for t in tools}
        alive, at = list(names), 0
        while len(alive) > 1:
            if self._stopping(chan):
                return None
            logits = self._logits()
            best = max({names[n][at] for n in alive}, key=lambda t: float(logits[t]))
            alive = [n for n in alive if names[n][at] == best]
            llm.eval([best])
            at += 1
        name = alive[0]
        llm.eval(names[name][at:] + self._tokens(local_tools.ARGS_OPEN))
        return next(t for t in tools if t["name"] == name)

    def _tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _sample(
        self,
        request: Generation,
        chan: Channel,
        budget: int,
        grammar: str | None,
        step: Callable[[str], Step],
    ) -> Ending | None:
        """Sample up to `budget` tokens, one per credit; each becomes `step(text)`. The
        finish reason, or None when stopped."""
        llm = self.llm
        chain = self._sampler(request, grammar)
        # A token can end in the middle of a UTF-8 character: hold bytes back until they
        # decode, so a step may carry "" while still counting its one token. Bytes of a
        # character still unfinished when the run ends are dropped, never guessed at.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        token_times = chan.trace.token_times
        produced = 0
        pending: int | None = None
        # Under a grammar an answer cut at its budget is not JSON at all: start closing it
        # early enough that a small `max_output_tokens` still gets a whole value.
        wrap_up = self._sampling.wrap_up
        if grammar is not None:
            wrap_up = min(wrap_up, budget * 2 // 3)
        try:
            while chan.next_turn(self._closing):
                if pending is not None:
                    llm.eval([pending])  # one step: evaluate the previous token, sample one
                if produced >= wrap_up:
                    # Past the usual length of an answer: make ending ever more likely, so
                    # a 135M model that lost its thread still stops by itself (in JSON:
                    # closing its strings, arrays and objects, where the grammar allows).
                    ends = self._eos if grammar is None else self._closers
                    self._logits()[ends] += (produced - wrap_up + 1) * 0.1
                token = llama_cpp.llama_sampler_sample(chain, llm.ctx, -1)
                if llama_cpp.llama_vocab_is_eog(vocab, token) or token in self._stops:
                    return "stop"  # end-of-turn is not output text: not counted
                token_times.append(time.time())
                produced += 1
                chan.put(step(decoder.decode(llm.detokenize([token]))))
                if produced == budget:
                    return "length"
                pending = token
            return None
        finally:
            llama_cpp.llama_sampler_free(chain)

    def _sampler(self, request: Generation, grammar: str | None) -> Any:
        """The sampler chain: repetition penalty (free text only: it would fight a
        grammar's required punctuation), the grammar, then the request's temperature
        and top_p (0 selects greedy) with a light min-p floor."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        penalty = self._sampling.repeat_penalty
        if grammar is None and penalty != 1.0:
            add(chain, llama_cpp.llama_sampler_init_penalties(self._n_vocab, 64, penalty, 0.0, 0.0))
        if grammar is not None:
            vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
            constraint = llama_cpp.llama_sampler_init_grammar(
                vocab, grammar.encode("utf-8"), b"root"
            )
            if not constraint:  # llama.cpp could not parse it: fall back to any object
                constraint = llama_cpp.llama_sampler_init_grammar(
                    vocab, local_tools.any_object_grammar().encode("utf-8"), b"root"
                )
            if not constraint:
                llama_cpp.llama_sampler_free(chain)
                raise EngineError("local engine could not build a grammar for the schema")
            add(chain, constraint)
        if request.temperature <= 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            add(chain, llama_cpp.llama_sampler_init_top_p(request.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(self._sampling.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(request.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(self._seed))
        return chain


def is_token(step: Step) -> bool:
    """A step that is one output token (text or function-call arguments)."""
    return type(step) is Delta or type(step) is ToolCallDelta


def _closes(piece: bytes) -> bool:
    """A token that only closes JSON (strings, arrays, objects)."""
    return bool(piece) and set(piece) <= set(b'"]} ')


def _text_step(text: str) -> Step:
    return Delta(text, tokens=1)


def _args_step(text: str) -> Step:
    return ToolCallDelta(0, text, tokens=1)
