"""Signed webhooks with an outbox (issue 19, docs/webhooks.md), end to end: real `tether
serve` processes, the real `tether webhooks` CLI, and a real HTTP receiver on loopback
whose every request is verified with the `openai` SDK's own `webhooks.unwrap`."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster import PrivatePostgres
from conftest import Server, free_port, wait_for
from services import postgres_url, prefix, redis_url


def fast(**settings: object) -> str:
    """Settings as TOML: short delays, so a retry is a fraction of a second."""
    values = {
        "webhook_poll": 0.1,
        "webhook_retry_first": 0.3,
        "webhook_retry_max_delay": 1.0,
        "webhook_timeout": 3.0,
        **settings,
    }
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


@dataclass
class Hit:
    body: bytes
    headers: dict[str, str]
    status: int  # what the receiver answered
    at: float = 0.0  # time.monotonic() when it arrived


class Receiver:
    """A webhook receiver: a real HTTP server on a loopback port, recording every request.
    `replies` are the statuses it answers with, in turn (then 200); `stop()` and `start()`
    take it down and up again on the same port."""

    def __init__(self, delay: float = 0.0) -> None:
        self.port = free_port()
        self.hits: list[Hit] = []
        self.replies: list[int] = []
        self.delay = delay  # seconds before each answer (a slow receiver)
        self.delays: list[float] = []  # seconds before the next answers, in turn (then `delay`)
        self.busy = self.most_busy = 0  # requests being answered now, and at most
        self._changed = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["content-length"]))
                with receiver._changed:
                    status = receiver.replies.pop(0) if receiver.replies else 200
                    delay = receiver.delays.pop(0) if receiver.delays else receiver.delay
                    hit = Hit(data, dict(self.headers.items()), status, time.monotonic())
                    receiver.hits.append(hit)
                    receiver.busy += 1
                    receiver.most_busy = max(receiver.most_busy, receiver.busy)
                    receiver._changed.notify_all()
                time.sleep(delay)  # a slow receiver (this thread only)
                with receiver._changed:
                    receiver.busy -= 1
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True  # a slow answer does not hold up stop()
        self._server.block_on_close = False
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait(self, predicate: Callable[[list[Hit]], bool], timeout: float = 20.0) -> list[Hit]:
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.hits), timeout):
                raise AssertionError(f"receiver: timed out; got {len(self.hits)} requests")
            return list(self.hits)

    def delivered(self, hits: list[Hit] | None = None) -> list[Hit]:
        return [h for h in (self.hits if hits is None else hits) if 200 <= h.status < 300]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "tether", "webhooks", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def add_endpoint(db: str, url: str, events: str, *more: str) -> tuple[str, str]:
    """`tether webhooks add`: the endpoint id and its secret."""
    out = cli("add", url, "--events", events, "--db", db, *more).stdout.split("\n")
    return out[0].split()[0], out[1].strip()


def deliveries(db: str) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in cli("deliveries", "--db", db, "--json").stdout.splitlines()
    ]


def all_delivered(db: str) -> list[dict[str, Any]] | None:
    rows = deliveries(db)
    return rows if rows and all(d["state"] == "delivered" for d in rows) else None


def config(tmp: Path, text: str, name: str = "hooks.toml") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def unwrap(secret: str, hit: Hit) -> Any:
    """The SDK's verification of one request: raises unless it is signed with `secret`
    and recent."""
    return openai.OpenAI(api_key="unused", webhook_secret=secret).webhooks.unwrap(
        hit.body, hit.headers
    )


def background(client: openai.OpenAI, text: str = "hello", **kwargs: Any) -> str:
    return client.responses.create(model="scripted", input=text, background=True, **kwargs).id


def test_each_terminal_status_sends_its_signed_event(
    make_server: Any, receiver: Receiver, tmp_path: Path
) -> None:
    db = str(tmp_path / "t.db")
    everything = "response.completed,response.failed,response.incomplete,response.cancelled"
    _, secret = add_endpoint(db, receiver.url, everything)
    _, completed_only = add_endpoint(db, receiver.url, "response.completed")
    server = make_server("--config", config(tmp_path, fast()), "--scripted-rate", "50", db=db)
    with server.client() as client:
        foreground = client.responses.create(model="scripted", input="x").id
        want = {
            background(client): "response.completed",
            background(client, "FAIL_AT=3 go"): "response.failed",
            background(client, max_output_tokens=16): "response.incomplete",
        }
        slow = background(client, "slow")
        wait_for(lambda: client.responses.retrieve(slow).status == "in_progress", what="a run")
        assert client.responses.cancel(slow).status == "cancelled"
        want[slow] = "response.cancelled"
        for rid in want:
            wait_for(lambda rid=rid: client.responses.retrieve(rid).status != "in_progress")

    hits = receiver.wait(lambda hits: len(hits) >= 5)  # 4 events + completed's second copy
    by_secret: dict[str, list[Any]] = {secret: [], completed_only: []}
    for hit in hits:
        verified = [s for s in by_secret if _verifies(s, hit)]
        assert len(verified) == 1, hit.headers
        event = unwrap(verified[0], hit)
        by_secret[verified[0]].append(event)
        assert event.id == hit.headers["webhook-id"] and event.object == "event"
        assert abs(event.created_at - time.time()) < 60
    assert {e.data.id: e.type for e in by_secret[secret]} == want
    assert [e.type for e in by_secret[completed_only]] == ["response.completed"]
    # A foreground response sends none (as OpenAI: webhooks are for background ones);
    # the outbox is written with the terminal state, so this is already final.
    assert foreground not in {d["response_id"] for d in deliveries(db)}
    # (A receiver has an event a moment before its sender records it delivered.)
    assert all(d["attempts"] == 1 for d in wait_for(lambda: all_delivered(db), what="rows"))

    # The SDK rejects a tampered body and a replay of an old request.
    hit = hits[0]
    key = secret if _verifies(secret, hit) else completed_only
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(key, Hit(hit.body.replace(b'"event"', b'"evil"'), hit.headers, 200))
    old = {**hit.headers, "webhook-timestamp": str(int(time.time()) - 3600)}
    with pytest.raises(openai.InvalidWebhookSignatureError, match="too old"):
        unwrap(key, Hit(hit.body, old, 200))


def _verifies(secret: str, hit: Hit) -> bool:
    try:
        unwrap(secret, hit)
    except openai.InvalidWebhookSignatureError:
        return False
    return True


def test_a_failed_attempt_is_retried_with_the_same_id(
    make_server: Any, receiver: Receiver, tmp_path: Path
) -> None:
    db = str(tmp_path / "t.db")
    endpoint, secret = add_endpoint(db, receiver.url, "response.completed")
    receiver.replies = [500, 503]
    server = make_server("--config", config(tmp_path, fast()), "--scripted-rate", "0", db=db)
    with server.client() as client:
        rid = background(client)
    hits = receiver.wait(lambda hits: bool(receiver.delivered(hits)))
    assert [h.status for h in hits] == [500, 503, 200]
    assert len({h.headers["webhook-id"] for h in hits}) == 1
    assert len({h.body for h in hits}) == 1  # the same event every time, freshly signed
    assert all(unwrap(secret, h).data.id == rid for h in hits)
    [row] = wait_for(lambda: all_delivered(db), what="the delivered row")
    assert row["attempts"] == 3 and row["last_status"] == 200
    assert row["endpoint_id"] == endpoint
    listed = cli("deliveries", "--endpoint", endpoint, "--db", db).stdout
    assert row["id"] in listed and "delivered" in listed
    assert row["id"] not in cli("deliveries", "--endpoint", "we_other", "--db", db).stdout
    page = httpx.get(f"{server.url}/metrics").text
    assert 'tether_webhook_attempts_total{result="retried"} 2.0' in page
    assert 'tether_webhook_attempts_total{result="delivered"} 1.0' in page


def test_a_receiver_down_for_a_while_gets_every_event_with_the_same_ids(
    make_server: Any, tmp_path: Path
) -> None:
    receiver = Receiver()  # not started: connections are refused
    db = str(tmp_path / "t.db")
    _, secret = add_endpoint(db, receiver.url, "response.completed")
    server = make_server("--config", config(tmp_path, fast()), "--scripted-rate", "0", db=db)
    with server.client() as client:
        rids = {background(client, f"n{i}") for i in range(6)}
    # Every delivery failed at least twice while the receiver was down.
    rows = wait_for(
        lambda: (r := deliveries(db)) and len(r) == 6 and all(d["attempts"] >= 2 for d in r) and r,
        what="failed attempts",
    )
    assert all(d["state"] == "pending" and "ConnectError" in d["last_error"] for d in rows)
    wait_for(
        lambda: "tether_webhooks_pending 6.0" in httpx.get(f"{server.url}/metrics").text,
        what="the pending gauge",
    )
    receiver.start()
    try:
        hits = receiver.wait(lambda hits: len({h.headers["webhook-id"] for h in hits}) == 6)
    finally:
        receiver.stop()
    assert {unwrap(secret, h).data.id for h in hits} == rids
    assert {h.headers["webhook-id"] for h in hits} == {d["id"] for d in rows}
    final = wait_for(lambda: all_delivered(db), what="delivered rows")
    assert len(final) == 6


def test_sigkill_after_the_terminal_commit_still_delivers_after_restart(
    make_server: Any, receiver: Receiver, tmp_path: Path
) -> None:
    db = str(tmp_path / "t.db")
    _, secret = add_endpoint(db, receiver.url, "response.completed")
    # The first server commits terminal states but sends nothing (as if it died at once).
    server = make_server(
        "--config",
        config(tmp_path, fast(webhook_sender=False)),
        "--scripted-rate",
        "0",
        db=db,
    )
    with server.client() as client:
        rid = background(client)
        wait_for(lambda: client.responses.retrieve(rid).status == "completed", what="done")
    [row] = deliveries(db)
    assert row["state"] == "pending" and row["attempts"] == 0 and row["response_id"] == rid
    server.stop(signal.SIGKILL)
    assert not receiver.hits
    restarted = make_server("--config", config(tmp_path, fast(), "on.toml"), db=db)
    [hit] = receiver.wait(lambda hits: len(hits) == 1)
    assert hit.headers["webhook-id"] == row["id"]
    assert unwrap(secret, hit).data.id == rid
    restarted.stop()


def test_a_sender_killed_mid_attempt_leaves_it_to_the_next_after_its_lease(
    make_server: Any, receiver: Receiver, tmp_path: Path
) -> None:
    db = str(tmp_path / "t.db")
    _, secret = add_endpoint(db, receiver.url, "response.completed")
    receiver.delays = [30.0]  # the first attempt hangs: its sender dies meanwhile
    conf = config(tmp_path, fast(webhook_timeout=1.0))  # a lease of 3 x 1 + 5 s
    server = make_server("--config", conf, "--scripted-rate", "0", db=db)
    with server.client() as client:
        rid = background(client)
    receiver.wait(lambda hits: len(hits) == 1)
    server.stop(signal.SIGKILL)
    [row] = deliveries(db)
    assert row["state"] == "pending" and row["attempts"] == 0  # never recorded
    killed = time.monotonic()
    make_server("--config", conf, db=db)
    hits = receiver.wait(lambda hits: len(hits) == 2)
    waited = time.monotonic() - killed
    print(f"attempted again {waited:.1f}s after the kill (lease 8 s)")
    # The same event twice (at least once): the receiver can tell by its webhook-id.
    assert hits[0].headers["webhook-id"] == hits[1].headers["webhook-id"] == row["id"]
    assert unwrap(secret, hits[1]).data.id == rid
    assert wait_for(lambda: all_delivered(db), what="delivered")[0]["attempts"] == 1


def test_cli_add_list_rotate_remove(make_server: Any, receiver: Receiver, tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    endpoint, old = add_endpoint(db, receiver.url, "response.completed", "--tenant", "default")
    listed = [json.loads(x) for x in cli("list", "--db", db, "--json").stdout.split("\n") if x]
    assert [(e["id"], e["url"], e["events"]) for e in listed] == [
        (endpoint, receiver.url, "response.completed")
    ]
    assert old not in cli("list", "--db", db).stdout  # a hint only, never the secret
    # Rotated keeping the old secret (OpenAI's keep_old_secret_active_for_24_hours): both
    # sign, so a receiver still on the old one verifies too.
    new = cli("rotate-secret", endpoint, "--keep-old", "--db", db).stdout.strip()
    assert new.startswith("whsec_") and new != old
    server = make_server("--config", config(tmp_path, fast()), "--scripted-rate", "0", db=db)
    with server.client() as client:
        background(client)
        [hit] = receiver.wait(lambda hits: len(hits) == 1)
        assert _verifies(new, hit) and _verifies(old, hit)
        assert len(hit.headers["webhook-signature"].split()) == 2
        # Rotated again, plainly: only the newest signs, from the next attempt on.
        newest = cli("rotate-secret", endpoint, "--db", db).stdout.strip()
        background(client)
        hit = receiver.wait(lambda hits: len(hits) == 2)[1]
        assert _verifies(newest, hit) and not _verifies(new, hit) and not _verifies(old, hit)

    assert "removed" in cli("remove", endpoint, "--db", db).stdout
    assert cli("list", "--db", db, "--json").stdout == ""
    assert deliveries(db) == []
    gone = cli("remove", endpoint, "--db", db, check=False)
    assert gone.returncode == 2 and "no endpoint" in gone.stderr
    bad = cli("add", receiver.url, "--events", "response.done", "--db", db, check=False)
    assert bad.returncode == 2 and "--events" in bad.stderr


def test_only_loopback_and_allowed_hosts_receive(
    make_server: Any, receiver: Receiver, tmp_path: Path
) -> None:
    db = str(tmp_path / "t.db")
    refused = cli(
        "add", "http://10.1.2.3/hook", "--events", "response.completed", "--db", db, check=False
    )
    assert refused.returncode == 2 and "webhook_allowed_hosts" in refused.stderr
    for url in ("file:///etc/passwd", "gopher://127.0.0.1/x"):
        assert (
            cli("add", url, "--events", "response.completed", "--db", db, check=False).returncode
            == 2
        )
    # Allowed when added, no longer when the server sends: refused before any connection.
    allowing = config(tmp_path, 'webhook_allowed_hosts = ["hooks.example.invalid"]\n', "a.toml")
    add_endpoint(db, "http://hooks.example.invalid/x", "response.completed", "--config", allowing)
    server = make_server("--config", config(tmp_path, fast()), "--scripted-rate", "0", db=db)
    with server.client() as client:
        background(client)
    [row] = wait_for(lambda: (r := deliveries(db)) and r[0]["attempts"] >= 1 and r, what="try")
    assert row["state"] == "pending" and row["last_status"] is None
    assert "not loopback nor in webhook_allowed_hosts" in row["last_error"]


@pytest.fixture
def shared_postgres(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    with postgres_url() as db:
        yield db, redis_url(), prefix()


def pg_server(db: str, redis: str, key_prefix: str, tmp: Path, *args: str) -> Server:
    server = Server(
        db,
        ["--redis", redis, "--redis-prefix", key_prefix, "--engine", "scripted", *args],
        log_dir=tmp,
    )
    server.start()
    return server


def test_two_processes_on_postgres_deliver_each_event(
    shared_postgres: tuple[str, str, str], receiver: Receiver, tmp_path: Path
) -> None:
    db, redis, key_prefix = shared_postgres
    _, secret = add_endpoint(db, receiver.url, "response.completed,response.failed")
    conf = config(tmp_path, fast(webhook_concurrency=2))
    servers = [
        pg_server(db, redis, key_prefix, tmp_path, "--config", conf, "--scripted-rate", "0")
        for _ in range(2)
    ]
    try:
        rids: dict[str, str] = {}
        for i in range(24):
            with servers[i % 2].client() as client:
                failing = i % 6 == 0
                rid = background(client, "FAIL_AT=1 x" if failing else f"n{i}")
                rids[rid] = "response.failed" if failing else "response.completed"
        hits = receiver.wait(lambda hits: len({h.headers["webhook-id"] for h in hits}) == 24)
        events = [unwrap(secret, h) for h in hits]
        assert {e.data.id: e.type for e in events} == rids
        duplicates = len(hits) - len({h.headers["webhook-id"] for h in hits})
        print(f"deliveries: {len(hits)}, duplicates: {duplicates}")
        # Leases keep each delivery with one process while its attempt lasts: no
        # duplicates here (at least once would allow them after a lease ran out).
        assert duplicates == 0
        rows = wait_for(lambda: all_delivered(db), what="delivered rows")
        assert len(rows) == 24 and all(d["attempts"] == 1 for d in rows)
    finally:
        for server in servers:
            server.stop()


def test_a_slow_receiver_delays_neither_runs_nor_other_endpoints(
    make_server: Any, receiver: Receiver, tmp_path: Path
) -> None:
    slow = Receiver(delay=60.0)  # answers long after everything else
    slow.start()
    try:
        db = str(tmp_path / "t.db")
        add_endpoint(db, slow.url, "response.completed")
        add_endpoint(db, receiver.url, "response.completed")
        conf = config(tmp_path, fast(webhook_timeout=30.0, webhook_concurrency=2))
        server = make_server("--config", conf, "--scripted-rate", "0", db=db)
        with server.client() as client:
            started = time.monotonic()
            rids = [background(client, f"n{i}") for i in range(8)]
            for rid in rids:  # the runs end at once: the sender is not in their way
                wait_for(lambda rid=rid: client.responses.retrieve(rid).status == "completed")
        hits = receiver.wait(lambda hits: len(hits) == 8)
        # The other endpoint got all 8 at once; behind the slow one they would have
        # waited 4 rounds of its 30 s timeout.
        took = max(h.at for h in hits) - started
        print(f"8 deliveries to the fast endpoint in {took:.2f}s")
        assert took < 10
        slow.wait(lambda hits: len(hits) == 2)
        assert slow.most_busy == 2 and len(slow.hits) == 2  # its concurrency limit
    finally:
        slow.stop()


def test_postgres_restart_loses_no_delivery(receiver: Receiver, tmp_path: Path) -> None:
    private = PrivatePostgres()
    try:
        private.start()
        _, secret = add_endpoint(private.url, receiver.url, "response.completed")
        conf = config(tmp_path, fast(webhook_timeout=1.0))
        server = pg_server(
            private.url, redis_url(), prefix(), tmp_path, "--config", conf, "--scripted-rate", "0"
        )
        try:
            receiver.stop()  # down: the deliveries wait in the outbox
            with server.client() as client:
                rids = {background(client, f"n{i}") for i in range(4)}
                for rid in rids:
                    wait_for(lambda rid=rid: client.responses.retrieve(rid).status == "completed")
            ids = {d["id"] for d in deliveries(private.url)}
            assert len(ids) == 4
            private.stop()
            receiver.start()
            time_down = time.monotonic()
            private.start()
            hits = receiver.wait(
                lambda hits: len({h.headers["webhook-id"] for h in hits}) == 4, timeout=60
            )
            print(f"all delivered {time.monotonic() - time_down:.1f}s after the outage began")
            assert {h.headers["webhook-id"] for h in hits} == ids
            assert {unwrap(secret, h).data.id for h in hits} == rids
        finally:
            server.stop()
    finally:
        private.cleanup()


@contextlib.contextmanager
def store_url(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield str(tmp / "hooks.db")
    else:
        with postgres_url() as url:
            yield url


async def insert_due(db: str, rows: list[tuple[str, str]], now: float) -> None:
    """Outbox rows (event id, endpoint id), due at `now`, as a terminal transition writes."""
    sql = (
        "INSERT INTO webhook_deliveries (id, endpoint_id, tenant, response_id, type, "
        "created_at, next_at) VALUES ({}, {}, 'default', 'resp_x', 'response.completed', {}, {})"
    )
    if db.startswith("postgresql://"):
        import asyncpg

        con = await asyncpg.connect(db)
        try:
            await con.executemany(sql.format("$1", "$2", "$3", "$3"), [(*r, now) for r in rows])
        finally:
            await con.close()
    else:
        with sqlite3.connect(db) as con:
            con.executemany(sql.format("?", "?", "?", "?"), [(*r, now, now) for r in rows])


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_claims_lease_limit_and_record(kind: str, tmp_path: Path) -> None:
    """The store's half of delivery, both stores alike: leases, the per-endpoint limit,
    endpoints passed over, who may record what, purge, remove."""
    from tether.store.hooks import Endpoint
    from tether.webhook_admin import hooks_for

    with store_url(kind, tmp_path) as db:
        async with hooks_for(db) as hooks:
            now = time.time()
            for name in ("a", "b"):
                url = f"http://127.0.0.1/{name}"
                await hooks.add_endpoint(Endpoint(name, "default", url, [], "whsec_AA==", now))
            await insert_due(db, [(f"evt_a{i}", "a") for i in range(5)] + [("evt_b", "b")], now)
            assert await hooks.pending() == 6

            assert await hooks.rotate_secret("b", "whsec_BB==", keep_old_until=now + 1)
            assert not await hooks.rotate_secret("nope", "whsec_BB==")
            first = await hooks.claim("p1", now, now + 100, per_endpoint=2, limit=10)
            assert sorted(d.id for d in first) == ["evt_a0", "evt_a1", "evt_b"]
            assert {d.url for d in first} == {"http://127.0.0.1/a", "http://127.0.0.1/b"}
            secrets = {d.endpoint_id: (d.secret, d.old_secret) for d in first}
            assert secrets == {"a": ("whsec_AA==", ""), "b": ("whsec_BB==", "whsec_AA==")}
            second = await hooks.claim("p2", now, now + 100, per_endpoint=2, limit=10)
            assert sorted(d.id for d in second) == ["evt_a2", "evt_a3"]  # leased ones skipped
            assert await hooks.claim("p2", now, now + 100, 2, 10, busy=["a"]) == []

            # A failure is recorded only by the lease's holder; delivered by anyone.
            await hooks.record("evt_a0", "p2", now, 500, "HTTP 500", now + 60)
            await hooks.record("evt_a0", "p1", now, 500, "HTTP 500", now + 60)
            await hooks.record("evt_a1", "p2", now, 204, None, None)
            await hooks.record("evt_b", "p1", now, None, "ConnectError", None)  # gave up
            rows = {d.id: d for d in await hooks.deliveries()}
            assert (rows["evt_a0"].attempts, rows["evt_a0"].state()) == (1, "pending")
            assert rows["evt_a0"].next_at == pytest.approx(now + 60)
            assert (rows["evt_a1"].attempts, rows["evt_a1"].state()) == (1, "delivered")
            assert (rows["evt_b"].state(), rows["evt_b"].last_error) == ("gave_up", "ConnectError")
            # evt_a0 waits for its retry time; its lease is released.
            later = await hooks.claim("p3", now + 1, now + 100, 5, 10)
            assert sorted(d.id for d in later) == ["evt_a4"]
            assert await hooks.rotate_secret("a", "whsec_CC==", keep_old_until=now + 1)
            again = await hooks.claim("p3", now + 61, now + 90, 5, 10)
            assert sorted(d.id for d in again) == ["evt_a0"]  # the retry is due
            assert again[0].old_secret == ""  # the old secret's 24 hours (here 1 s) are over
            expired = await hooks.claim("p4", now + 101, now + 200, 5, 10)  # leases over
            assert sorted(d.id for d in expired) == ["evt_a0", "evt_a2", "evt_a3", "evt_a4"]

            assert await hooks.pending() == 4
            assert await hooks.purge(now + 1) == 2  # the delivered and the given up
            assert await hooks.remove_endpoint("a") and not await hooks.remove_endpoint("a")
            assert await hooks.deliveries() == [] and await hooks.pending() == 0
