"""The thread side of the embedded engine: the channel to the event loop, and one
generation's logic, written as a generator the batch scheduler drives (`local_batch`).

`ModelWorker.generation` is the sequential story of one response (read the prompt, decide
on a call, sample token by token); wherever it needs llama.cpp to evaluate tokens it
yields a `Feed` and is resumed, once those tokens are in its sequence's KV cache, with
the logits row of the last one. The scheduler evaluates the feeds of every live response
in one batched decode per step, so several responses advance together; everything here
runs on the scheduler's thread (llama.cpp is blocking and not thread-safe per context).

Each step goes onto the `Channel`'s asyncio queue (`call_soon_threadsafe` wakes the loop),
so every `Delta` is exactly one token. A token is computed only with a credit from the
consumer, and a response whose channel is stopped is dropped at the next step. Function
tools and `text.format` are applied with constrained decoding (`local_tools`).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import random
import secrets
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Generator
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
PENALTY_LAST_N = 64  # the repetition penalty looks back this many sampled tokens


@dataclass(slots=True)
class Trace:
    """What the engine did for one response (debug route). `token_times` are unix times
    at which the worker sampled each output token, also one it sampled but the run never
    delivered (at most one, after a cancel); `produced` counts delivered tokens."""

    started_at: float = field(default_factory=time.time)
    #: when the scheduler gave it a sequence and began reading its prompt
    admitted_at: float | None = None
    prompt_read_at: float | None = None
    produced: int = 0
    token_times: array[float] = field(default_factory=lambda: array("d"))
    aborted_at: float | None = None  # the worker stopped: a cancel, or the consumer left
    aborted_in_prefill: bool = False  # ... while it was still reading the prompt
    prefill_tokens: int = 0  # prompt tokens evaluated (the rest came from the KV cache)
    finished: bool = False  # the model ended the run (end of turn or budget)
    #: responses decoded in the same batch, the most seen at one step (1: alone)
    batched: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "started_at": self.started_at,
            "admitted_at": self.admitted_at,
            "prompt_read_at": self.prompt_read_at,
            "produced": self.produced,
            "token_times": self.token_times.tolist(),
            "aborted_at": self.aborted_at,
            "aborted_in_prefill": self.aborted_in_prefill,
            "prefill_tokens": self.prefill_tokens,
            "finished": self.finished,
            "batched": self.batched,
        }


# What the worker thread sends to the event loop: a step, a failure, or None (= done).
_Item = Step | EngineError | None


class Channel:
    """Links one generation on the scheduler's thread to the coroutine consuming it.

    Token credits and the stop flag are guarded by the scheduler's condition (shared by
    every channel), so a scheduler with nothing to do is woken at once by a credit, a
    stop or a new job (no polling). Two credits: the next token is computed while the
    consumer emits this one, but never more, so a cancel finds at most one token step
    in flight.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, trace: Trace, cond: threading.Condition
    ) -> None:
        self.loop = loop
        self.trace = trace
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        #: set (on the loop) after the end mark is queued: all the worker made is queued
        self.done: asyncio.Future[None] = loop.create_future()
        self._cond = cond
        self._credits = 2
        self._stopped = False

    def put(self, item: _Item) -> None:
        """(worker) Hand `item` to the consumer."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening
            self.stop()

    def end(self) -> None:
        """(worker) The generation is over: the end mark, then `done`."""
        self.put(None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self.loop.call_soon_threadsafe(_resolve, self.done)

    def give(self) -> None:
        """(consumer) A token was taken: the worker may compute one more."""
        with self._cond:
            self._credits += 1
            self._cond.notify()

    def stop(self) -> None:
        """Drop the generation at the next step; any thread, idempotent."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def take(self) -> bool:
        """(scheduler, holding the condition) Take a credit if there is one."""
        if self._credits > 0:
            self._credits -= 1
            return True
        return False

    def spend(self) -> None:
        """(worker) Use a credit known to be there (a run's first token)."""
        with self._cond:
            self._credits -= 1

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


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


@dataclass(slots=True)
class Feed:
    """(generation → scheduler) Evaluate `tokens` in this sequence, then resume me with
    the batch row of the last one's logits. `credit`: the logits become an output token,
    so the consumer's credit is needed first."""

    tokens: list[int]
    credit: bool = False


#: A generation: yields feeds, is sent logits rows, returns when its run is over.
Run = Generator[Feed, int, None]


@dataclass(frozen=True, slots=True)
class Sampling:
    """The engine's default sampling, beside the request's temperature and top_p (see
    `LocalEngine`): a min-p floor, a repetition penalty, and the output length after
    which ending is pushed ever harder."""

    min_p: float
    repeat_penalty: float
    wrap_up: int


@dataclass(slots=True)
class Prepared:
    """A request made ready for the scheduler: its plan and its prompt's tokens."""

    request: Generation
    plan: local_tools.Plan
    prompt: list[int]


