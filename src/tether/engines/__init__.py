"""Engines: the embedded model, the scripted test engine, and upstream servers."""

from __future__ import annotations

# llama.cpp's OpenMP threads wait for the next token step with libgomp's default: a short
# spin (GOMP_SPINCOUNT 300,000), then sleep. That default is kept on purpose. Sleeping at
# once (OMP_WAIT_POLICY=PASSIVE, which tether set before) made every token step a futex
# wake-up: one stream through `tether serve` on a quiet 2-core machine ran at ~35 tokens/s
# against ~90-100 with the default (llama.cpp alone: ~110-130), while it gained only ~25%
# beside a process hogging a core. On a machine shared with busy processes an operator can
# still set OMP_WAIT_POLICY=PASSIVE (read when llama.cpp is first loaded).
from tether.config import UpstreamConfig
from tether.engines.base import Engine


def make_engine(
    kind: str,
    *,
    scripted_rate: float = 100.0,
    scripted_length: int = 200,
    upstreams: list[UpstreamConfig] | None = None,
) -> Engine:
    """Build the engine named on the command line plus one per upstream (imports only
    what they need). Several engines are put behind a `Router`."""
    engines: list[Engine] = []
    if kind == "scripted":
        from tether.engines.scripted import ScriptedEngine

        engines.append(ScriptedEngine(rate=scripted_rate, length=scripted_length))
    elif kind == "local":
        from tether.engines.local import LocalEngine

        engines.append(LocalEngine())
    elif kind != "none":
        raise ValueError(f"unknown engine {kind!r} (choose local, scripted or none)")
    for spec in upstreams or []:
        if spec.kind == "chat":
            from tether.engines.chat import ChatEngine

            engines.append(ChatEngine(spec))
        else:
            from tether.engines.responses import ResponsesEngine

            engines.append(ResponsesEngine(spec))
    if not engines:
        raise ValueError("no engine: choose --engine local or scripted, or add --upstream")
    if len(engines) == 1:
        return engines[0]
    from tether.engines.router import Router

    return Router(engines)
