"""The scaled-out store (PostgreSQL + Redis): the SQLite store's behaviour, across
processes (two store instances on one database and one Redis = two processes), and
through outages of either service (a TCP gate in front of it: cut or hung)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.store import make_store, pg_append
from tether.store.base import IdempotencyConflict, Record, StoreUnavailable
from tether.store.pg_pool import OP_TIMEOUT
from tether.store.postgres import PostgresStore

from services import delete_prefix, postgres_url, prefix, redis_url, run

pytestmark = pytest.mark.anyio

Make = Callable[..., Awaitable[PostgresStore]]


def record(rid: str = "resp_1", status: str = "queued", owner: str | None = "me") -> Record:
    return Record(
        id=rid,
        tenant="t",
        status=status,
        snapshot={"id": rid},
        run={},
        input_items=[],
        run_token=None,
        owner=owner,
        lease_until=0.0,
        last_seq=-1,
        input_tokens=0,
        finished_at=None,
    )


def ev(kind: str = "response.output_text.delta", **extra: Any) -> dict[str, Any]:
    return {"type": kind, **extra}


@pytest.fixture
def pg() -> Iterator[str]:
    with postgres_url() as url:
        yield url


@pytest.fixture
def redis() -> Iterator[tuple[str, str]]:
    """The Redis URL and a key prefix of this test's own (deleted afterwards)."""
    url, key_prefix = redis_url(), prefix()
    yield url, key_prefix
    run(delete_prefix(url, key_prefix))


@pytest.fixture
async def make(pg: str, redis: tuple[str, str]) -> AsyncIterator[Make]:
    """Open stores ("processes") on this test's database and Redis prefix."""
    opened: list[PostgresStore] = []

    async def open_store(db: str | None = None, redis_at: str | None = None) -> PostgresStore:
        store = PostgresStore(db or pg, redis_at or redis[0], redis[1])
        await store.open()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        with contextlib.suppress(Exception):
            await store.close()


async def started(store: PostgresStore, rid: str = "resp_1", token: str = "tok") -> None:
    await store.create(record(rid), [ev("response.created")])
    assert await store.claim(rid, token, "me", 0, {}, [ev("response.in_progress")])


def seqs(entries: list[Any]) -> list[int]:
    return [e.seq for e in entries]


# --- the SQLite store's behaviour ------------------------------------------------------


async def test_processes_opening_at_once_migrate_once(make: Make) -> None:
    stores = await asyncio.gather(*(make() for _ in range(4)))
    await stores[0].create(record(), [ev("response.created")])
    assert all([await s.get("resp_1", "t") for s in stores])


async def test_flush_waits_for_earlier_appends_only(make: Make) -> None:
    # Under load the flusher never idles: a fence or finish must not wait for it to.
    store = await make()
    await started(store, "resp_busy")
    await started(store, "resp_1")
    stop = asyncio.Event()

    async def busy() -> None:
        while not stop.is_set():
            await store.append("resp_busy", "tok", [ev()], tokens=1)
            await asyncio.sleep(0)

    load = asyncio.ensure_future(busy())
    await store.append("resp_1", "tok", [ev()], tokens=1)
    await asyncio.wait_for(store.flush(), 5)
    assert await asyncio.wait_for(store.output_tokens("resp_1"), 5) == 1
    assert await asyncio.wait_for(store.finish("resp_1", "tok", "completed", {}, []), 5)
    stop.set()
    await load


