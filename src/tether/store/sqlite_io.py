"""Writing to SQLite when writes can fail (a full disk, an I/O error).

A failed write is never reported as done (docs/contract.md §8.7): every write goes through
`transaction` or `write`, which roll back what they began and turn SQLite's error into the
store's own — `StoreFull` (507) for a full disk, `StoreUnavailable` (503) for I/O and lock
errors — so the caller, and the client behind it, learn of it. The WAL checkpoint runs in
a thread that outlives such errors and resumes when the disk has room again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any

from tether.store.base import StoreFull, StoreUnavailable

log = logging.getLogger("tether.store")

# Primary result codes (the low byte of an extended code) of errors that say the database
# cannot be written *now*; anything else (a constraint, a bug in a statement) is raised as is.
_FULL = sqlite3.SQLITE_FULL
_TRANSIENT = {
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL,
}


def store_error(exc: BaseException) -> StoreUnavailable | None:
    """The store error a failed SQLite call means, or None if it is not about the
    database being writable (then the original error is the one to raise)."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code == _FULL:
        return StoreFull(f"the database's disk is full: {exc}")
    if code in _TRANSIENT:
        return StoreUnavailable(f"the database cannot be written: {exc}")
    return None


class transaction:
    """`BEGIN IMMEDIATE` … `COMMIT`, rolled back on any error (nothing half-written);
    SQLite's can't-write errors come out as `StoreFull` / `StoreUnavailable`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            _translated(exc)
            raise

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error as failed:
                self._rollback()
                _translated(failed)
                raise
            return
        self._rollback()
        _translated(exc)  # else the error from the block goes on as it is

    def _rollback(self) -> None:
        # SQLite may have rolled the transaction back itself (a full disk can do that):
        # a second ROLLBACK would fail and hide the error that matters.
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("rollback failed", exc_info=True)


def write(db: sqlite3.Connection, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
    """One statement that writes, in its own implicit transaction."""
    try:
        return db.execute(sql, args)
    except sqlite3.Error as exc:
        _translated(exc)
        raise


def _translated(exc: BaseException) -> None:
    """Raise the store's error for `exc` if it has one."""
    error = store_error(exc)
    if error is not None:
        raise error from exc


class Trouble:
    """Says once that something keeps failing, and once that it works again, instead of
    logging every failure of a loop that retries many times a second."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self.count = 0

    def failed(self, exc: BaseException) -> None:
        self.count += 1
        if self.since is None:
            self.since = time.monotonic()
            expected = isinstance(exc, StoreUnavailable) or store_error(exc) is not None
            log.error("%s failed (%s); retrying", self.what, exc, exc_info=not expected)

    def worked(self) -> None:
        if self.since is not None:
            log.warning(
                "%s works again after %.1f s (%d failures)",
                self.what,
                time.monotonic() - self.since,
                self.count,
            )
            self.since, self.count = None, 0


CATCH_UP_FRAMES = 1000  # a WAL this long (pages; about 4 MB) must start over


class Checkpointer(threading.Thread):
    """Checkpoints the WAL every `interval` seconds from its own connection. An error (a
    full disk: the database file cannot grow) is retried at the next tick: the thread lives
    as long as the store, or the WAL would grow without bound.

    Under sustained writes that is not enough: SQLite starts the WAL over only when a write
    begins with every frame checkpointed, and the event loop commits new frames while this
    thread copies the old ones, so the WAL would never restart and would grow by megabytes
    a second. When the WAL is long, the thread asks the writer to `catch_up`: one more
    checkpoint on the writer's own connection, between two of its commits, copies just the
    frames written meanwhile, and the writer's next commit starts the WAL over."""

    # Not more often: a checkpoint that copies every frame makes the writer's next commit
    # start the WAL over, which syncs the WAL file on the event loop: a stall of
    # milliseconds, four times a second when this was 0.25 s.
    def __init__(self, path: str, interval: float = 1.0) -> None:
        super().__init__(name="tether-sqlite-checkpoint", daemon=True)
        self.path = path
        self.interval = interval
        self._stopped = threading.Event()
        self.trouble = Trouble("the WAL checkpoint")
        self.catch_up_wanted = False  # set by this thread, read by the writer
        self._catching_up = Trouble("the WAL catch-up checkpoint")

    def catch_up(self, db: sqlite3.Connection) -> None:
        """On the writer's thread, between commits: the checkpoint's last stretch."""
        self.catch_up_wanted = False
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # a full disk: the thread's next tick tries again
            self._catching_up.failed(exc)
            return
        self._catching_up.worked()

    def run(self) -> None:
        db: sqlite3.Connection | None = None
        wait = self.interval
        try:
            while not self._stopped.wait(wait):
                wait = self.interval
                try:
                    if db is None:
                        db = sqlite3.connect(
                            self.path, isolation_level=None, check_same_thread=False
                        )
                        db.execute("PRAGMA busy_timeout=5000")
                    frames = _checkpoint(db)
                    if frames >= CATCH_UP_FRAMES:
                        # Copy what was written during the last pass until that is little,
                        # so that the writer's catch-up is short; and look again sooner.
                        for _ in range(8):
                            newer = _checkpoint(db)
                            if newer - frames < CATCH_UP_FRAMES // 10:
                                break
                            frames = newer
                        self.catch_up_wanted = True
                        wait = self.interval / 5
                    self.trouble.worked()
                except Exception as exc:  # the thread must outlive any error
                    self.trouble.failed(exc)
        finally:
            if db is not None:
                db.close()

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def _checkpoint(db: sqlite3.Connection) -> int:
    """A passive checkpoint: how many frames the WAL held when it began."""
    _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(frames)
