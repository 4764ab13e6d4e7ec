"""Owner locks: proof that a process on this machine is gone, from a lock it held.

On the embedded store every process that runs responses holds an exclusive `flock` on
its own file, `<db>.owners/<owner>.lock`, for as long as it lives. The kernel releases
that lock when the process ends, however it ends (SIGKILL and power-off included: the
lock is not on disk). So a process that can take another owner's lock knows that owner
is gone, at once and without a clock, and can recover its responses (docs/contract.md
§8.7) instead of waiting for their leases to run out. A live owner's lock cannot be
taken, so a live owner is never taken over this way; a hung one (stopped, not dead)
still loses its responses to the lease clock, as before.

Why `flock` and not `fcntl` record locks: `flock` locks belong to the open file, so two
opens in one process exclude each other too, and closing an unrelated descriptor does
not drop them. Files are opened close-on-exec, so a child process never inherits a lock.
The directory must be on a local filesystem (as SQLite's WAL mode requires anyway).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

SUFFIX = ".lock"


class OwnerLocks:
    """The owner lock files of one database (`directory`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._own: tuple[str, int] | None = None  # (owner, fd) of this process
        self._gone: dict[str, int] = {}  # owners proven gone: their locks, held here

    def hold(self, owner: str) -> None:
        """Take `owner`'s lock for as long as this process lives (or until `release`).
        The file is locked under a temporary name and then renamed, so nobody can see
        it unlocked and take a live owner for a dead one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{owner}{SUFFIX}"
        temp = path.with_suffix(".new")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: never contended
            os.rename(temp, path)
        except BaseException:
            os.close(fd)
            raise
        self._own = (owner, fd)

    def gone(self) -> list[str]:
        """Owners proven gone: every other owner whose lock this process could take (it
        keeps holding them until `forget`, so no other process recovers them too)."""
        own = self._own[0] if self._own else None
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return list(self._gone)
        for name in names:
            owner = name.removesuffix(SUFFIX)
            if owner in (name, own) or owner in self._gone:
                continue
            try:
                fd = os.open(self.directory / name, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # forgotten by another process meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # its process lives (or another one is recovering it)
                continue
            except BaseException:
                os.close(fd)
                raise
            self._gone[owner] = fd
        return list(self._gone)

    def forget(self, owner: str) -> None:
        """`owner`'s responses are recovered: remove its file, then drop its lock."""
        fd = self._gone.pop(owner, None)
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / f"{owner}{SUFFIX}")
        os.close(fd)

    def release(self) -> None:
        """Drop every lock (a stopping process). This process's file stays: the next one
        to start takes its lock, recovers what it left queued, and removes it."""
        for owner in list(self._gone):
            os.close(self._gone.pop(owner))
        if self._own is not None:
            os.close(self._own[1])
            self._own = None
