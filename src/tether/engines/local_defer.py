"""Deferred responses in the embedded engine's batch scheduler (`local_batch`): which of
them decode in a step, and how an interactive response arriving takes over at once.

A deferred response (`Generation.defer_until` ahead: a `2h`/`8h` completion window,
`tether.schedule`) decodes only when no interactive response is in the engine (strict
priority: on a CPU a batched step of 8 costs nearly 8 steps' compute, so sharing a step
would slow the interactive one). While one is, the deferred ones pause between steps,
their KV cache kept, and go on when it ends. Once its `defer_until` has passed a
deferred response counts as interactive: never paused again.

Beyond that, an interactive response never waits for deferred work:

- *announced*: the worker tells the engine as soon as an interactive response is queued
  (`expect`), and deferred decoding holds from then until it is admitted (`HOLD_SECONDS`
  at most: a hint that may never come), so the cores are free while the request goes
  through HTTP, the store and the run slot;
- *aborted*: a step of deferred work in flight when that happens is aborted by llama.cpp
  (its abort callback is checked between graph nodes; llama.cpp then removes the
  step's tokens from the KV cache, so the step is simply made again later);
- *short*: with only deferred work, one deferred response decodes a step, in turn.

The abort callback is libc's `strlen` on a one-byte flag: it runs on llama.cpp's threads
for every graph node, so it must not need the GIL (a ctypes callback would).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Sequence
from typing import Any, Protocol

import llama_cpp

#: the longest deferred work holds for an announced interactive response
HOLD_SECONDS = 0.5
ABORTED = 2  # llama_decode's return code for an aborted decode


class Deferrable(Protocol):
    defer_until: float | None
    ended: bool


def _deferred(r: Deferrable, now: float) -> bool:
    return r.defer_until is not None and now < r.defer_until


class Deferral:
    """The deferred-work policy of one scheduler and its llama.cpp context. `expect` is
    called on any thread holding the scheduler's condition; the rest on its thread."""

    def __init__(self, ctx: Any) -> None:
        self._hold_until = 0.0  # time.monotonic(): deferred work holds until then
        self._turn = 0  # whose turn it is among deferred responses decoding alone
        self._abortable = False  # the step in flight is deferred work only
        self._flag = ctypes.create_string_buffer(2)  # b"\x01": abort the decode
        self.aborts = 0  # steps of deferred work aborted (for tests and benchmarks)
        strlen = ctypes.CDLL(ctypes.util.find_library("c") or None).strlen
        self._callback = ctypes.cast(strlen, llama_cpp.ggml_abort_callback)
        llama_cpp.llama_set_abort_callback(
            ctx, self._callback, ctypes.cast(self._flag, ctypes.c_void_p)
        )
        _quiet_aborts()

    def expect(self) -> None:
        """(holding the condition) An interactive response is on its way."""
        self._hold_until = time.monotonic() + HOLD_SECONDS
        if self._abortable:
            self._flag.value = b"\x01"

    def arrived(self) -> None:
        """An interactive response was admitted: it holds deferred work by itself now."""
        self._hold_until = 0.0

    def pick(self, ready: list[Any], live: Sequence[Deferrable]) -> list[Any]:
        """`ready` without the deferred responses while an interactive one is in the
        engine or announced; with only deferred work, one of them, in turn."""
        now = time.time()
        held = [r for r in ready if _deferred(r, now)]
        if not held:
            return ready
        if time.monotonic() < self._hold_until or any(
            not r.ended and not _deferred(r, now) for r in live
        ):
            return [r for r in ready if r not in held]
        # Only deferred work: one response a step, in turn. A step's cost grows with its
        # rows; on a CPU batching gains little, so short steps cost the backlog little.
        self._turn += 1
        return [held[self._turn % len(held)]]

    def timeout(self, live: Sequence[Deferrable]) -> float | None:
        """How long a scheduler with nothing ready may sleep: until a hold ends or a
        deferred response's deadline passes (it may then decode beside the others)."""
        now = time.time()
        waits = [r.defer_until - now for r in live if r.defer_until is not None and not r.ended]
        hold = self._hold_until - time.monotonic()
        waits += [hold] if hold > 0 else []
        waits = [w for w in waits if w > 0]
        return min(waits) if waits else None

    def begin(self, ready: Sequence[Deferrable]) -> bool:
        """Before a step of `ready`: False when it should not be made after all (deferred
        work only, and an interactive response was announced just now)."""
        now = time.time()
        if not all(_deferred(r, now) for r in ready):
            return True
        # In this order against `expect` (which sets the hold, then reads `_abortable`):
        # either it sees this step abortable and aborts it, or the hold is seen here.
        self._flag.value = b""
        self._abortable = True
        if time.monotonic() < self._hold_until:
            self._abortable = False
            return False
        return True

    def end(self) -> None:
        self._abortable = False

    def aborted(self, code: int) -> bool:
        """Whether a decode that returned `code` was aborted on purpose (its step is
        dropped). A stale abort (flagged as a deferred step ended) is cleared: the decode
        is to be made again, llama.cpp having removed its tokens."""
        if code != ABORTED:
            return False
        self._flag.value = b""
        if self._abortable:
            self.aborts += 1
            return True
        return False


_installed: list[Any] = []  # the log callback, kept alive


def _quiet_aborts() -> None:
    """llama.cpp logs an error line for each aborted decode ("removing memory module
    entries"): expected here, so dropped; every other line goes to llama-cpp-python's
    own callback."""
    if _installed:
        return
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if text.startswith(b"decode: removing memory module entries"):
            return
        _logger.llama_log_callback(level, text, user_data)

    _installed.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
