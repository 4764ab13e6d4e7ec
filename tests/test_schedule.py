"""Completion windows (`tether.schedule`): the deadline scheduler of the run queue, in one
process and in Redis, and `background_options.completion_window` through the real SDK."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any, cast

import httpx
import openai
import pytest

from tether.dispatch import LocalDispatch, RedisDispatch
from tether.schedule import RunQueue, start_by

from conftest import Server, wait_for
from services import redis_url


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


# --- the rule ------------------------------------------------------------------------------


def test_start_by_leaves_the_reserve_for_the_run() -> None:
    assert start_by(100.0, "soonest", 1800) is None
    assert start_by(100.0, "2h", 1800) == 100.0 + 7200 - 1800
    assert start_by(100.0, "8h", 0) == 100.0 + 28_800
    # A reserve larger than the window still leaves half of it to wait.
    assert start_by(100.0, "2h", 10_000) == 100.0 + 3600


# --- one process ---------------------------------------------------------------------------


def test_soonest_work_goes_before_deferred_work() -> None:
    clock = Clock()
    q = RunQueue(clock)
    q.put("d1", "t", clock.now + 100)
    q.put("s1", "t")
    q.put("s2", "t")
    assert q.waiting() == {"soonest": 2, "deferred": 1}
    assert [q.take_nowait(), q.take_nowait(), q.take_nowait(), q.take_nowait()] == [
        ("s1", "t"),
        ("s2", "t"),
        ("d1", "t"),  # no soonest work left: the deferred one runs now, before its deadline
        None,
    ]


def test_a_deferred_response_at_its_deadline_goes_first() -> None:
    clock = Clock()
    q = RunQueue(clock)
    q.put("late", "t", clock.now + 50)
    q.put("later", "t", clock.now + 60)
    q.put("s1", "t")
    assert q.take_nowait() == ("s1", "t")
    q.put("s2", "t")
    clock.now += 50
    assert q.take_nowait() == ("late", "t")
    assert q.take_nowait() == ("s2", "t")
    assert q.take_nowait() == ("later", "t")


def test_random_schedules_start_every_deferred_response_in_time() -> None:
    """A simulated clock: one run slot, runs of random length up to `run_max`, `soonest`
    work arriving at random, deferred deadlines at least one run apart. Invariants:
    a deferred response runs ahead of waiting `soonest` work only once it is due, and
    starts at the latest one run (the one holding the slot) after its deadline: what
    `Settings.window_reserve` must cover."""
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    clock = Clock()
    q = RunQueue(clock)
    run_max = 10.0
    deadlines: dict[str, float] = {}
    at = clock.now
    for i in range(20):
        at += run_max + rng.uniform(0, 200)
        deadlines[f"d{i}"] = at
    for rid in rng.sample(sorted(deadlines), len(deadlines)):  # submitted in any order
        q.put(rid, "t", deadlines[rid])
    n = 0
    while q.waiting()["deferred"]:
        for _ in range(rng.choice((0, 1, 1, 2))):
            n += 1
            q.put(f"s{n}", "t")
        soonest_waiting = q.waiting()["soonest"]
        rid, _ = q.take_nowait() or ("", "")
        if rid.startswith("d"):
            assert clock.now <= deadlines[rid] + run_max, (seed, rid)
            if soonest_waiting:
                assert clock.now >= deadlines[rid], (seed, rid)
        clock.now += rng.uniform(1, run_max)  # the run holds the one slot


def test_deferred_work_past_its_share_of_slots_waits_unless_due() -> None:
    clock = Clock()
    q = RunQueue(clock)
    share = {"free": False}
    q.may_defer = lambda: share["free"]
    q.put("d1", "t", clock.now + 100)
    q.put("d2", "t", clock.now + 50)
    assert q.take_nowait() is None  # its share is used: nothing to take now
    clock.now += 50
    assert q.take_nowait() == ("d2", "t")  # due: taken all the same
    share["free"] = True
    assert q.take_nowait() == ("d1", "t")


@pytest.mark.anyio
async def test_local_dispatch_takes_by_class() -> None:
    d = LocalDispatch()
    await d.submit("d1", "t", 1.0)  # its deadline long past
    await d.submit("s1", "t")
    assert await asyncio.wait_for(d.take(), 1) == ("d1", "t")
    assert await asyncio.wait_for(d.take(), 1) == ("s1", "t")
    taker = asyncio.create_task(d.take())
    await d.submit("s2", "t")
    assert await asyncio.wait_for(taker, 1) == ("s2", "t")


# --- Redis -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_redis_dispatch_takes_by_class_and_each_entry_once() -> None:
    url = redis_url()
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    a = RedisDispatch(url, prefix, "a")
    b = RedisDispatch(url, prefix, "b")
    await a.open(lambda _: None)
    await b.open(lambda _: None)
    try:
        far = 4_000_000_000.0
        await a.submit("d_later", "t", far)
        await a.submit("d_later", "t", far)  # queued again (lease recovery): one entry
        await a.submit("d_due", "t", 1.0)
        await a.submit("s1", "t")
        assert await asyncio.wait_for(b.take(), 5) == ("d_due", "t")
        assert await asyncio.wait_for(a.take(), 5) == ("s1", "t")
        # No soonest work for a moment: the deferred one runs, and only once.
        got = await asyncio.wait_for(asyncio.gather(a.take(), b.take(), return_exceptions=True), 3)
    except TimeoutError:
        got = None  # one of the two takes waits forever: expected
    finally:
        import redis.asyncio as aioredis

        r = aioredis.from_url(url)
        left = await r.zcard(f"{prefix}:later")
        await r.delete(f"{prefix}:runs", f"{prefix}:later")
        await r.aclose()
        await a.close()
        await b.close()
    assert got is None
    assert left == 0


# --- through the API -------------------------------------------------------------------------


def test_windows_follow_openai_rules(make_server: Any) -> None:
    server: Server = make_server("--scripted-length", "5")
    with server.client() as client:
        for kwargs, why in (
            ({"background": False}, "requires 'background': true"),
            ({"background": True, "stream": True}, "cannot be used with 'stream': true"),
        ):
            with pytest.raises(openai.BadRequestError) as err:
                client.responses.create(
                    model="scripted",
                    input="hi",
                    background_options={"completion_window": "2h"},
                    **kwargs,
                )
            assert err.value.status_code == 400
            assert why in err.value.message
            assert err.value.body["param"] == "background_options.completion_window"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(
                model="scripted",
                input="hi",
                background=True,
                background_options={"completion_window": "24h"},  # type: ignore[typeddict-item]
            )
        assert err.value.body["param"] == "background_options.completion_window"  # type: ignore[index]
        # `soonest` needs nothing; `continuation_id` is accepted.
        r = client.responses.create(
            model="scripted",
            input="hi",
            background_options={"completion_window": "soonest", "continuation_id": "c1"},
        )
        assert r.status == "completed"


def metric(server: Server, line_start: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def started(server: Server, response_id: str) -> float | None:
    """When the scripted engine read the response's prompt (None: not yet)."""
    try:
        at = server.trace(response_id).get("prompt_read_at")
    except httpx.HTTPStatusError:
        return None
    return at if isinstance(at, float) else None


