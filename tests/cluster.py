"""A scaled-out tether for tests: API replicas (`tether serve --workers 0`) and workers
(`tether worker`), all real processes on one PostgreSQL database and one Redis prefix."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import openai

from conftest import Server, free_port, wait_for


class RoundRobin(httpx.BaseTransport):
    """A load balancer in the client: each request goes to the next API replica."""

    def __init__(self, ports: list[int]) -> None:
        self._ports = itertools.cycle(ports)
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(port=next(self._ports))
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


class Cluster:
    """`apis` API replicas and `workers` workers sharing `db` (PostgreSQL) and Redis."""

    def __init__(
        self,
        tmp: Path,
        db: str,
        redis: str,
        prefix: str,
        *,
        apis: int = 2,
        workers: int = 2,
        args: tuple[str, ...] = (),
        worker_args: tuple[str, ...] = (),
    ) -> None:
        shared = [
            "--redis",
            redis,
            "--redis-prefix",
            prefix,
            "--engine",
            "scripted",
            "--debug-routes",
            *args,
        ]
        self.apis = [Server(db, [*shared, "--workers", "0"], log_dir=tmp) for _ in range(apis)]
        self.workers = [
            Server(db, [*shared, *worker_args], command="worker", log_dir=tmp)
            for _ in range(workers)
        ]
        self._next_api = itertools.cycle(self.apis)

    @property
    def processes(self) -> list[Server]:
        return [*self.apis, *self.workers]

    def start(self) -> None:
        for process in self.processes:
            process.spawn()
        for process in self.processes:
            process.wait_ready()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for process in self.processes:
            if process.proc is not None and process.proc.poll() is None:
                process.proc.send_signal(sig)
        for process in self.processes:
            process.stop(sig)

    # The parts of `Server` the end-to-end tests use, so they run unchanged on a cluster.

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def base_url(self) -> str:
        """Each use names the next API replica, as a load balancer would."""
        return next(self._next_api).base_url

    @property
    def url(self) -> str:
        return next(self._next_api).url

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """A client whose requests alternate between the API replicas."""
        http = httpx.Client(
            transport=RoundRobin([a.port for a in self.apis]), timeout=httpx.Timeout(60, connect=5)
        )
        return openai.OpenAI(
            base_url=self.base_url,
            api_key="test",
            max_retries=0,
            http_client=http,
            _strict_response_validation=True,
            **kwargs,
        )

    def runner(self, response_id: str) -> Server:
        """The worker whose engine ran `response_id`."""
        for worker in self.workers:
            if worker.proc is None:
                continue
            r = httpx.get(f"{worker.url}/debug/engine/{response_id}", timeout=5)
            if r.status_code == 200:
                return worker
        raise LookupError(f"no worker ran {response_id}")

    def trace(self, response_id: str) -> dict[str, object] | None:
        """The engine trace of `response_id`; None if no live worker ran it (it was
        cancelled before a worker took it, or its worker restarted since)."""
        try:
            return self.runner(response_id).trace(response_id)
        except LookupError:
            return None


class PrivateRedis:
    """A Redis server of the test's own, so the test can stop and restart it without
    touching the machine's (or another test's) Redis. It keeps nothing on disk, like a
    cache that restarts empty."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=(self.tmp / f"redis.{self.port}.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self._up, 10, "redis-server to start")

    def _up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb in a temporary folder, a free port),
    so the test can restart it. As root, the server runs as the `postgres` user."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tether-pg-"))
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        found = shutil.which("pg_ctl")
        self.bin = bins[-1] if bins else Path(found).parent if found else None
        if self.bin is None:
            raise RuntimeError("PostgreSQL server binaries not found")
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [
                *self.as_user,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.dir / "data"),
                "-l",
                str(self.dir / "log"),
                *args,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )

    def start(self) -> None:
        if not (self.dir / "data").exists():
            subprocess.run(
                [
                    *self.as_user,
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.dir / "data"),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=120,
            )
        self._ctl(
            "-w", "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start"
        )

    def stop(self) -> None:
        self._ctl("-w", "-m", "immediate", "stop")

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
