"""`--db-read`: finished logs replayed from a real streaming replica (`pg_replica.py`).

The test setup starts a PostgreSQL primary of its own (initdb in a temp dir, replication
allowed from loopback) and a hot standby made by `pg_basebackup -R` that streams from it,
on free ports (as the `postgres` user when the tests run as root: PostgreSQL refuses
root). The shared server on :5432 is left alone: its pg_hba allows no replication.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import asyncpg
import orjson
import pytest

from test_store_postgres import ev, record
from tether.store import make_store
from tether.store.postgres import PostgresStore

from conftest import Server, free_port, wait_for
from services import delete_prefix, prefix, redis_url, run

pytestmark = pytest.mark.anyio


@dataclass
class Pair:
    primary: str  # admin URLs (database `postgres`)
    standby: str

    def db(self, which: str, name: str) -> str:
        return getattr(self, which).rpartition("/")[0] + "/" + name


def _unavailable(why: str) -> NoReturn:
    """Skip locally; under CI a missing part fails, never skips."""
    if os.environ.get("CI") == "true":
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_basebackup"))
    if not found:
        _unavailable("PostgreSQL server binaries (initdb, pg_basebackup) are not installed")
    return os.path.dirname(found[-1])


def as_postgres() -> list[str]:
    """The prefix that runs a server binary as `postgres` when the tests run as root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        _unavailable("running as root without runuser: PostgreSQL will not start as root")
    return ["runuser", "-u", "postgres", "--"]


