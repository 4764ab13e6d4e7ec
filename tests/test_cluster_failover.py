"""A Redis Cluster master fails during live streams (issue 21, acceptance 2).

3 masters + 3 replicas (cluster-node-timeout 1 s), 2 API replicas and 2 workers, 200 live
background streams with two readers each (the creating stream on one API replica, a resume on
the other), opened and checked from a pool of threads. The runs would outlast the test (5
tokens a second, 100,000 tokens), so every one is live at the kill however slowly 200 streams
open on the 2-core test machine. The master that holds the first response's live log is
SIGKILLed (it holds about a third of the live logs: responses running on the failed shard);
its replica takes over. Then: every process subscribes again; every run goes on (each stream
gets more deltas after the failover: the runs write to PostgreSQL and renew their leases
there, so losing a Redis master costs them nothing, as the contract says); the test cancels
them all, and every reader ends with its terminal event, with no gap and no duplicate
(exactly the log after its cursor), usage exact (= deltas = the engine's tokens = the cancel
reply's); and the queue on the new master takes new work.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from redis_cluster import PrivateRedisCluster, wait_failover
from test_scaleout import Events

from cluster import Cluster
from conftest import raw_events, wait_for
from invariants import Cancel, Seen, check_response
from services import postgres_url

STREAMS = 200
RATE = 5  # tokens a second
LENGTH = 100_000  # a run outlasts the test however slowly its streams open: the test ends it
MORE = 5  # deltas every stream must get after the failover before the test cancels it
SHORT = 16  # tokens of the new work after the failover: 4 s each
RETRIES = 5  # a 503 (the store busy past its wait: 200 streams opening on 2 loaded cores)
POOL = 32  # threads that create (and later check) the streams


def test_a_master_fails_during_200_live_streams_and_every_reader_ends_whole(
    tmp_path: Path,
) -> None:
    redis = PrivateRedisCluster(tmp_path, masters=3, replicas=1)
    try:
        redis.start()
        with postgres_url() as db:
            prefix = f"t{uuid.uuid4().hex[:10]}"
            tether = Cluster(
                tmp_path,
                db,
                redis.url,
                prefix,
                args=(
                    *("--scripted-rate", str(RATE), "--scripted-length", str(LENGTH)),
                    *("--log-level", "info"),  # (to see the subscriptions come back)
                ),
                worker_args=("--workers", str(STREAMS)),
            )
            tether.start()
            try:
                _run(redis, tether, prefix)
            finally:
                tether.stop()
    finally:
        redis.cleanup()


def _run(redis: PrivateRedisCluster, tether: Cluster, prefix: str) -> None:
    a, b = tether.apis
    body = {"model": "scripted", "background": True, "stream": True}

    # Each response gets two readers: its creating stream, and a resume from its start on
    # the other API replica.
    def create(i: int) -> tuple[Events, Events]:
        url = f"{(a, b)[i % 2].base_url}/responses"
        creator = _open("POST", url, json={**body, "input": f"{i}"}).until_deltas(2)
        rid = creator.events[0]["response"]["id"]
        url = f"{(b, a)[i % 2].base_url}/responses/{rid}"
        return creator, _open("GET", url, params={"stream": "true"})

    began = time.monotonic()
    with ThreadPoolExecutor(POOL) as pool:
        pairs = list(pool.map(create, range(STREAMS)))
    creators, resumers = [p[0] for p in pairs], [p[1] for p in pairs]
    ids = [stream.events[0]["response"]["id"] for stream in creators]
    print(f"{STREAMS} streams and their resumes opened in {time.monotonic() - began:.1f} s")
    victim = redis.node_of(f"{prefix}:log:{{{ids[0]}}}")
    doomed = [rid for rid in ids if redis.node_of(f"x{{{rid}}}") is victim]
    print(f"killing master :{victim.port}, which holds {len(doomed)} of {STREAMS} live logs")
    with a.client() as strict, ThreadPoolExecutor(POOL) as pool:
        client = strict.with_options(max_retries=RETRIES)  # a 503 is retried, as by default
        statuses = list(pool.map(lambda r: client.responses.retrieve(r).status, ids))
    running = [r for r, status in zip(ids, statuses, strict=True) if status == "in_progress"]
    assert len(running) == STREAMS, len(running)
    on_victim = len(set(running) & set(doomed))
    print(f"{len(running)} of {STREAMS} responses running at the kill, {on_victim} on its shard")
    assert on_victim > 0
    redis.kill(victim)
    killed_at = time.monotonic()

    seen: dict[tuple[int, int], list[dict[str, Any]]] = {}
    errors: list[BaseException] = []

    def read(kind: int, i: int) -> None:
        try:
            seen[(kind, i)] = (creators, resumers)[kind][i].rest()
        except BaseException as exc:  # reported below, with the stream it ended
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(k, i)) for k in (0, 1) for i in range(STREAMS)]
    for t in threads:
        t.start()
    wait_failover(redis, victim)
    print(f"a replica took over {time.monotonic() - killed_at:.1f} s after the kill")
    # Every process lost its subscriptions (they span all masters) and got them back from
    # the promoted replica: wake-ups and cancels flow again, no process is left polling.
    for process in tether.processes:
        assert process.log is not None

        def back(log: Path = process.log) -> bool:
            text = log.read_text()
            return "Redis subscription back" in text and "cancel channel back" in text

        wait_for(back, 30, f"{process.log.name} to subscribe again")
    # Every run goes on after the failover (those whose log was on the failed master too)
    # and its readers see it; then the test ends the runs (they would outlast it).
    marks = [_deltas(stream) for stream in creators]
    wait_for(
        lambda: all(_deltas(s) >= m + MORE for s, m in zip(creators, marks, strict=True)),
        60,
        f"every stream to get {MORE} more deltas after the failover",
    )
    print(f"every stream went on after the failover, {time.monotonic() - killed_at:.1f} s")

    def cancel(i: int) -> Cancel:
        url = f"{(b, a)[i % 2].base_url}/responses/{ids[i]}/cancel"
        for _ in range(RETRIES):
            reply = httpx.post(url, timeout=120)
            if reply.status_code != 503:
                break
            time.sleep(1.0)  # the reply's retry-after
        return Cancel(reply.status_code, reply.json(), time.time())

    with ThreadPoolExecutor(POOL) as pool:
        cancels = list(pool.map(cancel, range(STREAMS)))
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(seen) == 2 * STREAMS
    print(f"every reader ended {time.monotonic() - killed_at:.1f} s after the kill")

    def check(i: int) -> None:
        rid = ids[i]
        log = wait_for(lambda: _final(tether, rid), 60, "a terminal log")
        done = creators[i].done and resumers[i].done  # each saw `data: [DONE]`
        readers = [Seen(-1, seen[(0, i)], done), Seen(-1, seen[(1, i)], done)]
        # (exact usage, text = deltas, the reply's usage = the log's, produced = deltas)
        check_response(a.base_url, rid, log, readers, [cancels[i]], tether.trace(rid))
        assert cancels[i].status == 200, (rid, cancels[i].body)
        assert log[-1]["response"]["status"] == "cancelled", (rid, log[-1]["type"])
        deltas = sum(e["type"] == "response.output_text.delta" for e in log)
        assert deltas >= marks[i] + MORE

    with ThreadPoolExecutor(POOL) as pool:
        list(pool.map(check, range(STREAMS)))  # (re-raises the first failed check)

    # The queue and the live logs work on the promoted master: new work runs and streams.
    def after(n: int) -> None:
        with tether.client() as strict:
            done = strict.with_options(max_retries=RETRIES).responses.create(
                model="scripted", input=f"after {n}", max_output_tokens=SHORT
            )
            assert done.usage is not None and done.usage.output_tokens == SHORT

    with ThreadPoolExecutor(6) as pool:  # ids hash to every shard, the new master's among them
        list(pool.map(after, range(6)))


def _open(method: str, url: str, **kwargs: Any) -> Events:
    """A stream, opened as the SDK would: a 503 (the store busy past its wait, here from
    200 streams opening at once on 2 cores; `x-should-retry: true`) is tried again."""
    for _ in range(RETRIES):
        try:
            return Events(method, url, **kwargs)
        except httpx.HTTPStatusError as exc:
            exc.response.close()
            if exc.response.status_code != 503:
                raise
            time.sleep(1.0)  # the reply's retry-after
    return Events(method, url, **kwargs)


def _deltas(stream: Events) -> int:
    """Deltas a stream's reading thread has received so far."""
    return sum(e["type"] == "response.output_text.delta" for e in list(stream.events))


def _final(tether: Cluster, rid: str) -> list[dict[str, Any]] | None:
    try:
        log = raw_events(tether.apis[0], rid, timeout=30)
    except httpx.HTTPError:
        return None
    return log if log and log[-1]["type"].startswith("response.") else None
