"""Cancel at every phase of a run (docs/contract.md §1, §3): each phase a named test."""

from __future__ import annotations

import threading
import time
from typing import Any

from tether.engines.scripted import scripted_text

from conftest import Server, raw_events, wait_for


def start(client: Any, prompt: str, **kwargs: Any) -> str:
    response = client.responses.create(
        model=kwargs.pop("model", "scripted"), input=prompt, background=True, **kwargs
    )
    return str(response.id)


def check_cancelled(server: Server, client: Any, rid: str, reply: Any, tokens: int) -> None:
    """The reply, the log, a retrieve and the engine agree (§3.2, §3.4, §3.9)."""
    assert reply.status == "cancelled"
    assert reply.usage.output_tokens == tokens
    log = raw_events(server, rid)
    assert [e["sequence_number"] for e in log] == list(range(len(log)))
    assert [e["type"] for e in log].count("response.failed") == 1
    terminal = log[-1]
    assert terminal["type"] == "response.failed"
    assert terminal["response"]["status"] == "cancelled"
    assert terminal["response"]["error"] is None
    assert terminal["response"]["usage"] == reply.usage.model_dump(exclude_none=True)
    deltas = [e["delta"] for e in log if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == scripted_text(tokens)
    assert client.responses.retrieve(rid).usage == reply.usage


def test_cancel_while_queued(make_server) -> None:  # type: ignore[no-untyped-def]
    # One run at a time (the embedded engine batches up to 8): the second response waits queued.
    server = make_server("--workers", "1", engine="local")
    client = server.client()
    busy = start(client, "Write a long story.", model="smollm2-135m", max_output_tokens=200)
    wait_for(lambda: client.responses.retrieve(busy).status == "in_progress")
    queued = start(client, "hello", model="smollm2-135m")
    assert client.responses.retrieve(queued).status == "queued"
    reply = client.responses.cancel(queued)
    assert reply.status == "cancelled" and reply.usage.output_tokens == 0
    log = raw_events(server, queued)
    assert [e["type"] for e in log] == [
        "response.created",
        "response.queued",
        "response.failed",
    ]  # the run never started
    client.responses.cancel(busy)
    assert client.responses.retrieve(queued).status == "cancelled"


def test_cancel_while_reading_the_prompt(server, client) -> None:  # type: ignore[no-untyped-def]
    rid = start(client, "PREFILL=5 hello")
    wait_for(lambda: client.responses.retrieve(rid).status == "in_progress")
    reply = client.responses.cancel(rid)
    check_cancelled(server, client, rid, reply, 0)
    trace = server.trace(rid)
    assert trace["prompt_read_at"] is None and trace["produced"] == 0
    assert reply.usage.input_tokens == 0  # the prompt was never read


def test_cancel_before_the_first_token(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--scripted-rate", "0.2")  # five seconds to the first token
    client = server.client()
    rid = start(client, "hello there")
    wait_for(lambda: server.trace(rid)["prompt_read_at"])
    reply = client.responses.cancel(rid)
    check_cancelled(server, client, rid, reply, 0)
    assert reply.usage.input_tokens == 2  # read, and counted


def test_cancel_mid_stream(server, client) -> None:  # type: ignore[no-untyped-def]
    rid = start(client, "hello", stream=False)
    wait_for(lambda: server.trace(rid)["produced"] >= 10)
    reply = client.responses.cancel(rid)
    replied = time.time()
    trace = server.trace(rid)
    check_cancelled(server, client, rid, reply, trace["produced"])
    assert all(t <= replied for t in trace["token_times"])  # §3.3


def test_cancel_between_the_last_token_and_completion(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server("--scripted-length", "5")
    client = server.client()
    rid = start(client, "LINGER=5 hello")
    wait_for(lambda: server.trace(rid)["produced"] == 5)
    reply = client.responses.cancel(rid)
    check_cancelled(server, client, rid, reply, 5)  # every token it produced is counted
    assert server.trace(rid)["finished"] is False


def test_cancel_from_many_clients_at_once(server, client) -> None:  # type: ignore[no-untyped-def]
    # §3.5: concurrent cancels all get the same object
    rid = start(client, "hello")
    wait_for(lambda: server.trace(rid)["produced"] >= 3)
    replies: list[Any] = []

    def cancel() -> None:
        with server.client() as own:
            replies.append(own.responses.cancel(rid))

    threads = [threading.Thread(target=cancel) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(replies) == 5
    assert len({r.model_dump_json() for r in replies}) == 1
    check_cancelled(server, client, rid, replies[0], server.trace(rid)["produced"])
