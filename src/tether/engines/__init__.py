"""Engines: the embedded model, the scripted test engine, and (later) upstreams."""

from __future__ import annotations

from tether.engines.base import Engine


def make_engine(kind: str, *, scripted_rate: float = 100.0, scripted_length: int = 200) -> Engine:
    """Build the engine named on the command line (imports only what it needs)."""
    if kind == "scripted":
        from tether.engines.scripted import ScriptedEngine

        return ScriptedEngine(rate=scripted_rate, length=scripted_length)
    if kind == "local":
        from tether.engines.local import LocalEngine

        return LocalEngine()
    raise ValueError(f"unknown engine {kind!r} (choose local or scripted)")
