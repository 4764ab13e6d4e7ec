"""Free loopback ports and waiting on a condition: shared by conftest and by helpers that
benchmarks import too (`redis_cluster.py`), so those need neither pytest nor conftest."""

from __future__ import annotations

import socket
import time
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy: server state has no push API."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)  # poll interval of a wait with a deadline
    raise AssertionError(f"timed out waiting for {what}")