def test_one_slot_runs_interactive_work_before_the_backlog(make_server: Any) -> None:
    """One run slot busy; a backlog of `2h` responses and then one `soonest` response
    wait. When the slot frees, the `soonest` one runs first; the backlog runs after, on
    time, and each deferred response is an ordinary background response (cancellable,
    streamable)."""
    server: Server = make_server(
        "--workers", "1", "--scripted-rate", "200", "--scripted-length", "5"
    )
    with server.client() as client:
        busy = client.responses.create(model="scripted", input="LINGER=1.0", background=True)
        wait_for(lambda: started(server, busy.id), 10, "the slot taken")
        backlog = [
            client.responses.create(
                model="scripted",
                input=f"deferred {i}",
                background=True,
                background_options={"completion_window": "2h"},
            )
            for i in range(3)
        ]
        cancelled = client.responses.cancel(backlog[2].id)
        assert cancelled.status == "cancelled"
        interactive = client.responses.create(
            model="scripted", input="interactive", background=True
        )
        # The cancelled one's entry stays queued until taken: the worker skips it.
        assert metric(server, 'tether_queued_runs{class="deferred"}') == 3
        assert metric(server, 'tether_queued_runs{class="soonest"}') == 1
        for r in (busy, interactive, backlog[0], backlog[1]):
            wait_for(
                lambda r=r: client.responses.retrieve(r.id).status == "completed",
                30,
                f"{r.id} completed",
            )
        order = sorted((interactive, *backlog[:2]), key=lambda r: started(server, r.id) or 0)
        assert [r.id for r in order] == [interactive.id, backlog[0].id, backlog[1].id]
        assert metric(server, 'tether_deferred_starts_total{start="on_time"}') == 2
        assert metric(server, 'tether_deferred_starts_total{start="late"}') == 0
        # A deferred response streams and replays like any other.
        events = list(client.responses.retrieve(backlog[0].id, stream=True))
        assert events[-1].type == "response.completed"
        assert client.responses.retrieve(backlog[2].id).status == "cancelled"


