"""Bursts on the scaled-out store: calls gathered into rounds (`tether.store.rounds`), the
PostgreSQL store's plain creates and record reads that use them (many callers, one
statement), and Redis reads that wait for a turn rather than fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tether.store import pg_create
from tether.store.base import Record, StoreUnavailable
from tether.store.postgres import PostgresStore
from tether.store.rounds import Rounds

from services import delete_prefix, postgres_url, prefix, redis_url, run

pytestmark = pytest.mark.anyio


class Echo:
    """A round function that records its rounds and waits for `go` before answering."""

    def __init__(self) -> None:
        self.rounds: list[list[int]] = []
        self.go = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, args: list[int]) -> list[int]:
        self.rounds.append(args)
        await self.go.wait()
        if self.fail is not None:
            raise self.fail
        return [a * 10 for a in args]


async def test_calls_of_one_turn_share_a_round_and_calls_during_it_the_next() -> None:
    echo = Echo()
    rounds: Rounds[int, int] = Rounds(echo, "test")
    first = [asyncio.create_task(rounds.call(i)) for i in range(3)]
    while not echo.rounds:
        await asyncio.sleep(0)
    later = [asyncio.create_task(rounds.call(i)) for i in range(3, 5)]
    echo.go.set()
    assert await asyncio.gather(*first, *later) == [0, 10, 20, 30, 40]
    assert echo.rounds == [[0, 1, 2], [3, 4]]


async def test_a_cancelled_caller_leaves_the_round_to_the_others() -> None:
    echo = Echo()
    rounds: Rounds[int, int] = Rounds(echo, "test")
    calls = [asyncio.create_task(rounds.call(i)) for i in range(3)]
    while not echo.rounds:
        await asyncio.sleep(0)
    calls[1].cancel()
    echo.go.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 0 and results[2] == 20
    assert isinstance(results[1], asyncio.CancelledError)


async def test_an_error_of_the_round_is_every_callers() -> None:
    echo = Echo()
    echo.fail = StoreUnavailable("away")
    echo.go.set()
    rounds: Rounds[int, int] = Rounds(echo, "test")
    results = await asyncio.gather(*(rounds.call(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert len({id(r) for r in results}) == 3  # one object each: tracebacks do not mix


async def test_close_answers_the_waiting_callers() -> None:
    echo = Echo()
    rounds: Rounds[int, int] = Rounds(echo, "test")
    calls = [asyncio.create_task(rounds.call(i)) for i in range(2)]
    while not echo.rounds:
        await asyncio.sleep(0)
    calls.append(asyncio.create_task(rounds.call(2)))  # waits for the next round
    await asyncio.sleep(0)
    await rounds.close()
    for result in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(result, StoreUnavailable)


# --- the PostgreSQL store's rounds -----------------------------------------------------------


def record(rid: str, tenant: str = "t") -> Record:
    return Record(
        id=rid,
        tenant=tenant,
        status="queued",
        snapshot={"id": rid},
        run={"n": rid},
        input_items=[{"i": rid}],
        run_token=None,
        owner=None,
        lease_until=0.0,
        last_seq=-1,
        input_tokens=0,
        finished_at=None,
    )


@pytest.fixture
def pg() -> Iterator[str]:
    with postgres_url() as url:
        yield url


@pytest.fixture
async def store(pg: str) -> AsyncIterator[PostgresStore]:
    url, key_prefix = redis_url(), prefix()
    s = PostgresStore(pg, url, key_prefix)
    await s.open()
    yield s
    await s.close()
    run(delete_prefix(url, key_prefix))


async def test_creates_at_once_are_one_statement_and_each_is_whole(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[int] = []
    insert = pg_create.insert

    async def counted(db, batch):  # type: ignore[no-untyped-def]
        statements.append(len(batch))
        await insert(db, batch)

    monkeypatch.setattr(pg_create, "insert", counted)
    ids = [f"resp_many_{i}" for i in range(50)]
    events = [{"type": "response.created"}, {"type": "response.queued"}]
    created = await asyncio.gather(*(store.create(record(rid), list(events)) for rid in ids))
    assert [r.last_seq for r, fresh in created] == [1] * 50
    assert all(fresh for _, fresh in created)
    assert sum(statements) == 50 and len(statements) <= 2
    records = await asyncio.gather(*(store.get(rid, "t") for rid in ids))
    for rid, rec in zip(ids, records, strict=True):
        assert rec is not None and rec.run == {"n": rid} and rec.input_items == [{"i": rid}]
        assert rec.last_seq == 1 and rec.status == "queued"
    store.live.cache.pop(ids[0])  # from the database, not the cache
    assert [e.type for e in await store.read(ids[0], -1)] == ["response.created", "response.queued"]


async def test_a_bad_create_in_a_round_fails_only_its_caller(store: PostgresStore) -> None:
    await store.create(record("resp_taken"), [{"type": "response.created"}])
    results = await asyncio.gather(
        *(
            store.create(record(rid), [{"type": "response.created"}])
            for rid in ("resp_a", "resp_taken", "resp_b")
        ),
        return_exceptions=True,
    )
    assert isinstance(results[1], asyncpg.UniqueViolationError)
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    assert await store.get("resp_a", "t") is not None
    assert await store.get("resp_b", "t") is not None


async def test_gets_in_one_round_keep_tenants_apart(store: PostgresStore) -> None:
    await store.create(record("resp_x", tenant="t1"), [{"type": "response.created"}])
    found = await asyncio.gather(
        store.get("resp_x", "t1"), store.get("resp_x", "t2"), store.get("resp_none", "t1")
    )
    assert found[0] is not None and found[0].tenant == "t1"
    assert found[1] is None and found[2] is None


async def test_a_burst_of_redis_reads_waits_its_turn_rather_than_fail(
    store: PostgresStore,
) -> None:
    """300 readers of 300 responses fetching at once (redis-py's pool holds 100
    connections): every read from Redis, none sent to Postgres for a refused connection."""
    ids = [f"resp_read_{i}" for i in range(300)]
    events = [{"type": "response.created"}, {"type": "response.queued"}]
    await asyncio.gather(*(store.create(record(rid), list(events)) for rid in ids))
    await store.live.drained()
    for rid in ids:
        store.live.cache.pop(rid)
    before = dict(store.live.stats)
    logs = await asyncio.gather(*(store.read(rid, -1) for rid in ids))
    assert all(len(log) == 2 for log in logs)
    assert store.live.stats["durable_reads"] == before["durable_reads"]
    assert store.live.stats["redis_reads"] == before["redis_reads"] + 300
