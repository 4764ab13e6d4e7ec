"""Continuous batching for the embedded engine: one llama.cpp context, one thread, every
live response's next token in one batched decode.

The context holds `sequences` sequences (a llama.cpp sequence id each: a `Slot`), each
with a KV cache of its own of `n_ctx_seq` cells (llama.cpp's non-unified cache): a
response has its whole context whatever the others use, and attends to its own cells
only, so its logits are the same bit for bit alone or beside others (a unified cache
sums over every sequence's cells, masked, and greedy outputs then drift with the batch).
llama.cpp evaluates one pass over the weights for a run of *consecutive* sequence ids,
so a batch lists its rows by sequence id and responses take the lowest free ids.
Each step the scheduler thread:

1. admits queued responses into free slots: the lowest free id, unless a slot's cached
   tokens share a long prefix with the prompt (a conversation's next turn then reads
   only its new part),
2. drops every response whose channel was stopped (a cancel lands here, at most one
   step after it was asked for; the others go on undisturbed),
3. reads pieces of prompts: all prefills together get about `PREFILL_CHUNK_SECONDS` a
   step, so a long prompt never stalls the running streams for long, and a cancel during
   a prefill waits one piece,
4. decodes the next token of every decoding response (with its consumer's credit) in one
   `llama_decode`, and resumes each with its logits row (it samples with its own sampler
   chain right away, before the next decode overwrites the logits).

A scheduler with nothing to do sleeps on its condition, which every credit, stop, new
job and close notifies.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp

from tether.engines.base import EngineError, Generation
from tether.engines.local_defer import ABORTED, Deferral
from tether.engines.local_worker import Channel, Feed, ModelWorker, Run

#: target time of one step that reads prompt tokens: a cancel during prefill, and the
#: running streams beside a prefill, wait at most about this.
PREFILL_CHUNK_SECONDS = 0.05
MAX_CHUNK = 256  # prompt tokens per step, at most
MIN_PIECE = 8  # prompt tokens of one response in one step, at least (but its last)
MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ
#: a cached prefix this long is worth a slot out of order (see `Scheduler._pick`)
REUSE_MIN = 64


@dataclass(slots=True)
class Slot:
    """One llama.cpp sequence: the tokens its KV cache holds, in order."""

    seq: int
    tokens: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Live:
    """A response being generated in a slot."""

    slot: Slot
    chan: Channel
    run: Run
    feed: Feed = field(default_factory=lambda: Feed([]))
    at: int = 0  # tokens of `feed` already evaluated
    credited: bool = False  # `feed` needed a credit and has it
    ended: bool = False
    #: a deferred response: held back while interactive ones run, until then
    #: (`Generation.defer_until`)
    defer_until: float | None = None


class Scheduler:
    """Owns the batched context and the thread that decodes in it (see the module doc)."""

    def __init__(self, worker: ModelWorker, sequences: int, n_ctx_seq: int, n_threads: int) -> None:
        if not 1 <= sequences <= MAX_SEQUENCES:
            raise EngineError(f"the embedded engine runs 1 to {MAX_SEQUENCES} sequences")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sequences * n_ctx_seq
        params.n_batch = params.n_ubatch = max(MAX_CHUNK + MIN_PIECE, sequences)
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = False  # a KV cache per sequence (see the module doc)
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as `Llama`'s
        params.embeddings = False
        ctx = llama_cpp.llama_init_from_model(worker.llm.model, params)
        if not ctx:
            raise EngineError("local engine could not create its llama.cpp context")
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        worker.ctx = ctx
        self._worker = worker
        self.cond = threading.Condition()
        self._inbox: deque[tuple[Generation, Channel]] = deque()
        self._free = [Slot(i) for i in range(sequences)]
        self._live: list[Live] = []
        self._closing = False
        self._dead: str | None = None  # why the thread is gone: submits then fail
        self._chunk = 32  # prompt tokens a step; adapted to PREFILL_CHUNK_SECONDS
        self.deferral = Deferral(ctx)  # when deferred responses decode (`local_defer`)
        self._thread = threading.Thread(target=self._loop, name="tether-local", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Generation, chan: Channel) -> None:
        """(event loop) Queue a response; it is admitted at the next step with a free slot."""
        with self.cond:
            if self._dead is not None:
                raise EngineError(self._dead)
            self._inbox.append((request, chan))
            self.cond.notify()

    def expect(self) -> None:
        """(event loop) An interactive response is on its way: deferred work holds
        (`Deferral.expect`)."""
        with self.cond:
            self.deferral.expect()
            self.cond.notify()

    def close(self) -> None:
        """(any thread but the scheduler's) Fail every response, stop the thread, free
        the context. The model itself is its owner's to free, afterwards."""
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        elif self._ctx is not None:  # never started
            self._free_context()

    # --- the scheduler's thread -----------------------------------------------------------

    def _loop(self) -> None:
        failure = "local engine closed during generation"
        try:
            while True:
                with self.cond:
                    while True:
                        if self._closing:
                            return
                        if any(chan.stopped for _, chan in self._inbox):
                            # Cancelled while queued: ended at once, slot or not.
                            quit_ = [j for j in self._inbox if j[1].stopped]
                            self._inbox = deque(j for j in self._inbox if not j[1].stopped)
                        else:
                            quit_ = []
                        jobs = self._jobs() + quit_
                        stopped = [r for r in self._live if r.chan.stopped]
                        ready = [r for r in self._live if not r.chan.stopped and self._ready(r)]
                        ready = self.deferral.pick(ready, self._live)
                        if jobs or stopped or ready:
                            break
                        self.cond.wait(self.deferral.timeout(self._live))
                for r in stopped:
                    self._drop(r)
                for request, chan in jobs:
                    admitted = self._admit(request, chan)
                    if admitted is not None:
                        ready.append(admitted)  # a first feed needs no credit
                ready = self.deferral.pick(ready, self._live)
                if ready and self.deferral.begin(ready):
                    try:
                        self._step(ready)
                    finally:
                        self.deferral.end()
        except Exception as exc:  # a bug or a llama.cpp failure: fail what runs, loudly
            failure = f"local engine failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            with self.cond:
                self._dead = failure
                waiting = list(self._inbox)
                self._inbox.clear()
            for r in list(self._live):
                self._finish(r, EngineError(failure))
            for _, chan in waiting:
                chan.put(EngineError(failure))
                chan.end()
            self._free_context()

    def _jobs(self) -> list[tuple[Generation, Channel]]:
        """(holding the condition) Queued responses for the free slots: interactive ones
        first (a deferred one waits while an interactive one is queued)."""
        n = min(len(self._inbox), len(self._free))
        if n < len(self._inbox):
            now = time.time()
            order = sorted(self._inbox, key=lambda j: _is_deferred(j[0], now))
            self._inbox = deque(order)
        return [self._inbox.popleft() for _ in range(n)]

    def _ready(self, r: Live) -> bool:
        """(holding the condition) Whether `r` can take part in the next step."""
        if r.feed.credit and not r.credited:
            r.credited = r.chan.take()
        return not r.feed.credit or r.credited

    def _admit(self, request: Generation, chan: Channel) -> Live | None:
        trace = chan.trace
        trace.admitted_at = time.time()
        if not _is_deferred(request, trace.admitted_at):
            self.deferral.arrived()
        if chan.stopped:  # cancelled while queued: it never read its prompt
            trace.aborted_at = time.time()
            trace.aborted_in_prefill = True
            chan.end()
            return None
        try:
            job = self._worker.prepare(request)
        except Exception as exc:
            chan.put(_failure(exc))
            chan.end()
            return None
        slot = self._pick(job.prompt)
        # Keep the cached prefix, but at least one prompt token is read: its logits are
        # the first token's.
        cached = _common_prefix(slot.tokens, job.prompt, len(job.prompt) - 1)
        if cached < len(slot.tokens):
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq, cached, -1)
            del slot.tokens[cached:]
        live = Live(
            slot,
            chan,
            self._worker.generation(job, chan, cached),
            defer_until=request.defer_until,
        )
        self._live.append(live)
        return live if self._advance(live, None) else None

    def _pick(self, prompt: list[int]) -> Slot:
        """The free slot sharing the longest prefix with `prompt` if that saves reading
        `REUSE_MIN` tokens or more; else the lowest free id, which keeps the live ids
        consecutive (one pass over the weights a step) and fails over to the oldest cache
        (every chat prompt shares a short system prefix: not worth a second pass)."""

        def worth(slot: Slot) -> tuple[int, int]:
            shared = _common_prefix(slot.tokens, prompt, len(prompt) - 1)
            return (shared if shared >= REUSE_MIN else 0, -slot.seq)

        best = max(self._free, key=worth)
        self._free.remove(best)
        return best

    def _step(self, ready: list[Live]) -> None:
        """One step: pieces of prompts (and of the engine's own writes: a call's
        opening) in one decode each, from a budget shared in admission order, the oldest
        first and never starved; then a batched decode of every decoding response's
        next token.

        Prompt pieces are decoded apart from the one-token rows, and are MIN_PIECE
        tokens or a prompt's rest: llama.cpp's CPU kernels round differently by a
        ubatch's shape, and a batch that mixed them would be split by llama.cpp into a
        ubatch of one token of every sequence and one of the rest (a prompt read partly
        token by token), so a response's greedy text would depend on its neighbours."""
        budget = self._chunk
        first = True
        started = time.monotonic()
        read = False
        for r in ready:
            left = len(r.feed.tokens) - r.at
            if left <= 1 or r.ended:
                continue
            take = min(left, max(budget, MIN_PIECE) if first else budget)
            if take < left and take < MIN_PIECE:
                continue  # its piece waits for a later step
            first, read = False, True
            budget -= take
            if not self._decode([r], [take]):
                return  # deferred work, aborted for an interactive response
        if read:
            # Adapt to this machine and its load: halve the prompt budget of a step whose
            # pieces took too long, double one that was quick (bounded both ways).
            took = time.monotonic() - started
            if took > PREFILL_CHUNK_SECONDS and self._chunk > MIN_PIECE:
                self._chunk //= 2
            elif took < PREFILL_CHUNK_SECONDS / 3 and self._chunk < MAX_CHUNK:
                self._chunk *= 2
        # Then the one-token rows. A new response's first token was sampled as its
        # prompt's last piece was read: one prefill after the step it arrived in. (A
        # feed that a piece's end just made waits for its credit until the next step.)
        singles = [
            r
            for r in ready
            if not r.ended and len(r.feed.tokens) - r.at == 1 and (r.credited or not r.feed.credit)
        ]
        if singles:
            self._decode(singles, [1] * len(singles))

    def _decode(self, runs: list[Live], takes: list[int]) -> bool:
        """Evaluate `takes[i]` tokens of `runs[i]`'s feed in one llama_decode; resume each
        whose feed is then complete (its logits are valid until the next decode). False
        when the decode was aborted (`Deferral`): nothing of it happened."""
        order = sorted(range(len(runs)), key=lambda i: runs[i].slot.seq)  # consecutive ids
        batch = self._batch
        n = 0
        rows: list[tuple[Live, int, int]] = []  # (response, tokens taken, logits row)
        for i in order:
            r, take = runs[i], takes[i]
            tokens, seq, at = r.feed.tokens, r.slot.seq, r.at
            pos = len(r.slot.tokens)
            for j in range(take):
                batch.token[n] = tokens[at + j]
                batch.pos[n] = pos + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = 0
                n += 1
            row = -1
            if at + take == len(tokens):
                row = n - 1
                batch.logits[row] = 1
            rows.append((r, take, row))
        batch.n_tokens = n
        code = llama_cpp.llama_decode(self._ctx, batch)
        if code == ABORTED:
            if self.deferral.aborted(code):
                return False
            code = llama_cpp.llama_decode(self._ctx, batch)  # a stale abort: again
        if code != 0:
            # No KV slot (1) cannot happen (every slot has its full context); anything
            # else is llama.cpp failing: the responses of this batch fail, their caches go.
            for r, _, _ in rows:
                llama_cpp.llama_memory_seq_rm(self._mem, r.slot.seq, -1, -1)
                r.slot.tokens.clear()
                self._finish(r, EngineError(f"local engine failed: llama_decode returned {code}"))
            return True
        width = len(self._live)
        for r, take, row in rows:
            r.slot.tokens.extend(r.feed.tokens[r.at : r.at + take])
            r.at += take
            trace = r.chan.trace
            if width > trace.batched:
                trace.batched = width
            if row >= 0:
                self._advance(r, row)
        return True

    def _advance(self, r: Live, row: int | None) -> bool:
        """Resume `r`'s generation with its logits row; False when it ended."""
        try:
            r.feed = r.run.send(row)  # type: ignore[arg-type]  # None starts it
        except StopIteration:
            self._finish(r, None)
            return False
        except Exception as exc:
            self._finish(r, _failure(exc))
            return False
        r.at, r.credited = 0, False
        return True

    def _drop(self, r: Live) -> None:
        """A stopped response: dropped before its next step."""
        trace = r.chan.trace
        if trace.aborted_at is None:
            trace.aborted_at = time.time()
        if trace.prompt_read_at is None:
            trace.aborted_in_prefill = True
        self._finish(r, None)

    def _finish(self, r: Live, error: EngineError | None) -> None:
        r.ended = True
        r.run.close()  # a generation stopped at a yield frees its sampler chain
        if error is not None:
            r.chan.put(error)
        r.chan.end()
        self._live.remove(r)
        self._free.append(r.slot)

    def _free_context(self) -> None:
        if self._ctx is not None:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
            self._worker.ctx = None


def _is_deferred(request: Generation, now: float) -> bool:
    return request.defer_until is not None and now < request.defer_until


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n, top = 0, min(len(a), len(b), limit)
    while n < top and a[n] == b[n]:
        n += 1
    return n


def _failure(exc: Exception) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    # Any llama.cpp failure fails the run, never the server.
    return EngineError(f"local engine failed: {type(exc).__name__}: {exc}")