async def test_an_append_cancelled_while_it_waits_appended_nothing(
    make: Make, pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `append` is cancel-atomic: a run cancelled while its append waits for the database
    # (back-pressure) counts no tokens for it, so the log must not hold its events either.
    monkeypatch.setattr(pg_append, "MAX_PENDING", 2)
    store = await make()
    await started(store)
    con = await asyncpg.connect(pg)
    try:
        async with con.transaction():  # holds the response's row: the round waits for it
            await con.execute("SELECT 1 FROM responses WHERE id = 'resp_1' FOR UPDATE")
            assert await store.append("resp_1", "tok", [ev(delta="a")], tokens=1)
            await wait_until(lambda: store.appends._rounds_begun == 1)  # in flight, waiting
            assert await store.append("resp_1", "tok", [ev(delta="b")], tokens=1)
            assert await store.append("resp_1", "tok", [ev(delta="c")], tokens=1)
            late = asyncio.ensure_future(store.append("resp_1", "tok", [ev(delta="d")], tokens=1))
            await asyncio.sleep(0)  # its first step: it waits for the round (2 pending)
            assert not late.done()
            late.cancel()
            with pytest.raises(asyncio.CancelledError):
                await late
    finally:
        await con.close()
    await asyncio.wait_for(store.flush(), 5)
    deltas = [orjson.loads(e.data).get("delta") for e in await store.read("resp_1", 1)]
    assert deltas == ["a", "b", "c"]
    assert await store.output_tokens("resp_1") == 3


async def test_close_from_another_task_stops_every_task_the_store_started(
    pg: str, redis: tuple[str, str]
) -> None:
    store = PostgresStore(pg, *redis)
    await asyncio.ensure_future(store.open())  # opened in one task...
    await started(store)
    assert await store.append("resp_1", "tok", [ev()], tokens=1)
    ours = {t for t in asyncio.all_tasks() if t.get_name().startswith("tether-")}
    assert len(ours) == 3  # the flusher, the Redis subscriber and publisher
    await asyncio.ensure_future(store.close())  # ...closed in another
    assert all(t.done() for t in ours)
    assert not {t for t in asyncio.all_tasks() if t.get_name().startswith("tether-")}
    reopened = PostgresStore(pg, *redis)
    await reopened.open()
    assert await reopened.output_tokens("resp_1") == 1  # the pending append was committed
    await reopened.close()


async def test_a_statement_rolled_back_for_a_deadlock_is_run_again(make: Make) -> None:
    # PostgreSQL breaks a lock cycle by rolling back one statement (seen under load in
    # bench/soak.py --scaled: a run then failed). A trigger raises that error (40P01) for
    # the first event written by an append and by a finish.
    store = await make()
    await started(store)
    async with store.db.conn() as con:
        await con.execute("""
            CREATE SEQUENCE deadlocks;  -- not rolled back with the statement
            CREATE FUNCTION deadlock_once() RETURNS trigger AS $$
            BEGIN
                IF nextval('deadlocks') IN (1, 3) THEN
                    RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01';
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER deadlock_once BEFORE INSERT ON events
                FOR EACH ROW EXECUTE FUNCTION deadlock_once();""")
    assert await store.append("resp_1", "tok", [ev(delta="a")], tokens=1)
    await asyncio.wait_for(store.flush(), 5)
    assert await store.finish("resp_1", "tok", "completed", {}, [ev("response.completed")])
    async with store.db.conn() as con:  # each refused once, then written
        assert await con.fetchval("SELECT last_value FROM deadlocks") == 4
    assert [orjson.loads(e.data)["type"] for e in await store.read("resp_1", 1)] == [
        "response.output_text.delta",
        "response.completed",
    ]
    assert await store.output_tokens("resp_1") == 1


async def test_sequence_numbers_are_assigned_by_the_store(make: Make) -> None:
    # contract §2.1
    store = await make()
    await store.create(record(), [ev("response.created"), ev("response.queued")])
    assert await store.claim("resp_1", "tok", "me", 0, {}, [ev("response.in_progress")])
    for i in range(5):
        assert await store.append("resp_1", "tok", [ev(delta=str(i))], tokens=1)
    await store.flush()
    entries = await store.read("resp_1", -1)
    assert seqs(entries) == list(range(8))
    assert [orjson.loads(e.data)["sequence_number"] for e in entries] == list(range(8))
    assert seqs(await store.read("resp_1", 4)) == [5, 6, 7]
    assert await store.output_tokens("resp_1") == 5


async def test_finish_is_a_single_compare_and_set(make: Make) -> None:
    # contract §1.1, §3.7: exactly one terminal transition; the loser learns it lost
    store = await make()
    await store.create(record(), [ev("response.created")])
    assert await store.claim("resp_1", "tok", "me", 0, {}, [])
    assert await store.finish("resp_1", "tok", "completed", {"s": 1}, [ev("response.completed")])
    assert not await store.finish("resp_1", None, "cancelled", {"s": 2}, [ev("response.failed")])
    assert not await store.finish("resp_1", "tok", "failed", {"s": 3}, [ev("response.failed")])
    rec = await store.get("resp_1", "t")
    assert rec is not None and rec.status == "completed" and rec.snapshot == {"s": 1}
    assert [e.type for e in await store.read("resp_1", -1, rec.last_seq)] == [
        "response.created",
        "response.completed",
    ]


async def test_nothing_is_appended_after_the_terminal_event(make: Make) -> None:
    # contract §2.3: fencing — a late write can never reopen a response
    store = await make()
    await store.create(record(), [ev("response.created")])
    await store.claim("resp_1", "old", "me", 0, {}, [])
    await store.append("resp_1", "old", [ev()], tokens=1)
    assert await store.fence("resp_1", "new")
    assert await store.finish("resp_1", "new", "cancelled", {}, [ev("response.failed")])
    await store.append("resp_1", "old", [ev()], tokens=1)  # accepted into the batch...
    await store.flush()  # ...and refused when the batch commits
    assert not await store.append("resp_1", "old", [ev()], tokens=1)
    types = [e.type for e in await store.read("resp_1", -1, 2)]
    assert types == ["response.created", "response.output_text.delta", "response.failed"]
    assert await store.output_tokens("resp_1") == 1


async def test_a_stale_run_token_is_fenced_out(make: Make) -> None:
    store = await make()
    await store.create(record(), [ev("response.created")])
    await store.claim("resp_1", "old", "me", 0, {}, [])
    assert await store.fence("resp_1", "new")
    await store.append("resp_1", "old", [ev()], tokens=1)
    assert not await store.finish("resp_1", "old", "completed", {}, [ev("response.completed")])
    assert [e.type for e in await store.read("resp_1", -1, 0)] == ["response.created"]
    assert await store.output_tokens("resp_1") == 0


async def test_claim_happens_once(make: Make) -> None:
    a, b = await make(), await make()
    await a.create(record(), [ev("response.created")])
    wins = await asyncio.gather(
        a.claim("resp_1", "a", "me", 0, {}, [ev("response.in_progress")]),
        b.claim("resp_1", "b", "me", 0, {}, [ev("response.in_progress")]),
    )
    assert sorted(wins) == [False, True]
    assert seqs(await a.read("resp_1", -1, 1)) == [0, 1]


async def test_idempotency_keys(make: Make) -> None:
    # contract §5.3
    store = await make()
    _, created = await store.create(record("resp_a"), [ev("response.created")], ("k", "h1"))
    assert created
    again, created = await store.create(record("resp_b"), [ev("response.created")], ("k", "h1"))
    assert not created and again.id == "resp_a"
    assert await store.get("resp_b", "t") is None
    with pytest.raises(IdempotencyConflict):
        await store.create(record("resp_c"), [ev("response.created")], ("k", "h2"))
    assert await store.get("resp_c", "t") is None


async def test_idempotent_creates_racing_in_two_processes_make_one_response(make: Make) -> None:
    a, b = await make(), await make()
    results = await asyncio.gather(
        a.create(record("resp_a"), [ev("response.created")], ("k", "h")),
        b.create(record("resp_b"), [ev("response.created")], ("k", "h")),
    )
    assert sorted(created for _, created in results) == [False, True]
    assert {rec.id for rec, _ in results} == {results[0][0].id}


async def test_readers_wake_only_after_commit(make: Make, pg: str) -> None:
    store = await make()
    await started(store)
    waiter = asyncio.ensure_future(store.wait("resp_1", 1, 10))
    # Hold the row from another connection: the append's statement must wait for it.
    con = await asyncpg.connect(pg)
    tx = con.transaction()
    await tx.start()
    await con.execute("SELECT 1 FROM responses WHERE id = 'resp_1' FOR UPDATE")
    await store.append("resp_1", "tok", [ev()], tokens=1)
    await asyncio.sleep(0.2)  # the flush is blocked meanwhile; give it every chance to leak
    assert await store.read("resp_1", 1) == []  # not committed yet: invisible
    assert not waiter.done()
    await tx.rollback()
    await con.close()
    await asyncio.wait_for(waiter, 5)
    assert seqs(await store.read("resp_1", 1)) == [2]


async def test_everything_survives_reopening(make: Make) -> None:
    store = await make()
    await started(store)
    await store.append("resp_1", "tok", [ev(), ev()], tokens=2, input_tokens=9)
    await store.close()
    store = await make()
    rec = await store.get("resp_1", "t")
    assert rec is not None and rec.input_tokens == 9 and rec.last_seq == 3
    assert len(await store.read("resp_1", -1, 3)) == 4
    assert await store.output_tokens("resp_1") == 2
    assert [r.id for r in await store.expired(1.0)] == ["resp_1"]


async def test_tenants_are_separate(make: Make) -> None:
    # contract §7.1
    store = await make()
    await store.create(record(), [ev("response.created")])
    assert await store.get("resp_1", "other") is None
    assert not await store.delete("resp_1", "other")
    assert await store.get("resp_1", "t") is not None


async def test_delete_and_purge(make: Make) -> None:
    store = await make()
    await store.create(record("resp_1"), [ev("response.created")])
    assert await store.finish("resp_1", None, "cancelled", {}, [ev("response.failed")])
    assert await store.delete("resp_1", "t")
    assert await store.get("resp_1", "t") is None
    assert await store.read("resp_1", -1, 1) == []
    gone = record("resp_2")
    gone.snapshot["store"] = False
    await store.create(gone, [ev("response.created")])
    assert await store.finish("resp_2", None, "cancelled", {}, [ev("response.failed")])
    assert await store.purge(time.time() + 1) == 1
    assert await store.get("resp_2", "t") is None


async def test_leases_renew_expire_and_adopt(make: Make) -> None:
    a, b = await make(), await make()
    await a.create(record("resp_q", owner="w1"), [ev("response.created")])
    await a.create(record("resp_r", owner="w1"), [ev("response.created")])
    assert await a.claim("resp_r", "tok", "w1", time.time() + 60, {}, [])
    await a.renew("w1", time.time() - 1, ["resp_q", "resp_r"])  # w1 stopped renewing
    assert {r.id for r in await b.expired(time.time())} == {"resp_q", "resp_r"}
    assert not await b.adopt("resp_r", "w1", "w2", time.time() + 60)  # it started: no re-run
    assert not await b.adopt("resp_q", "someone", "w2", time.time() + 60)
    adopted = await asyncio.gather(
        a.adopt("resp_q", "w1", None, time.time() + 60),
        b.adopt("resp_q", "w1", "w2", time.time() + 60),
    )
    assert sorted(adopted) == [False, True]  # CAS: exactly one process takes it over
    assert [r.id for r in await b.expired(time.time())] == ["resp_r"]


# --- across processes --------------------------------------------------------------------


async def test_an_append_in_one_process_wakes_a_reader_in_another(make: Make) -> None:
    a, b = await make(), await make()
    await started(a)
    assert seqs(await b.read("resp_1", -1, 1)) == [0, 1]
    for i in range(3):
        waiter = asyncio.ensure_future(b.wait("resp_1", 1 + i, 10))
        await asyncio.sleep(0)  # the waiter is registered
        t0 = time.monotonic()
        assert await a.append("resp_1", "tok", [ev(delta=str(i))], tokens=1)
        await asyncio.wait_for(waiter, 10)
        assert time.monotonic() - t0 < 1.0  # woken by the wake-up, not by the timeout
        entries = await b.read("resp_1", 1 + i)
        assert seqs(entries) == [2 + i]
        assert orjson.loads(entries[0].data)["delta"] == str(i)
    assert b.live.stats["durable_reads"] == 0  # all from Redis and the cache


async def test_many_local_readers_cost_one_redis_read_per_batch(make: Make) -> None:
    a, b = await make(), await make()
    await started(a)
    await b.read("resp_1", -1, 1)
    before = dict(b.live.stats)

    async def reader() -> list[int]:
        got: list[int] = []
        after = 1
        while after < 11:
            await b.wait("resp_1", after, 10)
            entries = await b.read("resp_1", after)
            got += seqs(entries)
            after = got[-1] if got else after
        return got

    readers = [asyncio.ensure_future(reader()) for _ in range(20)]
    await asyncio.sleep(0)
    for i in range(10):
        await a.append("resp_1", "tok", [ev(delta=str(i))], tokens=1)
        await a.flush()
    results = await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert all(r == list(range(2, 12)) for r in results)
    redis_reads = b.live.stats["redis_reads"] - before["redis_reads"]
    assert 1 <= redis_reads <= 10, redis_reads  # not 20 readers × 10 batches


async def test_a_fenced_process_cannot_append(make: Make) -> None:
    # contract §2.3, §6.2: a worker paused past its lease, then resumed, writes nothing
    worker, reaper = await make(), await make()
    await started(worker)
    await worker.append("resp_1", "tok", [ev(delta="a")], tokens=1)
    await worker.flush()
    assert await reaper.fence("resp_1", "guard")
    # The worker "wakes up" and goes on as if nothing happened.
    await worker.append("resp_1", "tok", [ev(delta="b"), ev(delta="c")], tokens=2, input_tokens=7)
    await worker.flush()
    assert not await worker.append("resp_1", "tok", [ev(delta="d")], tokens=1)
    assert not await worker.finish("resp_1", "tok", "completed", {}, [ev("response.completed")])
    assert await reaper.finish("resp_1", "guard", "failed", {}, [ev("response.failed")])
    rec = await reaper.get("resp_1", "t")
    assert rec is not None and rec.status == "failed" and rec.input_tokens == 0
    log = await reaper.read("resp_1", -1, rec.last_seq)
    assert [e.type for e in log] == [
        "response.created",
        "response.in_progress",
        "response.output_text.delta",
        "response.failed",
    ]
    assert seqs(log) == [0, 1, 2, 3]
    assert await reaper.output_tokens("resp_1") == 1


async def test_finish_race_between_processes_has_one_winner(make: Make) -> None:
    # contract §1.1, §3.7: cancel (no token) racing the run's completion (its token)
    a, b = await make(), await make()
    for n in range(10):
        rid = f"resp_{n}"
        await started(a, rid)
        await a.append(rid, "tok", [ev()], tokens=1)
        await a.flush()
        wins = await asyncio.gather(
            a.finish(rid, "tok", "completed", {"by": "a"}, [ev("response.completed")]),
            b.finish(
                rid, None if n % 2 else "tok", "cancelled", {"by": "b"}, [ev("response.failed")]
            ),
        )
        assert sorted(wins) == [False, True]
        rec = await b.get(rid, "t")
        assert rec is not None and rec.snapshot == {"by": "a" if wins[0] else "b"}
        log = await b.read(rid, -1, rec.last_seq)
        assert seqs(log) == [0, 1, 2, 3]
        assert [e.type for e in log][-1] == ("response.completed" if wins[0] else "response.failed")


@given(
    ops=st.lists(
        st.tuples(st.integers(1, 3), st.sampled_from(["turn", "flush", "none"])),
        min_size=1,
        max_size=30,
    ),
    fence_at=st.none() | st.integers(0, 30),
    cursor=st.integers(-1, 40),
)
@settings(
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
async def test_random_interleavings_keep_one_contiguous_log(
    make: Make, ops: list[tuple[int, str]], fence_at: int | None, cursor: int
) -> None:
    # contract §2.1-§2.3: whatever the batching and wherever a fence lands, the log is
    # contiguous, nothing of the fenced run follows the fence, usage matches the log
    worker, other = await _pair(make)
    rid = f"resp_{time.monotonic_ns()}"
    await started(worker, rid)
    reads: list[list[Any]] = []
    fenced = False
    for i, (n, pause) in enumerate(ops):
        if i == fence_at:
            assert await other.fence(rid, "guard")
            fenced = True
        accepted = await worker.append(
            rid, "tok", [ev(delta=f"{i}.{k}") for k in range(n)], tokens=n
        )
        assert accepted or fenced
        if pause == "turn":
            await asyncio.sleep(0)
        elif pause == "flush":
            await worker.flush()
        reads.append(await other.read(rid, min(cursor, i)))
    await worker.flush()
    if fenced:
        assert await other.finish(rid, "guard", "failed", {}, [ev("response.failed")])
    else:
        assert await worker.finish(rid, "tok", "completed", {}, [ev("response.completed")])
    rec = await other.get(rid, "t")
    assert rec is not None
    log = await other.read(rid, -1, rec.last_seq)
    assert seqs(log) == list(range(rec.last_seq + 1))
    assert [orjson.loads(e.data)["sequence_number"] for e in log] == seqs(log)
    assert [e.type for e in log].count("response.failed") + [e.type for e in log].count(
        "response.completed"
    ) == 1
    deltas = [orjson.loads(e.data)["delta"] for e in log if e.type.endswith(".delta")]
    if fence_at is not None and fence_at < len(ops):
        assert all(int(d.split(".")[0]) < fence_at for d in deltas)
    else:
        assert len(deltas) == sum(n for n, _ in ops)
    assert await other.output_tokens(rid) == len(deltas)
    by_seq = {e.seq: e.data for e in log}
    for got in reads:  # every read along the way: a slice of the final log
        assert all(by_seq[e.seq] == e.data for e in got)
        if got:
            assert seqs(got) == list(range(got[0].seq, got[0].seq + len(got)))


async def _pair(make: Make) -> tuple[PostgresStore, PostgresStore]:
    """Hypothesis runs many examples per test function: two stores for all of them."""
    pair: tuple[PostgresStore, PostgresStore] | None = getattr(make, "pair", None)
    if pair is None:
        pair = (await make(), await make())
        make.pair = pair  # type: ignore[attr-defined]
    return pair


# --- Redis losing streams, or away ----------------------------------------------------


async def test_a_flushed_stream_is_read_from_postgres_then_from_redis_again(
    make: Make, redis: tuple[str, str]
) -> None:
    import redis.asyncio as aioredis

    a, b = await make(), await make()
    await started(a)
    for i in range(5):
        await a.append("resp_1", "tok", [ev(delta=str(i))], tokens=1)
        await a.flush()
    assert seqs(await b.read("resp_1", -1, 6)) == list(range(7))
    await a.live.drained()
    await delete_prefix(*redis)  # Redis loses every stream of this prefix
    client = aioredis.Redis.from_url(redis[0])
    assert await client.exists(a.live.key("resp_1")) == 0
    for i in range(5, 8):
        await a.append("resp_1", "tok", [ev(delta=str(i))], tokens=1)
        await a.flush()
    await a.live.drained()
    stream = await client.xrange(a.live.key("resp_1"))
    assert [int(f[b"f"]) for _, f in stream] == [7, 8, 9]  # the stream restarted mid-log
    await client.aclose()
    # A reader in a third process needs the whole log: Redis has only its end.
    c = await make()
    log = await c.read("resp_1", -1, 9)
    assert seqs(log) == list(range(10))
    assert c.live.stats["durable_reads"] == 1
    # b had read up to 6: the restarted stream continues exactly there.
    assert seqs(await b.read("resp_1", 6, 9)) == [7, 8, 9]
    assert b.live.stats["durable_reads"] == 0
    # And both go on from Redis.
    await a.append("resp_1", "tok", [ev(delta="x")], tokens=1)
    await a.flush()
    await a.live.drained()
    assert seqs(await c.read("resp_1", 9, 10)) == [10]
    assert c.live.stats["durable_reads"] == 1


async def test_redis_away_the_store_works_from_postgres_and_catches_up(
    make: Make, redis: tuple[str, str]
) -> None:
    gate = await Gate.start(6379)
    try:
        a = await make(redis_at=f"redis://127.0.0.1:{gate.port}/0")
        b = await make(redis_at=f"redis://127.0.0.1:{gate.port}/0")
        await started(a)
        assert seqs(await b.read("resp_1", -1, 1)) == [0, 1]
        gate.cut()
        await wait_until(lambda: not b.live.healthy)
        for i in range(3):  # appends, reads and wake-ups go on (polling)
            waiter = asyncio.ensure_future(b.wait("resp_1", 1 + i, 10))
            await a.append("resp_1", "tok", [ev(delta=str(i))], tokens=1)
            await asyncio.wait_for(waiter, 2)
            await a.flush()
            assert seqs(await b.read("resp_1", 1 + i, 2 + i)) == [2 + i]
        durable = b.live.stats["durable_reads"]
        assert durable >= 1
        gate.restore()
        await wait_until(lambda: a.live.healthy and b.live.healthy)
        await a.live.drained()
        await b.read("resp_1", 4)  # re-synced with Redis (the stream restarted)
        waiter = asyncio.ensure_future(b.wait("resp_1", 4, 10))
        await asyncio.sleep(0)
        await a.append("resp_1", "tok", [ev(delta="after")], tokens=1)
        await asyncio.wait_for(waiter, 1)
        assert seqs(await b.read("resp_1", 4, 5)) == [5]
        assert seqs(await b.read("resp_1", -1, 5)) == list(range(6))
    finally:
        await gate.close()


# --- PostgreSQL away -------------------------------------------------------------------


async def test_postgres_unreachable_raises_store_unavailable_quickly(
    redis: tuple[str, str],
) -> None:
    store = make_store("postgresql://postgres@127.0.0.1:1/nowhere", redis[0], redis[1])
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.open()
    assert time.monotonic() - t0 < OP_TIMEOUT
    with pytest.raises(ValueError, match="Redis"):
        make_store("postgresql://postgres@127.0.0.1/x")


@pytest.mark.parametrize("mode", ["cut", "hang", "deaf"])
async def test_postgres_outage_is_store_unavailable_then_recovers(
    make: Make, pg: str, mode: str
) -> None:
    gate = await Gate.start(5432)
    try:
        url = pg.replace(":5432/", f":{gate.port}/")
        worker, other = await make(db=url), await make()
        await started(worker)
        await worker.append("resp_1", "tok", [ev(delta="a")], tokens=1)
        await worker.flush()
        if mode == "deaf":
            # The database gets the append and commits it; its answer is lost.
            gate.deaf()
            assert await worker.append("resp_1", "tok", [ev(delta="held")], tokens=1)

            async def committed() -> None:
                while (rec := await other.get("resp_1", "t")) is None or rec.last_seq < 3:
                    await asyncio.sleep(0.01)  # poll interval of a bounded wait

            await asyncio.wait_for(committed(), 10)
        t0 = time.monotonic()
        getattr(gate, "hang" if mode == "deaf" else mode)()
        with pytest.raises(StoreUnavailable):
            await worker.get("resp_1", "t")
        assert time.monotonic() - t0 < OP_TIMEOUT + 1
        if mode != "deaf":
            # An append during the outage is held: its round is tried again.
            assert await worker.append("resp_1", "tok", [ev(delta="held")], tokens=1)
        with pytest.raises(StoreUnavailable):  # a flush meanwhile says so, in bounded time
            await worker.flush()
        assert time.monotonic() - t0 < 3 * (OP_TIMEOUT + 1)
        gate.restore()
        # Once the database is back, the held round is written once, in order (a lost
        # answer is resolved from the log, not written twice), and the run goes on.
        await worker.flush()
        assert await worker.get("resp_1", "t") is not None  # the pool reconnected
        assert await worker.append("resp_1", "tok", [ev(delta="b")], tokens=1)
        assert await worker.finish("resp_1", "tok", "completed", {}, [ev("response.completed")])
        log = await other.read("resp_1", -1, 5)
        assert seqs(log) == list(range(6))
        assert [orjson.loads(e.data).get("delta") for e in log[2:5]] == ["a", "held", "b"]
        assert log[-1].type == "response.completed"
        assert await worker.output_tokens("resp_1") == 3
    finally:
        await gate.close()


async def test_terminated_connections_are_replaced(make: Make, pg: str) -> None:
    store = await make()
    await started(store)
    admin = await asyncpg.connect(pg)
    killed = await admin.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    await admin.close()
    assert killed >= 1
    for attempt in range(2):  # a connection killed mid-use may fail one call, clearly
        try:
            assert await store.get("resp_1", "t") is not None
            break
        except StoreUnavailable:
            assert attempt == 0
    await store.append("resp_1", "tok", [ev()], tokens=1)
    await store.flush()
    assert await store.output_tokens("resp_1") == 1


# --- helpers -----------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)  # poll interval of a wait with a deadline


class Gate:
    """A TCP relay in front of a service, to take it away: `cut()` closes every
    connection and refuses new ones (a restart), `hang()` keeps them open and silent (a
    hung server or a dead network), `restore()` relays again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.mode = "open"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(cls, target: int) -> Gate:
        gate = cls(target)
        gate._server = await asyncio.start_server(gate._serve, "127.0.0.1", 0)
        gate.port = gate._server.sockets[0].getsockname()[1]
        return gate

    def cut(self) -> None:
        self.mode = "cut"
        self._drop()

    def hang(self) -> None:
        self.mode = "hang"

    def deaf(self) -> None:
        """Relay to the service, but drop its answers (a reply lost on the way)."""
        self.mode = "deaf"

    def restore(self) -> None:
        self._drop()  # connections that hung are dead, as after a restart
        self.mode = "open"

    def _drop(self) -> None:
        for writer in list(self._conns):
            writer.transport.abort()
        self._conns.clear()

    async def close(self) -> None:
        self._drop()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._conns |= {writer, up_writer}
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer, answers=True)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)  # one side closed
        for pump in pumps:
            pump.cancel()
        for w in (writer, up_writer):
            self._conns.discard(w)
            w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool = False
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                while self.mode == "hang":
                    await asyncio.sleep(0.05)  # a hung peer: hold the bytes
                if self.mode == "cut" or writer.is_closing():
                    return
                if answers and self.mode == "deaf":
                    continue  # the answer is lost
                writer.write(data)
                await writer.drain()