def test_deferred_runs_leave_interactive_work_a_free_slot(make_server: Any) -> None:
    """Two run slots: deferred responses hold at most one (half), so a `soonest` one
    starts at once beside a deferred backlog, whose runs go one at a time."""
    server: Server = make_server(
        "--workers", "2", "--scripted-rate", "50", "--scripted-length", "50"
    )
    with server.client() as client:
        backlog = [
            client.responses.create(
                model="scripted",
                input=f"deferred {i}",
                background=True,
                background_options={"completion_window": "8h"},
            )
            for i in range(3)
        ]
        wait_for(lambda: started(server, backlog[0].id), 10, "the first deferred run")
        interactive = client.responses.create(model="scripted", input="now", background=True)
        wait_for(lambda: started(server, interactive.id), 10, "the interactive run")
        # It started while the first deferred run still ran; the second had not started.
        assert client.responses.retrieve(backlog[0].id).status == "in_progress"
        assert started(server, backlog[1].id) is None
        for r in backlog:
            wait_for(
                lambda r=r: client.responses.retrieve(r.id).status == "completed",
                30,
                f"{r.id} completed",
            )
        runs = sorted(
            (server.trace(r.id)["prompt_read_at"], server.trace(r.id)["token_times"][-1])  # type: ignore[index]
            for r in backlog
        )
        # One at a time: each began after the one before had produced its last token.
        assert all(runs[i + 1][0] >= runs[i][1] for i in range(len(runs) - 1))


# --- preemption: an interactive run takes over a deferred run's slot ------------------------


class PausingEngine:
    """What the worker asks of an engine that pauses deferred work (`Pausing`)."""

    concurrency = 1

    def __init__(self, pauses: bool = True) -> None:
        self.pauses = pauses
        self.expected: list[str] = []

    def pauses_deferred(self, model: str) -> bool:
        return self.pauses

    def expect(self, model: str) -> None:
        self.expected.append(model)


def one_slot_worker(engine: PausingEngine) -> Any:
    from types import SimpleNamespace

    from tether.config import Settings
    from tether.queueing import Queueing
    from tether.worker import Worker

    dispatch = LocalDispatch()
    settings = Settings()
    lc = SimpleNamespace(
        workers=1,
        settings=settings,
        dispatch=dispatch,
        engine=engine,
        queue=Queueing(dispatch, settings, "me"),
    )
    return Worker(lc)  # type: ignore[arg-type]


def record(rid: str, window: str, created_at: float | None = None) -> Any:
    from types import SimpleNamespace

    run = {} if window == "soonest" else {"window": window}
    at = time.time() if created_at is None else created_at
    return SimpleNamespace(id=rid, tenant="t", run=run, snapshot={"model": "m", "created_at": at})


