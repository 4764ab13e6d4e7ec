"""Run `python -m tether ...` under cProfile, profiling only between two signals.

    python bench/_profiled.py OUT.prof serve --engine none ...

SIGUSR1 starts the profiler, SIGUSR2 stops it and writes OUT.prof (uvicorn re-raises
SIGTERM after its shutdown, so a profile written at exit would never be). Used by
bench/profile_relay.py.
"""

from __future__ import annotations

import cProfile
import signal
import sys
import time
from typing import Any

# CPU time of the main thread (the event loop): a busy machine must not skew it.
profiler = cProfile.Profile(time.thread_time)


def start(*_: Any) -> None:
    profiler.enable()


def dump(*_: Any) -> None:
    profiler.disable()
    profiler.dump_stats(OUT)


OUT = sys.argv.pop(1)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, dump)
sys.argv[0] = "tether"
from tether.cli import main  # noqa: E402

main()
