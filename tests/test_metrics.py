"""`GET /metrics`: counters that add up to what the SDK saw, gauges that come back to 0."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from upstreams import FakeUpstream, fake_upstream

from cluster import Cluster
from conftest import Server, read_deltas, wait_for
from services import postgres_url, redis_url

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of `/metrics`, by (sample name, sorted labels)."""
    r = httpx.get(f"{url}/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        assert family.name.startswith("tether_"), family.name
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


def test_counters_equal_what_the_clients_saw(make_server: Any) -> None:
    # 20 tokens at 50/s: a response ends by itself in 0.4 s, so a cancel after 3 deltas
    # comes mid-stream; LINGER keeps it open after its last token for a slow client.
    server: Server = make_server("--scripted-rate", "50", "--scripted-length", "20")
    finals: list[Any] = []
    cancel_ids = []
    with server.client() as client:
        for _ in range(3):  # completed (the engine's natural end)
            finals.append(client.responses.create(model="scripted", input="hi"))
        finals.append(
            client.responses.create(model="scripted", input="hi", max_output_tokens=5)
        )  # incomplete
        finals.append(client.responses.create(model="scripted", input="FAIL_AT=4 go"))
        for _ in range(2):  # background streams, cancelled mid-stream
            stream = client.responses.create(
                model="scripted", input="LINGER=30 go", background=True, stream=True
            )
            rid, _ = read_deltas(stream, 3)
            reply = client.responses.cancel(rid)
            assert reply.status == "cancelled"
            assert [e.type for e in stream][-1] == "response.failed"  # the stream ends
            cancel_ids.append(rid)
        # A second cancel of a cancelled response stops nothing: no latency observed.
        assert client.responses.cancel(cancel_ids[0]).status == "cancelled"
        finals += [client.responses.retrieve(rid) for rid in cancel_ids]

    statuses = [f.status for f in finals]
    assert sorted(statuses) == sorted(
        ["completed"] * 3 + ["incomplete", "failed"] + ["cancelled"] * 2
    )
    tokens = sum(f.usage.output_tokens for f in finals)
    assert tokens == 3 * 20 + 5 + 4 + sum(f.usage.output_tokens for f in finals[-2:])

    wait_for(lambda: value(scrape(server.url), "tether_active_runs") == 0, what="no runs left")
    wait_for(
        lambda: value(scrape(server.url), "tether_active_readers") == 0, what="no readers left"
    )
    m = scrape(server.url)
    assert value(m, "tether_responses_created_total") == len(finals)
    for status in ("completed", "failed", "incomplete", "cancelled"):
        assert value(m, "tether_responses_finished_total", status=status) == statuses.count(
            status
        ), status
    assert value(m, "tether_output_tokens_total") == tokens
    assert value(m, "tether_reasoning_tokens_total") == 0  # the scripted engine did not think
    assert value(m, "tether_tokens_after_cancel_total") == 0
    assert value(m, "tether_cancel_seconds_count") == len(cancel_ids)
    assert 0 < value(m, "tether_cancel_seconds_sum") < 2 * len(cancel_ids)
    assert value(m, "tether_event_log_append_seconds_count") > 0
    assert value(m, "tether_upstream_errors_total", engine="chat") == 0
    assert value(m, "tether_process_cpu_seconds_total") > 0


def test_reasoning_tokens_counted_as_output_tokens_are(make_server: Any) -> None:
    # Of responses that ended, from their final usage: completed, and cancelled while
    # thinking and while answering (the part of output_tokens that was thinking).
    server: Server = make_server("--scripted-rate", "100", "--scripted-length", "20")
    finals = []
    with server.client() as client:
        finals.append(client.responses.create(model="scripted", input="THINK=6 go"))
        for prompt, kind, n in (
            ("THINK=1000 go", "response.reasoning_text.delta", 3),
            ("THINK=4 go", "response.output_text.delta", 3),
        ):
            stream = client.responses.create(
                model="scripted", input=prompt, background=True, stream=True
            )
            rid, seen = "", 0
            for event in stream:
                rid = event.response.id if event.type == "response.created" else rid
                seen += event.type == kind
                if seen == n:
                    break
            assert client.responses.cancel(rid).status == "cancelled"
            list(stream)
            finals.append(client.responses.retrieve(rid))
    wait_for(lambda: value(scrape(server.url), "tether_active_runs") == 0, what="no runs left")
    m = scrape(server.url)
    reasoning = [f.usage.output_tokens_details.reasoning_tokens for f in finals]
    assert reasoning[0] == 6 and reasoning[1] >= 3 and reasoning[2] == 4
    assert value(m, "tether_reasoning_tokens_total") == sum(reasoning)
    assert value(m, "tether_output_tokens_total") == sum(f.usage.output_tokens for f in finals)
    assert value(m, "tether_responses_finished_total", status="cancelled") == 2


def test_gauges_follow_runs_and_streams(make_server: Any) -> None:
    server: Server = make_server("--scripted-rate", "50", "--scripted-length", "100")
    with server.client() as client:
        stream = client.responses.create(model="scripted", input="hi", background=True, stream=True)
        rid, _ = read_deltas(stream, 1)
        with client.responses.retrieve(rid, stream=True) as second:
            next(iter(second))
            m = scrape(server.url)
            assert value(m, "tether_active_runs") == 1
            assert value(m, "tether_active_readers") == 2
        wait_for(
            lambda: value(scrape(server.url), "tether_active_readers") == 1,
            what="the closed reader to go",
        )
        client.responses.cancel(rid)
        list(stream)
    wait_for(lambda: value(scrape(server.url), "tether_active_runs") == 0, what="run end")
    wait_for(lambda: value(scrape(server.url), "tether_active_readers") == 0, what="reader end")


def test_upstream_errors_by_engine_kind(make_server: Any, fake: FakeUpstream) -> None:
    server: Server = make_server(
        "--upstream",
        f"chat={fake.url},retries=2",
        "--upstream",
        f"resp=responses+{fake.url},retries=0",
        engine="none",
    )
    with server.client() as client:
        ok = client.responses.create(model="chat", input="LENGTH=3 go")
        assert ok.status == "completed"
        m = scrape(server.url)
        assert value(m, "tether_upstream_errors_total", engine="chat") == 0
        # A 500 is not retried: one failed attempt. A 503 is tried 1 + 2 times.
        for status in (500, 503):
            failed = client.responses.create(model="chat", input=f"STATUS={status} go")
            assert failed.status == "failed"
        failed = client.responses.create(model="resp", input="STATUS=500 go")
        assert failed.status == "failed"
    m = scrape(server.url)
    assert (
        value(m, "tether_upstream_errors_total", engine="chat")
        == 1 + 3
        == len([c for c in fake.calls if c.path.endswith("/chat/completions")]) - 1
    )
    assert value(m, "tether_upstream_errors_total", engine="responses") == 1
    assert value(m, "tether_responses_finished_total", status="failed") == 3
    assert value(m, "tether_responses_finished_total", status="completed") == 1
    assert value(m, "tether_output_tokens_total") == 3


def test_each_process_of_a_cluster_counts_its_own(tmp_path: Path) -> None:
    # A worker serves /metrics too, and counts what it did: the API replica created the
    # response, the worker ran it (its appends are PostgreSQL group commits).
    with postgres_url() as db:
        cluster = Cluster(
            tmp_path,
            db,
            redis_url(),
            f"t{uuid.uuid4().hex[:10]}",
            apis=1,
            workers=1,
            args=("--scripted-rate", "0", "--scripted-length", "7"),
        )
        cluster.start()
        try:
            with cluster.client() as client:
                done = client.responses.create(model="scripted", input="hi")
            assert done.status == "completed" and done.usage is not None
            api, worker = (scrape(p.url) for p in cluster.processes)
            assert value(api, "tether_responses_created_total") == 1
            assert value(api, "tether_responses_finished_total", status="completed") == 0
            assert value(worker, "tether_responses_created_total") == 0
            assert value(worker, "tether_responses_finished_total", status="completed") == 1
            assert value(worker, "tether_output_tokens_total") == done.usage.output_tokens == 7
            assert value(worker, "tether_event_log_append_seconds_count") > 0
            assert value(api, "tether_event_log_append_seconds_count") == 0
        finally:
            cluster.stop()