def test_one_slot_lends_a_deferred_runs_slot_to_interactive_work_only() -> None:
    worker = one_slot_worker(PausingEngine())
    assert worker._room() and worker._may_defer()
    worker._hold(record("d1", "2h"))
    # The deferred run lends its slot: an interactive response (or a due deferred one)
    # may be taken, not another deferred one that is not due.
    assert worker._room() and not worker._may_defer()
    worker._hold(record("s1", "soonest"))
    assert not worker._room()  # lent once
    worker._release("s1")
    assert worker._room()
    worker._release("d1")
    assert worker._room() and worker._may_defer()
    # Past its deadline a deferred run is never paused: it lends nothing.
    worker._hold(record("d2", "2h", created_at=time.time() - 7_200))
    assert not worker._room()


def test_a_deferred_run_lends_nothing_when_its_engine_does_not_pause() -> None:
    worker = one_slot_worker(PausingEngine(pauses=False))
    worker._hold(record("d1", "8h"))
    assert not worker._room()


@pytest.mark.anyio
async def test_an_interactive_response_is_announced_to_its_engine_as_it_is_queued() -> None:
    engine = PausingEngine()
    worker = one_slot_worker(engine)
    queue = worker.lc.queue
    await queue.submit(record("d1", "2h"))
    assert engine.expected == []
    await queue.submit(record("s1", "soonest"))
    assert engine.expected == ["m"]


LONG = "Write a long, detailed story about a robot who learns to paint."


def deltas(events: list[Any]) -> int:
    return sum(e.type == "response.output_text.delta" for e in events)


def test_one_slot_an_interactive_response_takes_over_a_deferred_run(make_server: Any) -> None:
    """Issue 19, one run slot on the embedded model: an interactive response created while
    a `2h` run holds the slot runs at once, the deferred run paused meanwhile (no token of
    it while the interactive one decodes); the deferred one then goes on and completes
    with exact usage; a paused deferred response can be cancelled."""
    server: Server = make_server("--workers", "1", engine="local")
    with server.client() as client:
        deferred, victim = (
            client.responses.create(
                model="smollm2-135m",
                input=LONG,
                background=True,
                max_output_tokens=300,
                temperature=0,
                background_options={"completion_window": "2h"},
            )
            for _ in range(2)
        )
        wait_for(lambda: server.trace(deferred.id)["token_times"], 60, "the deferred run")
        interactive = client.responses.create(
            model="smollm2-135m", input="Describe a cat.", max_output_tokens=20, temperature=0
        )
        assert interactive.status in ("completed", "incomplete")
        mine, theirs = server.trace(interactive.id), server.trace(deferred.id)
        times = cast(list[float], theirs["token_times"])
        mine_times = cast(list[float], mine["token_times"])
        assert cast(float, mine["prompt_read_at"]) < times[-1]  # it did not wait for the run
        held = cast(float, mine["admitted_at"]), mine_times[-1]
        assert not [t for t in times if held[0] <= t <= held[1]]
        final = wait_for(
            lambda: (r := client.responses.retrieve(deferred.id)).status != "in_progress" and r,
            120,
            "the deferred run to end",
        )
        assert final.status in ("completed", "incomplete") and final.usage is not None
        events = list(client.responses.retrieve(deferred.id, stream=True))
        assert final.usage.output_tokens == deltas(events) == theirs_produced(server, deferred.id)
        # The second deferred response runs now; an interactive stream pauses it, and
        # it is cancelled while paused.
        wait_for(lambda: server.trace(victim.id)["token_times"], 60, "the second deferred run")
        with client.responses.create(
            model="smollm2-135m", input=LONG, max_output_tokens=60, temperature=0, stream=True
        ) as stream:
            seen = []
            for event in stream:
                seen.append(event)
                if deltas(seen) == 1:
                    cancelled = client.responses.cancel(victim.id)
            assert seen[-1].type in ("response.completed", "response.incomplete")
        assert cancelled.status == "cancelled" and cancelled.usage is not None
        events = list(client.responses.retrieve(victim.id, stream=True))
        assert events[-1].type == "response.failed"
        assert cancelled.usage.output_tokens == deltas(events) == theirs_produced(server, victim.id)
    assert metric(server, 'tether_deferred_starts_total{start="late"}') == 0


def theirs_produced(server: Server, rid: str) -> int:
    return cast(int, server.trace(rid)["produced"])
