"""Engines: the embedded model, the scripted test engine, and upstream servers."""

from __future__ import annotations

import os

# llama.cpp's OpenMP threads spin while they wait for work by default: on a machine
# shared with other processes that burns the CPU the model needs (measured: prompt
# reading 4x slower under load). Set before llama.cpp is first loaded (by the local
# engine or a chat upstream's tokenizer); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
