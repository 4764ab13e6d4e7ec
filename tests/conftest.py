"""Fixtures: a real `tether serve` subprocess and the real `openai` clients talking to it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import spec
from waiting import free_port as free_port
from waiting import wait_for as wait_for  # (re-exported: tests import both from here)

spec.install()  # every reply of every tether server the tests start meets the specs


def read_deltas(stream: Any, n: int) -> tuple[str, list[Any]]:
    """Iterate an SDK stream until `n` text deltas arrived: (response id, events so far)."""
    rid, events = "", []
    for event in stream:
        events.append(event)
        if event.type == "response.created":
            rid = event.response.id
        if sum(e.type == "response.output_text.delta" for e in events) == n:
            break
    return rid, events


@dataclass
class Server:
    """One `tether serve` process (or `tether worker`: `command="worker"`); `restart()`
    keeps the database. `db` is a SQLite file, or a `postgresql://` URL with `log_dir`."""

    db: Path | str
    args: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    command: str = "serve"
    log_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = 60.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it (several start at once)."""
        stamp = f"{self.command}.{self.port}.{int(time.time() * 1000)}.log"
        self.log = (
            self.log_dir / stamp
            if self.log_dir is not None
            else Path(self.db).with_suffix(f".{stamp}")
        )
        cmd = [
            sys.executable,
            "-m",
            "tether",
            self.command,
            "--port",
            str(self.port),
            "--db",
            str(self.db),
            *self.args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        spec.TETHER_PORTS.add(self.port)  # its every reply is checked against the specs

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc is not None and self.log is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # polling a starting process: no event to wait on
        raise TimeoutError(f"server did not start: {self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        # Its port may next be given to another kind of server (a fake upstream), whose
        # replies are not tether's to check.
        spec.TETHER_PORTS.discard(self.port)
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, **kwargs: object) -> openai.OpenAI:
        """The strict SDK client, whose every reply is checked against the specs as it
        passes (`spec.ValidatingTransport`)."""
        kwargs.setdefault(
            "http_client", openai.DefaultHttpxClient(transport=spec.ValidatingTransport())
        )
        return openai.OpenAI(
            base_url=self.base_url,
            api_key="test",
            max_retries=0,
            _strict_response_validation=True,
            **kwargs,
        )  # type: ignore[arg-type]

    def async_client(self, **kwargs: object) -> openai.AsyncOpenAI:
        kwargs.setdefault(
            "http_client", openai.DefaultAsyncHttpxClient(transport=spec.AsyncValidatingTransport())
        )
        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key="test",
            max_retries=0,
            _strict_response_validation=True,
            **kwargs,
        )  # type: ignore[arg-type]

    def trace(self, response_id: str) -> dict[str, object]:
        """What the scripted engine did for a response (needs --debug-routes)."""
        r = httpx.get(f"{self.url}/debug/engine/{response_id}", timeout=5)
        r.raise_for_status()
        data: dict[str, object] = r.json()
        return data


@contextlib.contextmanager
def served(folder: Path, *args: str) -> Iterator[Server]:
    """A `tether serve` on a database in `folder`, stopped afterwards: the body of a
    module-scoped server fixture (`with served(tmp_path_factory.mktemp(...), ...)`)."""
    server = Server(folder / "tether.db", list(args))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[object]:
    """Start servers with extra flags: `make_server("--scripted-rate", "50")`."""
    servers: list[Server] = []

    def make(*args: str, db: Path | None = None, engine: str = "scripted") -> Server:
        server = Server(
            db or tmp_path / f"tether-{len(servers)}.db",
            ["--engine", engine, "--debug-routes", *args],
        )
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server) -> Server:  # type: ignore[no-untyped-def]
    """A scripted server at 100 tokens/s, 200 tokens per response."""
    return make_server()  # type: ignore[no-any-return]


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with server.client() as c:
        yield c


@pytest.fixture(autouse=True)
def spec_violations() -> Iterator[None]:
    """Fails a test whose clients received anything the specs do not allow, also when
    the client turned it into an error the test expected (`spec.ValidatingTransport`)."""
    spec.VIOLATIONS.clear()
    spec.CHECKED.clear()
    yield
    found, spec.VIOLATIONS[:] = list(spec.VIOLATIONS), []
    assert not found, f"replies that break the specs: {found}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


if os.environ.get("CI") == "true":
    os.environ.setdefault("TETHER_REQUIRE_SERVICES", "1")


def raw_events(
    server: Server, response_id: str, starting_after: int | None = None, timeout: float = 30.0
) -> list[dict[str, object]]:
    """Read `GET ?stream=true` as raw JSON events (the SDK raises on `error` events)."""
    import json

    params = {"stream": "true"}
    if starting_after is not None:
        params["starting_after"] = str(starting_after)
    with (
        httpx.Client(transport=spec.HttpxValidatingTransport()) as http,
        http.stream(
            "GET", f"{server.base_url}/responses/{response_id}", params=params, timeout=timeout
        ) as r,
    ):
        r.raise_for_status()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]
