"""Owner locks (`tether.store.owners`): a lock proves its owner alive, its release proves
it gone. Locks are per open file, so two `OwnerLocks` in one process behave like two
processes; tests/test_lifecycle_restart.py kills real ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tether.store.owners import OwnerLocks


def test_a_held_lock_is_never_taken_and_a_released_one_is(tmp_path: Path) -> None:
    alive, other = OwnerLocks(tmp_path), OwnerLocks(tmp_path)
    alive.hold("a")
    other.hold("b")
    assert other.gone() == [] and alive.gone() == []
    alive.release()  # as the kernel does when its process dies
    assert other.gone() == ["a"]
    third = OwnerLocks(tmp_path)
    assert third.gone() == []  # `other` holds a's lock while it recovers a's responses
    other.forget("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.lock"]
    assert third.gone() == [] and other.gone() == []
    other.release()
    assert third.gone() == ["b"]


def test_a_killed_process_is_gone(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib; from tether.store.owners import "
            "OwnerLocks; OwnerLocks(pathlib.Path(sys.argv[1])).hold('child'); print('held', "
            "flush=True); sys.stdin.read()",
            str(tmp_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"held\n"
        me = OwnerLocks(tmp_path)
        assert me.gone() == []
        child.kill()
        child.wait(10)
        assert me.gone() == ["child"]
    finally:
        child.kill()
        child.wait(10)
