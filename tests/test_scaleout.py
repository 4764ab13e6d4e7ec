"""Scaled out (issue 5): API replicas and workers on PostgreSQL + Redis, all real processes.

The end-to-end tests of test_lifecycle.py run here unchanged, against two API replicas
behind a round-robin client and two workers; then the failures only a cluster has:
a worker killed or paused mid-run, Redis or PostgreSQL restarting under load.

Every test runs twice (issue 21): on one Redis server (`one`) and on a Redis Cluster of 3
masters (`cluster`: `redis+cluster://`, the queue, cancels and wake-ups in shards).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from redis_cluster import PrivateRedisCluster
from test_lifecycle import (  # noqa: F401  (collected again here, against the cluster)
    test_every_reader_gets_the_terminal_event,
    test_motivating_scenario_background_stream_cancel,
)

from cluster import Cluster, PrivatePostgres, PrivateRedis
from conftest import raw_events, read_deltas, wait_for
from services import REDIS_KINDS, postgres_url, redis_of

LEASE = 2.0  # seconds: short, so lost runs end quickly in these tests


def make_cluster(tmp: Path, db: str, redis: str, **kwargs: Any) -> Cluster:
    cluster = Cluster(tmp, db, redis, f"t{uuid.uuid4().hex[:10]}", **kwargs)
    cluster.start()
    return cluster


@pytest.fixture(params=REDIS_KINDS)
def redis_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def private_redis(tmp_path: Path, redis_kind: str) -> Iterator[PrivateRedis | PrivateRedisCluster]:
    """A Redis of the test's own (to stop and restart), of the kind under test."""
    if redis_kind == "one":
        one = PrivateRedis(tmp_path)
        try:
            yield one
        finally:
            one.stop()
    else:
        several = PrivateRedisCluster(tmp_path)
        try:
            yield several
        finally:
            several.cleanup()


@pytest.fixture
def cluster(tmp_path: Path, redis_kind: str) -> Iterator[Cluster]:
    with postgres_url() as db:
        redis = redis_of(redis_kind)
        c = make_cluster(tmp_path, db, redis, args=("--lease-timeout", str(LEASE)))
        try:
            yield c
        finally:
            c.stop()


@pytest.fixture
def server(cluster: Cluster) -> Cluster:
    """What test_lifecycle's tests call `server`: here, the whole cluster."""
    return cluster


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with cluster.client() as c:
        yield c


def test_create_on_a_stream_on_b_resume_on_a_cancel_on_b(cluster: Cluster) -> None:
    # issue 5 acceptance; contract §2.4, §3.2–3.4, §4.5
    a, b = (api.client() for api in cluster.apis)
    created = a.responses.create(model="scripted", input="story", background=True, stream=True)
    rid, first = read_deltas(created, 3)
    on_b = b.responses.retrieve(rid, stream=True)
    seen_b, _ = [], None
    for event in on_b:
        seen_b.append(event)
        if event.type == "response.output_text.delta":
            break
    on_a = a.responses.retrieve(rid, stream=True, starting_after=2)
    runner = cluster.runner(rid)
    reply = b.responses.cancel(rid)
    replied_at = time.time()
    assert reply.status == "cancelled" and reply.usage is not None
    logs = {
        "created on A": first + list(created),
        "stream on B": seen_b + list(on_b),
        "resume on A": list(on_a),
    }
    for name, log in logs.items():
        assert log[-1].type == "response.failed", name
        assert log[-1].response.status == "cancelled", name
        assert log[-1].response.usage == reply.usage, name
    full = [e.sequence_number for e in logs["created on A"]]
    assert full == list(range(len(full)))
    assert [e.sequence_number for e in logs["resume on A"]] == full[3:]
    deltas = [e for e in logs["created on A"] if e.type == "response.output_text.delta"]
    trace = runner.trace(rid)
    # W1 stopped within one token step of the cancel reply, and usage is exact.
    assert trace["produced"] == len(deltas) == reply.usage.output_tokens
    late = [t for t in trace["token_times"] if t > replied_at]  # type: ignore[union-attr]
    assert len(late) <= 1
    assert a.responses.retrieve(rid).usage == reply.usage
    assert b.responses.cancel(rid).model_dump() == reply.model_dump()


class Events:
    """A raw SSE stream (the SDK raises on the `error` event a lost run ends with)."""

    def __init__(self, method: str, url: str, **kwargs: Any) -> None:
        self._cm = httpx.stream(method, url, timeout=60, **kwargs)
        response = self._cm.__enter__()
        response.raise_for_status()
        self._lines = response.iter_lines()
        self.events: list[dict[str, Any]] = []
        self.done = False

    def until_deltas(self, n: int) -> Events:
        while sum(e["type"] == "response.output_text.delta" for e in self.events) < n:
            self._next()
        return self

    def rest(self) -> list[dict[str, Any]]:
        while not self.done:
            self._next()
        self._cm.__exit__(None, None, None)
        return self.events

    def _next(self) -> None:
        line = next(self._lines)
        if line == "data: [DONE]":
            self.done = True
        elif line.startswith("data: "):
            self.events.append(json.loads(line[6:]))


