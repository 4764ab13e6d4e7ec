"""tether.client: cancel() and auto-resume over the real `openai` SDK (issue 6).

Against a real `tether serve`, a fault-injecting server (tests/faulty_upstream.py) and a
proxy that cuts connections (tests/cutting_proxy.py). Runs under openai 3.x here and under
openai 2.x via scripts/test-openai2 (there the servers run on TETHER_SERVER_PYTHON).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest

from cutting_proxy import CuttingProxy
from faulty_upstream import FaultyUpstream
from tether.client import (
    AsyncCancellableStream,
    Backoff,
    CancelIgnoredWarning,
    CancellableStream,
    cancellable,
    resumable,
)
from tether.client._common import is_connection_error

from conftest import Server, raw_events

FAST = Backoff(initial=0.01, maximum=0.1, max_attempts=8)
GRACE = 0.75


class ClientTestServer(Server):
    """`tether serve` on TETHER_SERVER_PYTHON when set (the openai-2 venv has no server)."""

    def start(self, timeout: float = 60.0) -> None:
        python = os.environ.get("TETHER_SERVER_PYTHON")
        real = sys.executable
        sys.executable = python or real
        try:
            super().start(timeout)
        finally:
            sys.executable = real


def _start(directory: Path, *args: str) -> Server:
    server = ClientTestServer(
        directory / "tether.db", ["--engine", "scripted", "--debug-routes", *args]
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """20 tokens/s: a token step (50 ms) is long enough to check "within one step"."""
    server = _start(tmp_path_factory.mktemp("slow"), "--scripted-rate", "20")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """200 tokens/s, 200 tokens: one-second streams for the resume tests."""
    server = _start(tmp_path_factory.mktemp("fast"), "--scripted-rate", "200")
    yield server
    server.stop()


@pytest.fixture
def make_tether(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(*args: str) -> Server:
        directory = tmp_path / str(len(servers))
        directory.mkdir()
        servers.append(_start(directory, *args))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def seeded() -> random.Random:
    seed = int(os.environ.get("TETHER_SEED", random.randrange(2**32)))
    print(f"seed={seed} (rerun with TETHER_SEED={seed})")
    return random.Random(seed)


def deltas(events: list[Any]) -> list[Any]:
    return [e for e in events if e.type == "response.output_text.delta"]


def assert_once_in_order(events: list[Any], start: int = 0) -> None:
    seqs = [e.sequence_number for e in events]
    assert seqs == list(range(start, start + len(seqs)))


def check_cancelled(
    server: Server, client: openai.OpenAI, wrapper: Any, final: Any, events: list[Any], asked: float
) -> None:
    """contract §3.2–§3.4, §3.9 as seen through the wrapper."""
    assert final.status == "cancelled" and final.error is None
    assert not wrapper.server_ignored_cancel
    assert wrapper.response_id == final.id
    assert_once_in_order(events)
    terminal = events[-1]
    assert terminal.type == "response.failed" and terminal.response.status == "cancelled"
    assert terminal.response.usage == final.usage
    # Exact usage: every token the engine produced reached the caller, no more, no less.
    trace = server.trace(final.id)
    assert final.usage.output_tokens == len(deltas(events)) == trace["produced"]
    # It stopped within one token step of the call.
    assert sum(t > asked for t in trace["token_times"]) <= 1  # type: ignore[attr-defined]
    assert client.responses.retrieve(final.id).usage == final.usage


# --- cancel() against tether ---------------------------------------------------------------


@pytest.mark.parametrize("background", [True, False], ids=["background", "foreground"])
def test_cancel_mid_stream_sync(slow: Server, background: bool) -> None:
    server = slow
    with server.client() as client:
        stream = cancellable(
            client.responses.create(model="scripted", input="x", background=background, stream=True)
        )
        assert isinstance(stream, CancellableStream)
        seen = []
        for event in stream:
            seen.append(event)
            if len(deltas(seen)) == 3:
                break
        asked = time.time()
        final = stream.cancel()
        rest = list(stream)  # what cancel() read on the way is still delivered, once
        check_cancelled(server, client, stream, final, seen + rest, asked)
        assert stream.cancel() is final
        assert stream.final_response is final


@pytest.mark.anyio
@pytest.mark.parametrize("background", [True, False], ids=["background", "foreground"])
async def test_cancel_mid_stream_async(slow: Server, background: bool) -> None:
    server = slow
    async with server.async_client() as client:
        stream = cancellable(
            await client.responses.create(
                model="scripted", input="x", background=background, stream=True
            )
        )
        assert isinstance(stream, AsyncCancellableStream)
        seen = []
        async for event in stream:
            seen.append(event)
            if len(deltas(seen)) == 3:
                break
        asked = time.time()
        final = await stream.cancel()
        rest = [event async for event in stream]
    with server.client() as sync_client:
        check_cancelled(server, sync_client, stream, final, seen + rest, asked)
    assert await stream.cancel() is final


def test_cancel_helper_stream_sync(slow: Server) -> None:
    server = slow
    with (
        server.client() as client,
        client.responses.stream(model="scripted", input="x", background=True) as helper,
    ):
        stream = cancellable(helper)
        seen = []
        for event in stream:
            seen.append(event)
            if len(deltas(seen)) == 2:
                break
        asked = time.time()
        final = stream.cancel()
        rest = list(stream)
        check_cancelled(server, client, stream, final, seen + rest, asked)
        assert stream.get_final_response() is final
        assert all(hasattr(e, "snapshot") for e in deltas(seen + rest))  # the helper's events


@pytest.mark.anyio
async def test_cancel_helper_stream_async(slow: Server) -> None:
    server = slow
    async with (
        server.async_client() as client,
        client.responses.stream(model="scripted", input="x") as helper,
    ):
        stream = cancellable(helper)
        seen = []
        async for event in stream:
            seen.append(event)
            if len(deltas(seen)) == 2:
                break
        asked = time.time()
        final = await stream.cancel()
        rest = [event async for event in stream]
    with server.client() as sync_client:
        check_cancelled(server, sync_client, stream, final, seen + rest, asked)


def test_cancel_before_reading_reads_ahead_to_the_id(slow: Server) -> None:
    server = slow
    client = server.client()
    stream = cancellable(
        client.responses.create(model="scripted", input="x", background=True, stream=True)
    )
    assert stream.response_id is None
    final = stream.cancel()
    events = list(stream)
    assert events[0].type == "response.created" and stream.response_id == final.id
    assert_once_in_order(events)
    assert final.status == "cancelled"
    assert final.usage is not None
    assert final.usage.output_tokens == len(deltas(events)) == server.trace(final.id)["produced"]


def test_cancel_after_the_end_returns_the_ending(slow: Server) -> None:
    client = slow.client()
    stream = cancellable(
        client.responses.create(model="scripted", input="x", max_output_tokens=3, stream=True)
    )
    events = list(stream)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        final = stream.cancel()
    assert final.status == "incomplete" and final is events[-1].response
    assert final.usage is not None and final.usage.output_tokens == 3
    assert not stream.server_ignored_cancel


def test_error_event_raises_and_cancel_reports_the_failure(slow: Server) -> None:
    client = slow.client()
    # contract §6.1: the SDK raises on the nested `error`; the wrapper lets it through
    stream = cancellable(client.responses.create(model="scripted", input="FAIL_AT=3", stream=True))
    with pytest.raises(openai.APIError) as exc:
        list(stream)
    assert not isinstance(exc.value, openai.APIConnectionError)
    final = stream.cancel()
    assert final.status == "failed" and final.error is not None
    assert final.usage is not None and final.usage.output_tokens == 3
    assert not stream.server_ignored_cancel


def test_cancel_from_another_thread_ends_the_readers_loop(slow: Server) -> None:
    # A "stop" button: one thread iterates, another cancels.
    server = slow
    with server.client() as client:
        stream = cancellable(client.responses.create(model="scripted", input="x", stream=True))
        events: list[Any] = []
        three = threading.Event()

        def read() -> None:
            for event in stream:
                events.append(event)
                if len(deltas(events)) == 3:
                    three.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert three.wait(10)
        asked = time.time()
        final = stream.cancel()
        reader.join(10)
        assert not reader.is_alive()
        check_cancelled(server, client, stream, final, events, asked)


@pytest.mark.anyio
async def test_cancel_from_another_task_ends_the_readers_loop(slow: Server) -> None:
    server = slow
    async with server.async_client() as client:
        stream = cancellable(
            await client.responses.create(model="scripted", input="x", background=True, stream=True)
        )
        events: list[Any] = []
        three = anyio.Event()

        async def read() -> None:
            async for event in stream:
                events.append(event)
                if len(deltas(events)) == 3:
                    three.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read)
            with anyio.fail_after(10):
                await three.wait()
            asked = time.time()
            final = await stream.cancel()
    with server.client() as sync_client:
        check_cancelled(server, sync_client, stream, final, events, asked)


# --- auto-resume through a proxy that cuts connections ---------------------------------------


def check_complete(server: Server, rid: str, events: list[Any], start: int = 0) -> None:
    full = raw_events(server, rid)
    assert_once_in_order(events, start)
    assert [(e.sequence_number, e.type) for e in events] == [
        (e["sequence_number"], e["type"]) for e in full[start:]
    ]
    assert "".join(e.delta for e in deltas(events)) == "".join(
        str(e["delta"]) for e in full if e["type"] == "response.output_text.delta"
    )
    assert events[-1].type == "response.completed"


def test_resumable_survives_cuts_sync(fast: Server) -> None:
    server = fast
    with server.client() as client:
        rid = client.responses.create(model="scripted", input="x", background=True).id
    with (
        CuttingProxy(server.port, seeded(), cut_bytes=(400, 4000)) as proxy,
        openai.OpenAI(base_url=proxy.base_url, api_key="test", max_retries=0) as cut_client,
    ):
        events = list(resumable(cut_client, rid, backoff=FAST))
    assert proxy.cuts >= 5, proxy.cuts
    check_complete(server, rid, events)


@pytest.mark.anyio
async def test_resumable_survives_cuts_async(fast: Server) -> None:
    server = fast
    with server.client() as client:
        rid = client.responses.create(model="scripted", input="x", background=True).id
    with CuttingProxy(server.port, seeded(), cut_bytes=(400, 4000)) as proxy:
        async with openai.AsyncOpenAI(
            base_url=proxy.base_url, api_key="test", max_retries=0
        ) as cut_client:
            events = [e async for e in resumable(cut_client, rid, starting_after=4, backoff=FAST)]
    assert proxy.cuts >= 5, proxy.cuts
    check_complete(server, rid, events, start=5)


def test_background_create_stream_resumes_by_itself(fast: Server) -> None:
    server = fast
    # Cuts after `response.created` has passed, so the id is known (else nothing to resume).
    with (
        CuttingProxy(server.port, seeded(), cut_bytes=(2000, 5000)) as proxy,
        openai.OpenAI(base_url=proxy.base_url, api_key="test", max_retries=0) as cut_client,
    ):
        stream = cancellable(
            cut_client.responses.create(model="scripted", input="x", background=True, stream=True),
            backoff=FAST,
        )
        events = list(stream)
    assert proxy.cuts >= 5, proxy.cuts
    assert stream.response_id is not None
    check_complete(server, stream.response_id, events)


def test_helper_stream_resumes_with_its_final_response(fast: Server) -> None:
    server = fast
    with (
        CuttingProxy(server.port, seeded(), cut_seconds=(0.04, 0.12)) as proxy,
        openai.OpenAI(base_url=proxy.base_url, api_key="test", max_retries=0) as cut_client,
        cut_client.responses.stream(model="scripted", input="x", background=True) as helper,
    ):
        stream = cancellable(helper, backoff=FAST)
        events = list(stream)
        final = stream.get_final_response()
    assert proxy.cuts >= 5, proxy.cuts
    assert stream.response_id is not None
    check_complete(server, stream.response_id, events)
    assert final.status == "completed"
    assert final.output_text == "".join(e.delta for e in deltas(events))
    assert final.usage is not None and final.usage.output_tokens == len(deltas(events))


def test_resume_gives_up_when_the_server_is_gone(make_tether: Callable[..., Server]) -> None:
    server = make_tether("--scripted-rate", "50")
    with server.client() as client:
        stream = resumable(
            client,
            client.responses.create(model="scripted", input="x", background=True).id,
            backoff=Backoff(initial=0.01, maximum=0.05, max_attempts=3),
        )
        seen = []
        with pytest.raises(openai.APIConnectionError):
            for event in stream:
                seen.append(event)
                if len(deltas(seen)) == 2:
                    server.kill()
    assert_once_in_order(seen)


def test_foreground_streams_are_not_resumed_by_default(fast: Server) -> None:
    server = fast
    with (
        CuttingProxy(server.port, seeded(), cut_bytes=(3000, 3000)) as proxy,
        openai.OpenAI(base_url=proxy.base_url, api_key="test", max_retries=0) as cut_client,
    ):
        stream = cancellable(cut_client.responses.create(model="scripted", input="x", stream=True))
        with pytest.raises(Exception) as exc:  # openai 2.x lets httpx's own error through
            list(stream)
    assert is_connection_error(exc.value)
    assert proxy.cuts == 1


# --- cancel() against servers that misbehave -------------------------------------------------

FAULTS = [
    # mode, background, server_ignored_cancel, status cancel() returns
    ("ignore-cancel", True, True, "in_progress"),
    ("no-terminal", True, True, "in_progress"),
    ("no-terminal-stopped", True, False, "cancelled"),
    ("refuse-sync", False, True, "in_progress"),
    ("refuse-sync-stops", False, False, "cancelled"),
    ("refuse-sync-unstored", False, True, "in_progress"),
]


Outcome = tuple[Any, Any, list[Any], float]


async def _cancel_async(base_url: str, background: bool, mode: str) -> Outcome:
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key="test", max_retries=0, _strict_response_validation=True
    ) as client:
        stream = cancellable(
            await client.responses.create(model=mode, input="x", background=background, stream=True)
        )
        seen = []
        async for event in stream:
            seen.append(event)
            if len(deltas(seen)) == 3:
                break
        started = time.monotonic()
        final = await stream.cancel(grace=GRACE)
        took = time.monotonic() - started
        seen += [event async for event in stream]
        return stream, final, seen, took


def _cancel_sync(base_url: str, background: bool, mode: str) -> Outcome:
    with openai.OpenAI(
        base_url=base_url, api_key="test", max_retries=0, _strict_response_validation=True
    ) as client:
        stream = cancellable(
            client.responses.create(model=mode, input="x", background=background, stream=True)
        )
        seen = []
        for event in stream:
            seen.append(event)
            if len(deltas(seen)) == 3:
                break
        started = time.monotonic()
        final = stream.cancel(grace=GRACE)
        took = time.monotonic() - started
        seen += list(stream)
        return stream, final, seen, took


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize(
    ("mode", "background", "ignored", "status"), FAULTS, ids=[f[0] for f in FAULTS]
)
def test_cancel_returns_within_grace_on_a_misbehaving_server(
    flavour: str, mode: str, background: bool, ignored: bool, status: str
) -> None:
    with FaultyUpstream() as upstream, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if flavour == "sync":
            stream, final, events, took = _cancel_sync(upstream.base_url, background, mode)
        else:
            stream, final, events, took = anyio.run(
                _cancel_async, upstream.base_url, background, mode
            )
        (fake,) = upstream.responses.values()
        assert fake.cancel_requested.is_set()
        assert fake.stream_closed.wait(5), "the stream was not closed"
    assert took < GRACE + 0.25, took  # the bound, plus scheduling on a loaded machine
    assert stream.server_ignored_cancel is ignored
    assert final.status == status and final.id == fake.id
    flagged = [w for w in caught if issubclass(w.category, CancelIgnoredWarning)]
    assert len(flagged) == int(ignored)
    if ignored:
        assert fake.id in str(flagged[0].message)
        assert flagged[0].filename == __file__  # it points at the caller's `cancel()`
    assert_once_in_order(events)
    text = "".join(e.delta for e in deltas(events))
    if final.status == "cancelled":  # the server's own account, with usage
        assert final.usage is not None and final.usage.output_tokens == fake.produced
    elif mode == "refuse-sync-unstored":  # unknown to the server: exactly what was received
        assert final.usage is None
        assert final.output[0].status == "incomplete"
        assert final.output[0].content[0].text == text
        assert "unknown" in str(flagged[0].message)
    else:  # the server's account of a response still running
        assert final.output[0].content[0].text.startswith(text)


def test_cancel_beside_a_blocked_reader_on_a_silent_server() -> None:
    # The reader thread is blocked on a stream that will never speak again (no-terminal):
    # cancel() from another thread still returns in time and wakes the reader up.
    with (
        FaultyUpstream() as upstream,
        openai.OpenAI(base_url=upstream.base_url, api_key="test", max_retries=0) as client,
    ):
        stream = cancellable(
            client.responses.create(model="no-terminal", input="x", background=True, stream=True)
        )
        events: list[Any] = []
        three = threading.Event()

        def read() -> None:
            for event in stream:
                events.append(event)
                if len(deltas(events)) == 3:
                    three.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert three.wait(10)
        started = time.monotonic()
        with pytest.warns(CancelIgnoredWarning):
            final = stream.cancel(grace=GRACE)
        assert time.monotonic() - started < GRACE + 0.25
        reader.join(5)
        assert not reader.is_alive()
        (fake,) = upstream.responses.values()
        assert fake.stream_closed.wait(5)
    assert stream.server_ignored_cancel and final.status == "in_progress"
    assert_once_in_order(events)


@pytest.mark.anyio
async def test_cancel_beside_a_blocked_task_on_a_silent_server() -> None:
    with FaultyUpstream() as upstream:
        async with openai.AsyncOpenAI(
            base_url=upstream.base_url, api_key="test", max_retries=0
        ) as client:
            stream = cancellable(
                await client.responses.create(
                    model="no-terminal", input="x", background=True, stream=True
                )
            )
            events: list[Any] = []
            three = anyio.Event()

            async def read() -> None:
                async for event in stream:
                    events.append(event)
                    if len(deltas(events)) == 3:
                        three.set()

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(read)
                    await three.wait()
                    started = time.monotonic()
                    with pytest.warns(CancelIgnoredWarning):
                        final = await stream.cancel(grace=GRACE)
                    took = time.monotonic() - started
                # leaving the task group: the reader's loop has ended
            (fake,) = upstream.responses.values()
            assert fake.stream_closed.wait(5)
    assert took < GRACE + 0.25
    assert stream.server_ignored_cancel and final.status == "in_progress"
    assert_once_in_order(events)


# --- the examples run ---------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    "args",
    [
        ["cancel_stream.py"],
        ["cancel_stream.py", "--async", "--background"],
        ["resume_stream.py"],
        ["resume_stream.py", "--async"],
    ],
    ids=" ".join,
)
def test_examples_run(slow: Server, args: list[str]) -> None:
    env = {
        **os.environ,
        "OPENAI_BASE_URL": slow.base_url,
        "OPENAI_API_KEY": "test",
        "TETHER_MODEL": "scripted",
        "CANCEL_AFTER": "3",
        "MAX_OUTPUT_TOKENS": "5",
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if args[0] == "cancel_stream.py":
        assert ": cancelled\n" in done.stdout and "output tokens" in done.stdout
    else:
        assert "incomplete, 5 tokens]" in done.stdout