class ModelWorker:
    """A loaded model and the logic of one generation. `generation` runs on the
    scheduler's thread only (it reads the logits of `ctx`, the scheduler's context);
    `prompt` and `prepare` (tokenizing) from any thread."""

    def __init__(self, llm: llama_cpp.Llama, n_ctx: int, sampling: Sampling) -> None:
        self.llm = llm
        self.ctx: Any = None  # the batched context, set by the scheduler that owns it
        self._n_ctx = n_ctx  # per sequence: prompt + output of one response
        self._sampling = sampling
        self.fast_greedy = True  # greedy free text sampled in numpy (`_greedy`)
        # Use the GGUF's own chat template, so the prompt is exactly what the model was
        # trained on; ChatML is the family default if a GGUF lacks one.
        template = llm.metadata.get("tokenizer.chat_template", CHATML_CHAT_TEMPLATE)
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._n_vocab = llm.n_vocab()
        self._eos = llm.token_eos()
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._marker_token = self._tokens(local_tools.MARKER)[0]
        self._closers: npt.NDArray[np.int64] = np.array(
            [t for t in range(self._n_vocab) if _closes(llm.detokenize([t]))], dtype=np.int64
        )
        # A new turn's opening is an ending too (the model starting to play the user).
        self._stops = frozenset(llm.tokenize(b"<|im_start|>", add_bos=False, special=True)[:1])

    def prompt(self, request: Generation, plan: local_tools.Plan) -> list[int]:
        """The prompt's tokens, as a generation reads them. Tokenizing reads only the
        vocabulary: safe beside a generation on the scheduler's thread."""
        messages = local_tools.chat_messages(request, plan)
        prompt_text = self._formatter(messages=messages).prompt  # type: ignore[arg-type]
        # The template writes its own special tokens: parse them, add no extra BOS.
        return self.llm.tokenize(prompt_text.encode("utf-8"), add_bos=False, special=True)

    def prepare(self, request: Generation) -> Prepared:
        """The request's plan and prompt; an EngineError when the prompt leaves no room."""
        plan = local_tools.plan(request)
        prompt = self.prompt(request, plan)
        if len(prompt) >= self._n_ctx:
            raise EngineError(f"prompt has {len(prompt)} tokens; the context holds {self._n_ctx}")
        return Prepared(request, plan, prompt)

    def generation(self, job: Prepared, chan: Channel, cached: int) -> Run:
        """One response, from its prompt (of which the sequence's KV cache already holds
        `cached` tokens) to its end. Every step goes to `chan`; the scheduler ends the
        channel and drops the run (closing the generator) at a stop."""
        request, plan, prompt = job.request, job.plan, job.prompt
        trace = chan.trace
        chan.put(PromptRead(input_tokens=len(prompt)))
        row = yield Feed(prompt[cached:])
        trace.prompt_read_at = time.time()
        trace.prefill_tokens = len(prompt) - cached
        room = self._n_ctx - len(prompt)
        limit = request.max_output_tokens
        budget = room if limit is None else min(limit, room)
        if budget <= 0:
            trace.finished = True
            chan.put(Finished("length"))
            return
        # A fresh seed per run: with one fixed seed every sampled run of the same prompt
        # would produce the same text.
        seed = random.randrange(2**31)
        kind = plan.kind
        if kind == "auto":
            wanted = plan.relevant or self._call_probability(row) >= local_tools.CALL_THRESHOLD
            kind = "call" if wanted else "text"
        if kind == "call":
            reason = yield from self._call(request, plan, chan, budget, seed)
        else:
            grammar = (
                None if plan.text_schema is None else local_tools.schema_grammar(plan.text_schema)
            )
            reason = yield from self._sample(request, chan, budget, grammar, _text_step, row, seed)
        if reason is not None:
            trace.finished = True
            chan.put(Finished(reason))

    def _call_probability(self, row: int) -> float:
        """How likely the model is to open a tool call now (after the prompt)."""
        logits = self._logits(row).astype(np.float64)
        top = float(logits.max())
        probs = np.exp(logits - top)
        return float(probs[self._marker_token] / probs.sum())

    def _logits(self, row: int) -> npt.NDArray[np.float32]:
        """The logits of batch row `row` of the last decode (a view: writes change
        sampling)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _call(
        self, request: Generation, plan: local_tools.Plan, chan: Channel, budget: int, seed: int
    ) -> Generator[Feed, int, Ending | None]:
        """A function call: the opening and the name are written into the context by
        the engine (the name chosen by the model's ranking of the allowed ones); the
        arguments are sampled under the function's schema grammar, one token a step."""
        tools = plan.relevant or plan.tools
        # The opening, the name and `, "arguments": ` are written into the context too:
        # leave them room, or the context overflows (the call then ends at its length).
        written = len(self._tokens(local_tools.CALL_OPEN + local_tools.ARGS_OPEN)) + max(
            len(self._tokens(t["name"] + '"')) for t in tools
        )
        if written >= budget:
            return "length"
        budget -= written
        row = yield Feed(self._tokens(local_tools.CALL_OPEN))
        # The model's ranking of the allowed names: a greedy walk over their tokens.
        names = {t["name"]: self._tokens(t["name"] + '"') for t in tools}
        alive, at = list(names), 0
        while len(alive) > 1:
            logits = self._logits(row)
            best = max({names[n][at] for n in alive}, key=lambda t: float(logits[t]))
            alive = [n for n in alive if names[n][at] == best]
            row = yield Feed([best])
            at += 1
        name = alive[0]
        row = yield Feed(names[name][at:] + self._tokens(local_tools.ARGS_OPEN))
        if chan.stopped:  # stopped while choosing: no call opened after a stop
            chan.trace.aborted_at = time.time()
            return None
        chan.put(ToolCall(0, "call_" + secrets.token_hex(12), name))
        tool = next(t for t in tools if t["name"] == name)
        grammar = local_tools.schema_grammar(tool.get("parameters"))
        return (yield from self._sample(request, chan, budget, grammar, _args_step, row, seed))

    def _tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _sample(
        self,
        request: Generation,
        chan: Channel,
        budget: int,
        grammar: str | None,
        step: Callable[[str], Step],
        row: int,
        seed: int,
    ) -> Generator[Feed, int, Ending | None]:
        """Sample up to `budget` tokens, one per credit, from logits row `row` on; each
        becomes `step(text)`. The finish reason (None: the scheduler dropped the run)."""
        # Greedy free text (temperature 0) samples in numpy: the same choice as llama.cpp's
        # penalties + greedy chain, without its copy of every logit into a candidates
        # array (~0.1-0.3 ms a token, a few % of a step).
        greedy = grammar is None and request.temperature <= 0 and self.fast_greedy
        chain = None if greedy else self._sampler(request, grammar, seed)
        recent: deque[int] = deque(maxlen=PENALTY_LAST_N)
        # A token can end in the middle of a UTF-8 character: hold bytes back until they
        # decode, so a step may carry "" while still counting its one token. Bytes of a
        # character still unfinished when the run ends are dropped, never guessed at.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        detokenize = self.llm.detokenize
        token_times = chan.trace.token_times
        produced = 0
        # Under a grammar an answer cut at its budget is not JSON at all: start closing it
        # early enough that a small `max_output_tokens` still gets a whole value.
        wrap_up = self._sampling.wrap_up
        if grammar is not None:
            wrap_up = min(wrap_up, budget * 2 // 3)
        chan.spend()  # the first token's credit (a run starts with two)
        try:
            while True:
                if produced >= wrap_up:
                    # Past the usual length of an answer: make ending ever more likely, so
                    # a 135M model that lost its thread still stops by itself (in JSON:
                    # closing its strings, arrays and objects, where the grammar allows).
                    ends = self._eos if grammar is None else self._closers
                    self._logits(row)[ends] += (produced - wrap_up + 1) * 0.1
                if chain is None:
                    token = self._greedy(row, recent)
                else:
                    token = llama_cpp.llama_sampler_sample(chain, self.ctx, row)
                if llama_cpp.llama_vocab_is_eog(self._vocab, token) or token in self._stops:
                    return "stop"  # end-of-turn is not output text: not counted
                token_times.append(time.time())
                produced += 1
                chan.put(step(decoder.decode(detokenize([token]))))
                if produced == budget:
                    return "length"
                # Evaluate this token (with the next credit), then sample from its logits.
                row = yield Feed([token], credit=True)
        finally:
            if chain is not None:
                llama_cpp.llama_sampler_free(chain)

    def _greedy(self, row: int, recent: deque[int]) -> int:
        """llama.cpp's penalties sampler (repetition only) then greedy, on logits row
        `row`: each distinct token among the last `PENALTY_LAST_N` sampled has its logit
        divided by the penalty (multiplied, if not positive); the first highest wins."""
        logits = self._logits(row)
        best = int(logits.argmax())
        penalty = np.float32(self._sampling.repeat_penalty)
        if best in recent and penalty != 1.0:
            # Only a penalized token can lose its place (a penalty only lowers logits).
            ids = np.fromiter(set(recent), dtype=np.int64)
            values = logits[ids]
            scored = logits.copy()
            scored[ids] = np.where(values <= 0, values * penalty, values / penalty)
            best = int(scored.argmax())
        recent.append(best)
        return best

    def _sampler(self, request: Generation, grammar: str | None, seed: int) -> Any:
        """The sampler chain: repetition penalty (free text only: it would fight a
        grammar's required punctuation), the grammar, then the request's temperature
        and top_p (0 selects greedy) with a light min-p floor."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        penalty = self._sampling.repeat_penalty
        if grammar is None and penalty != 1.0:
            add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    self._n_vocab, PENALTY_LAST_N, penalty, 0.0, 0.0
                ),
            )
        if grammar is not None:
            constraint = llama_cpp.llama_sampler_init_grammar(
                self._vocab, grammar.encode("utf-8"), b"root"
            )
            if not constraint:  # llama.cpp could not parse it: fall back to any object
                constraint = llama_cpp.llama_sampler_init_grammar(
                    self._vocab, local_tools.any_object_grammar().encode("utf-8"), b"root"
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
            add(chain, llama_cpp.llama_sampler_init_dist(seed))
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
