"""Start and stop a server subprocess for the benchmarks (loopback only).

    with tether_server(rate=100, length=200) as srv:
        srv.base_url   # http://127.0.0.1:PORT/v1  (for openai.AsyncOpenAI)
        srv.url        # http://127.0.0.1:PORT
        srv.pid        # for py-spy

`tether_server` runs `python -m tether serve --engine scripted --debug-routes` (or
`--engine local`) on a free port with a database in a fresh temp directory; `Server(cmd)`
runs any command that takes `{port}` in its arguments and serves `GET /health`
(bench/bare_relay.py does). Startup waits by polling `/health`; shutdown sends SIGTERM,
then SIGKILL after a timeout. The server's output goes to a log file whose tail is shown
if it fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    """The environment for a child: the repo's `src` importable even if not installed."""
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Server:
    """One server subprocess. `cmd` may contain `{port}`, replaced by a free port."""

    def __init__(
        self, cmd: Sequence[str], *, workdir: Path | None = None, name: str = "server"
    ) -> None:
        self.port = free_port()
        self.cmd = [part.replace("{port}", str(self.port)) for part in cmd]
        self.name = name
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"tether-bench-{name}-"))
        self.log = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> Server:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)  # a starting process has nothing to wait on but a poll
        self.stop()
        raise TimeoutError(f"{self.name} did not answer /health in {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Server:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()


def tether_cmd(
    *,
    rate: float,
    length: int,
    db: str = "bench.db",
    extra: Sequence[str] = (),
    engine: str = "scripted",
) -> list[str]:
    """`tether serve` with debug routes; `engine="local"` serves the embedded model (the
    scripted rate and length are then not passed)."""
    scripted = ["--scripted-rate", str(rate), "--scripted-length", str(length)]
    return [
        sys.executable,
        "-m",
        "tether",
        "serve",
        "--engine",
        engine,
        "--db",
        db,
        "--host",
        HOST,
        "--port",
        "{port}",
        "--debug-routes",
        *(scripted if engine == "scripted" else []),
        *extra,
    ]


@contextlib.contextmanager
def tether_server(
    *,
    rate: float = 100.0,
    length: int = 200,
    extra: Sequence[str] = (),
    keep: bool = False,
    engine: str = "scripted",
) -> Iterator[Server]:
    """A tether (scripted engine unless `engine`) on a free port, with a temp database
    (removed unless `keep`)."""
    srv = Server(tether_cmd(rate=rate, length=length, extra=extra, engine=engine), name="tether")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        if keep:
            print(f"(kept server files in {srv.workdir})")
        else:
            srv.cleanup()


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on a uvloop loop when uvloop is installed (as it is with tether)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) used so far by process `pid` (default: this process)."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    """Cores and load average: other work on the machine skews every number here."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, load average {load} (before the run)"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table, columns padded."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]