@contextlib.contextmanager
def streaming_pair() -> Iterator[Pair]:
    bindir = _bindir()
    root = os.geteuid() == 0
    as_pg = as_postgres()
    tmp = tempfile.mkdtemp(prefix="tether_replica_")
    if root:
        shutil.chown(tmp, "postgres")
    os.chmod(tmp, 0o700)
    ports = {"primary": free_port(), "standby": free_port()}
    started: list[str] = []

    def pg(tool: str, *args: str) -> None:
        subprocess.run(
            [*as_pg, f"{bindir}/{tool}", *args],
            check=True,
            capture_output=True,
            timeout=60,
            cwd=tmp,
        )

    def start(name: str) -> None:
        opts = f"-p {ports[name]} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg("pg_ctl", "-D", f"{tmp}/{name}", "-l", f"{tmp}/{name}.log", "-o", opts, "-w", "start")
        started.append(name)

    try:
        pg("initdb", "-D", f"{tmp}/primary", "-U", "postgres", "-A", "trust", "--no-sync")
        with open(f"{tmp}/primary/pg_hba.conf", "a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        start("primary")
        pg(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(ports["primary"]), "-U", "postgres"),
            *("-D", f"{tmp}/standby", "-R", "-X", "stream", "--no-sync"),
        )
        start("standby")
        yield Pair(*(f"postgresql://postgres@127.0.0.1:{ports[n]}/postgres" for n in ports))
    finally:
        for name in reversed(started):
            with contextlib.suppress(subprocess.SubprocessError):
                pg("pg_ctl", "-D", f"{tmp}/{name}", "-m", "immediate", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


async def caught_up(pair: Pair) -> None:
    """The standby has replayed everything the primary has committed so far."""
    primary = await asyncpg.connect(pair.primary)
    standby = await asyncpg.connect(pair.standby)
    try:
        lsn = await primary.fetchval("SELECT pg_current_wal_lsn()")
        async with asyncio.timeout(10):
            while await standby.fetchval(
                "SELECT pg_wal_lsn_diff($1, pg_last_wal_replay_lsn()) > 0", lsn
            ):
                await asyncio.sleep(0.02)  # replay is polled: it has no notification
    finally:
        await primary.close()
        await standby.close()


@dataclass
class Setup:
    pair: Pair
    writer: PostgresStore  # a process writing the logs (primary only)
    reader: PostgresStore  # another, with --db-read
    redis: tuple[str, str]


@pytest.fixture(name="s")
async def stores() -> AsyncIterator[Setup]:
    with streaming_pair() as pair:
        name = f"tether_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(pair.primary)
        await admin.execute(f"CREATE DATABASE {name}")
        await admin.close()
        url, key_prefix = redis_url(), prefix()
        writer = PostgresStore(pair.db("primary", name), url, key_prefix)
        await writer.open()  # migrates
        await caught_up(pair)
        reader = PostgresStore(  # no cache of its own: every read is Redis's or durable
            pair.db("primary", name),
            url,
            key_prefix,
            cache_bytes=0,
            read_url=pair.db("standby", name),
        )
        await reader.open()
        try:
            yield Setup(pair, writer, reader, (url, key_prefix))
        finally:
            for store in (reader, writer):
                with contextlib.suppress(Exception):
                    await store.close()
            await delete_prefix(url, key_prefix)


async def write(store: PostgresStore, rid: str, deltas: int, finish: bool = True) -> None:
    await store.create(record(rid), [ev("response.created")])
    assert await store.claim(rid, "tok", "me", 0, {}, [ev("response.in_progress")])
    for i in range(deltas):
        assert await store.append(rid, "tok", [ev(delta=f"{rid}-{i}")], tokens=1)
        if i % 4 == 3:
            await store.flush()
    await store.flush()
    if finish:
        assert await store.finish(rid, "tok", "completed", {}, [ev("response.completed")])


async def replay(s: Setup, rid: str) -> list[dict[str, Any]]:
    """The whole log as the reader process reads it with Redis no longer holding it (a
    finished log's stream expires there; the reader's own cache never had it)."""
    await delete_prefix(*s.redis)
    return [orjson.loads(e.data) for e in await s.reader.read(rid, -1)]


def check(log: list[dict[str, Any]], rid: str, deltas: int, finished: bool) -> None:
    assert [e["sequence_number"] for e in log] == list(range(len(log)))
    assert [e["delta"] for e in log if "delta" in e] == [f"{rid}-{i}" for i in range(deltas)]
    assert (log[-1]["type"] == "response.completed") is finished


async def test_finished_logs_replay_from_the_replica_and_nothing_else_does(s: Setup) -> None:
    replica = s.reader.replica
    assert replica is not None
    await write(s.writer, "resp_done", 9)
    await write(s.writer, "resp_live", 5, finish=False)
    await caught_up(s.pair)

    check(await replay(s, "resp_done"), "resp_done", 9, finished=True)
    assert replica.reads == 1
    check(await replay(s, "resp_live"), "resp_live", 5, finished=False)
    assert replica.reads == 1  # live: from the primary

    # The replica falls behind (replay paused): the log finished since is live there,
    # so the primary serves it whole — never a log cut at the replica's lag.
    standby = await asyncpg.connect(s.pair.db("standby", "postgres"))
    try:
        await standby.execute("SELECT pg_wal_replay_pause()")
        assert await s.writer.append("resp_live", "tok", [ev(delta="resp_live-5")])
        assert await s.writer.finish(
            "resp_live", "tok", "completed", {}, [ev("response.completed")]
        )
        await write(s.writer, "resp_new", 3)  # not on the replica at all yet
        check(await replay(s, "resp_live"), "resp_live", 6, finished=True)
        check(await replay(s, "resp_new"), "resp_new", 3, finished=True)
        assert replica.reads == 1
        await standby.execute("SELECT pg_wal_replay_resume()")
    finally:
        await standby.close()
    await caught_up(s.pair)
    check(await replay(s, "resp_live"), "resp_live", 6, finished=True)
    check(await replay(s, "resp_new"), "resp_new", 3, finished=True)
    assert replica.reads == 3


async def test_a_replica_that_is_down_leaves_replays_to_the_primary(s: Setup) -> None:
    replica = s.reader.replica
    assert replica is not None
    await write(s.writer, "resp_done", 4)
    await caught_up(s.pair)
    check(await replay(s, "resp_done"), "resp_done", 4, finished=True)
    assert replica.reads == 1  # (its pool holds a connection to the standby now)
    data_dir = await _data_dir(s.pair.standby)  # which goes away:
    subprocess.run(
        [*as_postgres(), f"{_bindir()}/pg_ctl", "-D", data_dir, "-m", "immediate", "stop"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    began = time.monotonic()
    check(await replay(s, "resp_done"), "resp_done", 4, finished=True)
    check(await replay(s, "resp_done"), "resp_done", 4, finished=True)  # not asked again
    assert time.monotonic() - began < 5
    assert replica.reads == 1


async def _data_dir(url: str) -> str:
    con = await asyncpg.connect(url)
    try:
        return str(await con.fetchval("SHOW data_directory"))
    finally:
        await con.close()


def test_a_read_replica_needs_postgresql(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="--db-read"):
        make_store(str(tmp_path / "t.db"), read_url="postgresql://replica/tether")


def test_tether_serve_with_db_read_replays_a_finished_log_from_the_replica(
    tmp_path: Any,
) -> None:
    with streaming_pair() as pair:
        name = f"tether_{uuid.uuid4().hex[:12]}"
        run(_create_database(pair.primary, name))
        url, key_prefix = redis_url(), prefix()
        server = Server(
            pair.db("primary", name),
            [
                *("--redis", url, "--redis-prefix", key_prefix, "--engine", "scripted"),
                *("--scripted-rate", "0", "--scripted-length", "30", "--debug-routes"),
                *("--log-cache-bytes", "0", "--db-read", pair.db("standby", name)),
            ],
            log_dir=tmp_path,
        )
        server.start()
        try:
            with server.client() as client:
                rid = client.responses.create(model="scripted", input="hi", background=True).id
                wait_for(lambda: client.responses.retrieve(rid).status == "completed")
                run(caught_up(pair))
                run(delete_prefix(url, key_prefix))  # as its Redis stream expires
                events = list(client.responses.retrieve(rid, stream=True, starting_after=0))
            assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
            assert events[-1].type == "response.completed"
            # The replica answered: the server holds a connection to it.
            assert run(_clients(pair.db("standby", name))) >= 1
        finally:
            server.stop()
            run(delete_prefix(url, key_prefix))


async def _create_database(admin_url: str, name: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()


async def _clients(url: str) -> int:
    con = await asyncpg.connect(url)
    try:
        return int(
            await con.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await con.close()
