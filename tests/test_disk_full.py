"""A full disk under a live server (docs/contract.md §1.2, §8.7; issue 14, item 1).

The SQLite database lives on a small tmpfs the test mounts (it needs root, or `sudo -n`).
Streams run; the test fills the filesystem with a file, makes creates while it is full,
then deletes the file. Every response ends (`failed` or `completed`) with its log's deltas,
its final text and `usage.output_tokens` agreeing; every stream gets its terminal event;
the creates made while the disk was full get 507 (or 503) with `Retry-After`; and once
space is back, further responses all complete (the WAL checkpoint survived).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server, raw_events, wait_for
from invariants import Seen, check_response

# The tmpfs: the database, its WAL and the filler (a WAL that never restarts outgrows it).
DISK_BYTES = 48 << 20
RATE, LENGTH = 500, 2000  # scripted tokens per second, tokens per response
STREAMS = 4  # streams running when the disk fills
AFTER = 8  # responses made once space is back: all must complete
LEASE = 30.0  # the server's default --lease-timeout


def _as_root(*cmd: str) -> subprocess.CompletedProcess[bytes]:
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    return subprocess.run([*prefix, *cmd], capture_output=True, timeout=30, check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of `DISK_BYTES` mounted on a fresh folder, unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    done = _as_root(
        "mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=1777", "tmpfs", str(folder)
    )
    if done.returncode != 0:
        why = f"cannot mount a tmpfs (needs root or sudo -n): {done.stderr.decode().strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    try:
        yield folder
    finally:
        if _as_root("umount", str(folder)).returncode != 0:
            _as_root("umount", "-l", str(folder))  # a straggling process: detach it


def fill(folder: Path) -> Path:
    """Write a file until the filesystem has no byte left."""
    path = folder / "filler"
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            while True:
                try:
                    f.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return path


class Stream(threading.Thread):
    """One `POST /v1/responses` with `stream: true`, read raw to its end."""

    def __init__(self, server: Server, prompt: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.base_url}/responses"
        self.prompt = prompt
        self.seen = Seen(after=-1)
        self.status: int | None = None
        self.flowing = threading.Event()  # some deltas arrived

    @property
    def rid(self) -> str:
        return str(self.seen.events[0]["response"]["id"])

    def run(self) -> None:
        body = {"model": "scripted", "input": self.prompt, "stream": True}
        with httpx.stream("POST", self.url, json=body, timeout=60) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    self.seen.done = True
                elif line.startswith("data: "):
                    self.seen.events.append(json.loads(line[6:]))
                    if len(self.seen.events) > 50:
                        self.flowing.set()


def create(server: Server) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/responses",
        timeout=30,
        json={"model": "scripted", "input": "while full", "background": True},
    )


def wait_ended(server: Server, rid: str) -> None:
    def ended() -> bool:
        r = httpx.get(f"{server.base_url}/responses/{rid}", timeout=10)
        return r.json()["status"] not in ("queued", "in_progress")

    wait_for(ended, 30, f"{rid} to end")


def check(server: Server, rid: str, readers: list[Seen]) -> dict[str, Any]:
    """The response's log, final text and usage agree (§1.2); its readers saw the log."""
    log = raw_events(server, rid)
    check_response(server.base_url, rid, log, readers, [], None)
    final: dict[str, Any] = log[-1]["response"]
    deltas = [e["delta"] for e in log if e["type"] == "response.output_text.delta"]
    assert final["usage"]["output_tokens"] == len(deltas), rid
    return final


def test_a_full_disk_loses_nothing_silently(small_disk: Path) -> None:
    server = Server(
        small_disk / "tether.db",
        ["--engine", "scripted", "--scripted-rate", str(RATE), "--scripted-length", str(LENGTH)],
        log_dir=small_disk.parent,
    )
    server.start()
    try:
        streams = [Stream(server, f"stream {i}") for i in range(STREAMS)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.flowing.wait(30), "the streams did not start"

        # The disk fills during the streams: creates get 507/503 with Retry-After.
        filler = fill(small_disk)
        refused: list[httpx.Response] = []
        created: list[str] = []  # a create that still found room (the WAL's own space)

        def refused_one() -> bool:
            r = create(server)
            if r.status_code == 200:
                created.append(r.json()["id"])
                return False
            refused.append(r)
            return True

        wait_for(refused_one, 20, "a create refused while the disk is full")
        for _ in range(5):
            refused_one()
            time.sleep(0.1)  # creates spread over the full period
        for r in refused:
            assert r.status_code in (503, 507), (r.status_code, r.text)
            assert r.headers.get("retry-after"), r.headers
            assert r.json()["error"]["type"] == "server_error"
            if r.status_code == 507:
                assert r.json()["error"]["code"] == "insufficient_storage"
        assert len(refused) >= 6, [r.status_code for r in refused]
        # Reads still work while the disk is full.
        assert httpx.get(f"{server.base_url}/responses/{streams[0].rid}").status_code == 200

        # Space comes back: every stream ends with its terminal event, within the lease.
        filler.unlink()
        deadline = time.monotonic() + LEASE
        for s in streams:
            s.join(max(deadline - time.monotonic(), 0))
            assert not s.is_alive(), f"{s.rid}: no terminal event after space came back"
            assert s.status == 200 and s.seen.done, s.rid
        finals = [check(server, s.rid, [s.seen]) for s in streams]
        assert {f["status"] for f in finals} <= {"failed", "completed"}, finals
        failed = [f for f in finals if f["status"] == "failed"]
        assert failed, "no stream lost a write: the disk filled too late to tell"
        assert all(f["error"]["code"] == "server_error" for f in failed), failed
        for rid in created:
            wait_ended(server, rid)
            check(server, rid, [])

        # Sustained writes work again: every later response completes in full.
        after = [Stream(server, f"after {i}") for i in range(AFTER)]
        for s in after:
            s.start()
        for s in after:
            s.join(60)
            assert not s.is_alive() and s.seen.done, "a stream after recovery hung"
        for s in after:
            final = check(server, s.rid, [s.seen])
            assert final["status"] == "completed", (s.rid, final.get("error"))
            assert final["usage"]["output_tokens"] == LENGTH, s.rid
    finally:
        server.stop()
    log = server.log.read_text() if server.log is not None else ""
    # No write failure went to a loop callback or killed a thread (issue 14's symptoms).
    assert "Exception in callback" not in log, log[-3000:]
    assert "Exception in thread" not in log, log[-3000:]