def test_worker_killed_mid_run_ends_failed_and_streams_are_told(cluster: Cluster) -> None:
    # issue 5 acceptance; contract §6.1, §6.2
    a, b = cluster.apis
    created = Events(
        "POST",
        f"{a.base_url}/responses",
        json={"model": "scripted", "input": "story", "background": True, "stream": True},
    ).until_deltas(3)
    rid = created.events[0]["response"]["id"]
    reader = Events("GET", f"{b.base_url}/responses/{rid}", params={"stream": "true"})
    runner = cluster.runner(rid)
    runner.kill()  # SIGKILL: no goodbye, the lease just stops being renewed
    killed_at = time.monotonic()
    seen = created.rest()
    ended_at = time.monotonic()
    on_b = reader.rest()
    assert [e["type"] for e in seen[-2:]] == ["error", "response.failed"]
    terminal = seen[-1]["response"]
    assert terminal["status"] == "failed"
    assert terminal["error"]["code"] == "server_error"
    # Ended by whoever saw the lease run out: bounded by the lease, not by a stream timeout.
    assert ended_at - killed_at < 3 * LEASE + 5
    full = [e["sequence_number"] for e in seen]
    assert full == list(range(len(full)))
    assert on_b == seen
    for after in (0, len(full) // 2, len(full) - 2):
        assert raw_events(cluster.apis[after % 2], rid, starting_after=after) == seen[after + 1 :]
    final = b.client().responses.retrieve(rid)
    assert final.status == "failed"
    deltas = sum(e["type"] == "response.output_text.delta" for e in seen)
    assert final.usage is not None and final.usage.output_tokens == deltas


def test_paused_worker_cannot_append_after_losing_its_lease(cluster: Cluster) -> None:
    # issue 5 acceptance; contract §2.3, §6.2: fencing, not timing, keeps a slow worker out
    a = cluster.apis[0]
    created = Events(
        "POST",
        f"{a.base_url}/responses",
        json={"model": "scripted", "input": "story", "background": True, "stream": True},
    ).until_deltas(3)
    rid = created.events[0]["response"]["id"]
    runner = cluster.runner(rid)
    assert runner.proc is not None
    runner.proc.send_signal(signal.SIGSTOP)
    try:
        seen = created.rest()  # ends when another process fails the run (lease expiry)
    finally:
        runner.proc.send_signal(signal.SIGCONT)
    assert seen[-1]["type"] == "response.failed"
    log_before = raw_events(cluster.apis[1], rid)
    assert log_before == seen
    # The resumed worker's run goes on until the store refuses it (its next append is
    # fenced, or its batch in flight during the pause fails): then it is gone.
    wait_for(
        lambda: httpx.get(f"{runner.url}/debug/process", timeout=5).json()["runs"] == 0,
        30,
        "the paused run to end",
    )
    assert raw_events(cluster.apis[0], rid) == log_before
    final = a.client().responses.retrieve(rid)
    deltas = sum(e["type"] == "response.output_text.delta" for e in log_before)
    assert final.usage is not None and final.usage.output_tokens == deltas


def test_requests_without_redis_get_503_not_a_hang(
    tmp_path: Path, private_redis: PrivateRedis | PrivateRedisCluster
) -> None:
    # issue 5: a clear error during an outage
    private = private_redis
    private.start()
    with postgres_url() as db:
        c = make_cluster(tmp_path, db, private.url, apis=1, workers=1)
        try:
            client = c.client()
            done = client.responses.create(model="scripted", input="x", max_output_tokens=3)
            private.stop()
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as err:
                client.responses.create(model="scripted", input="x", background=True)
            assert err.value.status_code == 503
            assert time.monotonic() - started < 15
            body = err.value.response.json()["error"]
            assert body["type"] == "server_error" and body["code"] == "service_unavailable"
            # What is durable in PostgreSQL still reads.
            assert client.responses.retrieve(done.id).status == "incomplete"
        finally:
            c.stop()
            private.stop()


def _load(cluster: Cluster, n: int, outage: Any) -> None:
    """`n` background streams, with `outage()` run once every stream has deltas.
    Checks that what every reader saw is the final log's start (nothing lost or
    duplicated), and that every response completed, with exact usage: the runs rode
    the outage out."""
    body = {"model": "scripted", "background": True, "stream": True}
    streams = [
        Events("POST", f"{cluster.base_url}/responses", json={**body, "input": f"{i}"})
        for i in range(n)
    ]
    for stream in streams:
        stream.until_deltas(2)
    outage()
    seen: dict[int, list[dict[str, Any]]] = {}

    def read(i: int) -> None:
        with contextlib.suppress(httpx.HTTPError, StopIteration):
            streams[i].rest()  # a stream cut by the outage is read as far as it went
        seen[i] = streams[i].events

    threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ids = {i: stream.events[0]["response"]["id"] for i, stream in enumerate(streams)}
    for i in range(n):
        rid = ids[i]
        log = wait_for(lambda rid=rid: _final_log(cluster, rid), 60, "a terminal log")
        # What a reader saw, even one cut off by the outage, is the log's beginning.
        assert seen[i] == log[: len(seen[i])]
        assert log[-1]["type"] == "response.completed", log[-1]
        usage = log[-1]["response"]["usage"]
        deltas = sum(e["type"] == "response.output_text.delta" for e in log)
        assert usage["output_tokens"] == deltas


def _final_log(cluster: Cluster, rid: str) -> list[dict[str, Any]] | None:
    try:
        log = raw_events(cluster.apis[0], rid, timeout=30)
    except httpx.HTTPError:
        return None
    return log if log and log[-1]["type"].startswith("response.") else None


def test_redis_restart_during_load_loses_nothing(
    tmp_path: Path, private_redis: PrivateRedis | PrivateRedisCluster
) -> None:
    # issue 5 acceptance: the streams live in Redis, the truth in PostgreSQL (on a
    # cluster: every node restarts, empty, and the cluster forms again from nodes.conf)
    private = private_redis
    private.start()
    with postgres_url() as db:
        c = make_cluster(
            tmp_path,
            db,
            private.url,
            apis=2,
            workers=1,
            args=("--scripted-rate", "50", "--scripted-length", "150"),
        )
        try:

            def outage() -> None:
                private.stop()
                time.sleep(1.0)  # an outage of a second: Redis is really away meanwhile
                private.start()

            _load(c, 6, outage)
        finally:
            c.stop()
            private.stop()


def test_postgres_restart_during_load_loses_nothing(tmp_path: Path, redis_kind: str) -> None:
    # issue 5 acceptance: a database restart is an outage, not a loss. The batch of
    # events in flight when the database went away is resolved against the log once it
    # is back (written or not, never twice), and the runs go on.
    private = PrivatePostgres()
    try:
        private.start()
        c = make_cluster(
            tmp_path,
            private.url,
            redis_of(redis_kind),
            apis=2,
            workers=1,
            args=("--scripted-rate", "50", "--scripted-length", "150"),
        )
        try:

            def outage() -> None:
                private.stop()
                api = c.apis[0].client()
                with pytest.raises(openai.APIStatusError) as err:
                    api.responses.create(model="scripted", input="x", background=True)
                assert err.value.status_code == 503
                private.start()

            _load(c, 6, outage)
        finally:
            c.stop()
    finally:
        private.cleanup()


def test_a_conversation_turn_created_on_a_and_cancelled_on_b(cluster: Cluster) -> None:
    # issue 18: the same items as in one process (test_conversations.py), across
    # replicas: the lock, the cancel and the append are decided by PostgreSQL.
    a, b = (api.client() for api in cluster.apis)
    conv = a.conversations.create(items=[{"role": "user", "content": "hello"}])
    stream = a.responses.create(
        model="scripted", input="tell me", conversation=conv.id, background=True, stream=True
    )
    rid, _ = read_deltas(stream, 3)
    with pytest.raises(openai.BadRequestError) as err:  # one turn at a time, on b too
        b.responses.create(model="scripted", input="x", conversation=conv.id)
    assert err.value.code == "conversation_locked"
    reply = b.responses.cancel(rid)
    stream.close()
    assert reply.status == "cancelled" and reply.output[0].status == "incomplete"  # type: ignore[union-attr]
    items = list(b.conversations.items.list(conv.id, order="asc"))
    texts = ["".join(p.text for p in i.content) for i in items]  # type: ignore[union-attr]
    assert texts == ["hello", "tell me", reply.output_text]
    assert items[2].model_dump() == reply.output[0].model_dump()
    assert a.responses.retrieve(rid).output_text == reply.output_text
    nxt = b.responses.create(model="scripted", input="go on", conversation=conv.id, background=True)
    wait_for(lambda: cluster.trace(nxt.id) is not None, 10, "the next turn runs")
    trace = cluster.trace(nxt.id)
    assert trace is not None
    prompt = [m["text"] for m in trace["messages"]]  # type: ignore[attr-defined]
    assert prompt == ["hello", "tell me", reply.output_text, "go on"]
    a.responses.cancel(nxt.id)
