"""API keys and tenants (docs/contract.md §7): another tenant's response is 404 on every lookup, a
revoked or wrong key is 401, keys are stored hashed, and without keys tether serves only on
loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import Server, free_port, read_deltas


def tether(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=60, env=env
    )


def create_key(keys_file: Path, tenant: str, name: str = "") -> tuple[str, str]:
    """`tether keys create`: (key id, secret)."""
    out = tether(
        "keys", "create", "--tenant", tenant, "--name", name, "--keys-file", str(keys_file)
    )
    assert out.returncode == 0, out.stderr
    first, secret = out.stdout.strip().splitlines()
    return first.split()[0], secret


def client_for(server: Server, secret: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.base_url, api_key=secret, max_retries=0, _strict_response_validation=True
    )


def test_keys_cli_stores_only_hashes_and_lists_and_revokes(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    key_id, secret = create_key(keys_file, "acme", "ci")
    assert secret.startswith("sk-tether-") and len(secret) > 40
    stored = keys_file.read_text()
    assert secret not in stored and secret[10:] not in stored
    assert json.loads(stored)["keys"][0]["hash"].startswith("sha256:")
    assert keys_file.stat().st_mode & 0o077 == 0  # owner-only

    listed = tether("keys", "list", "--json", "--keys-file", str(keys_file))
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert rows == [
        {
            "id": key_id,
            "tenant": "acme",
            "name": "ci",
            "created_at": rows[0]["created_at"],
            "revoked_at": None,
        }
    ]

    assert tether("keys", "revoke", key_id, "--keys-file", str(keys_file)).returncode == 0
    rows = [
        json.loads(line)
        for line in tether(
            "keys", "list", "--json", "--keys-file", str(keys_file)
        ).stdout.splitlines()
    ]
    assert rows[0]["revoked_at"] is not None

    unknown = tether("keys", "revoke", "key_nope", "--keys-file", str(keys_file))
    assert unknown.returncode != 0 and "no key 'key_nope'" in unknown.stderr
    bad = tether("keys", "create", "--tenant", "a b", "--keys-file", str(keys_file))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


@pytest.fixture
def tenants(make_server: Any, tmp_path: Path) -> tuple[Server, dict[str, tuple[str, str]]]:
    """A server with keys for tenants a (two keys) and b: name -> (key id, secret)."""
    keys_file = tmp_path / "keys.json"
    keys = {
        name: create_key(keys_file, tenant, name)
        for name, tenant in (("a1", "a"), ("a2", "a"), ("b", "b"))
    }
    server = make_server(
        "--keys-file", str(keys_file), "--scripted-rate", "50", "--scripted-length", "400"
    )
    return server, keys


def test_another_tenants_response_is_404_everywhere(
    tenants: tuple[Server, dict[str, tuple[str, str]]],
) -> None:
    server, keys = tenants
    a, b = client_for(server, keys["a1"][1]), client_for(server, keys["b"][1])
    stream = a.responses.create(model="scripted", input="hi", background=True, stream=True)
    rid, _ = read_deltas(stream, 2)

    lookups = {
        "retrieve": lambda: b.responses.retrieve(rid),
        "stream": lambda: list(b.responses.retrieve(rid, stream=True, starting_after=0)),
        "cancel": lambda: b.responses.cancel(rid),
        "delete": lambda: b.responses.delete(rid),
        "input_items": lambda: b.responses.input_items.list(rid),
        "previous_response_id": lambda: b.responses.create(
            model="scripted", input="more", previous_response_id=rid
        ),
        "usage": lambda: b.get(
            "/usage", cast_to=object, options={"params": {"key_id": keys["a1"][0]}}
        ),
    }
    for what, lookup in lookups.items():
        with pytest.raises(openai.NotFoundError) as err:
            lookup()
        assert err.value.status_code == 404, what

    # b's attempts changed nothing: the response still runs for a, and a can cancel it.
    assert a.responses.retrieve(rid).status == "in_progress"
    assert a.responses.cancel(rid).status == "cancelled"
    assert [e.type for e in stream][-1] == "response.failed"
    # The other key of the same tenant sees it.
    assert client_for(server, keys["a2"][1]).responses.retrieve(rid).status == "cancelled"


def test_missing_wrong_and_revoked_keys_are_401(
    tenants: tuple[Server, dict[str, tuple[str, str]]], tmp_path: Path
) -> None:
    server, keys = tenants
    r = httpx.get(f"{server.base_url}/models")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        client_for(server, "sk-tether-wrong").models.list()
    # The page, liveness and metrics stay reachable without a key.
    assert httpx.get(f"{server.url}/health").status_code == 200

    a1 = client_for(server, keys["a1"][1])
    done = a1.responses.create(model="scripted", input="hi", max_output_tokens=16)
    assert done.status == "incomplete"  # 16 of 400 scripted tokens
    assert (
        tether(
            "keys", "revoke", keys["a1"][0], "--keys-file", str(tmp_path / "keys.json")
        ).returncode
        == 0
    )
    # The running server reads the file again: the next request is refused.
    with pytest.raises(openai.AuthenticationError) as err:
        a1.responses.retrieve(done.id)
    assert err.value.status_code == 401 and "revoked" in str(err.value.body)
    # The tenant's other key, and other tenants, are unaffected.
    assert client_for(server, keys["a2"][1]).responses.retrieve(done.id).id == done.id
    assert client_for(server, keys["b"][1]).models.list().data


def test_keys_from_the_environment(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TETHER_API_KEYS", "red:sk-red-secret,blue:sk-blue-secret")
    server = make_server("--scripted-length", "20")
    red, blue = client_for(server, "sk-red-secret"), client_for(server, "sk-blue-secret")
    done = red.responses.create(model="scripted", input="hi")
    assert red.responses.retrieve(done.id).status == "completed"
    with pytest.raises(openai.NotFoundError):
        blue.responses.retrieve(done.id)
    with pytest.raises(openai.AuthenticationError):
        client_for(server, "sk-red").models.list()


def test_without_keys_only_loopback(tmp_path: Path) -> None:
    port = str(free_port())
    refused = tether(
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        port,
        "--engine",
        "scripted",
        "--db",
        str(tmp_path / "t.db"),
    )
    assert refused.returncode == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in refused.stderr
    assert "Traceback" not in refused.stderr

    for extra in (["--allow-anonymous"], ["--keys-file", str(tmp_path / "keys.json")]):
        server = Server(tmp_path / "t.db", ["--host", "0.0.0.0", "--engine", "scripted", *extra])
        server.start()
        try:
            assert httpx.get(f"{server.url}/health").status_code == 200
        finally:
            server.stop()


def test_one_tenant_cannot_take_anothers_idempotency_key(
    tenants: tuple[Server, dict[str, tuple[str, str]]],
) -> None:
    server, keys = tenants
    a, b = client_for(server, keys["a1"][1]), client_for(server, keys["b"][1])
    headers = {"Idempotency-Key": "same-key"}
    ra = a.responses.create(
        model="scripted", input="x", max_output_tokens=16, extra_headers=headers
    )
    rb = b.responses.create(
        model="scripted", input="x", max_output_tokens=16, extra_headers=headers
    )
    assert ra.id != rb.id  # b's key did not return a's response
    assert (
        a.responses.create(
            model="scripted", input="x", max_output_tokens=16, extra_headers=headers
        ).id
        == ra.id
    )


def test_websocket_needs_a_key_and_is_tenant_scoped(
    tenants: tuple[Server, dict[str, tuple[str, str]]],
) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    server, keys = tenants
    url = f"ws://127.0.0.1:{server.port}/v1/responses"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=10).close()
    assert refused.value.response.status_code == 401
    headers = {"Authorization": f"Bearer {keys['b'][1]}"}
    with connect(url, additional_headers=headers, open_timeout=10) as ws:
        ws.send(
            json.dumps(
                {
                    "type": "response.create",
                    "model": "scripted",
                    "input": "hi",
                    "max_output_tokens": 16,
                }
            )
        )
        while (event := json.loads(ws.recv(timeout=30)))["type"] not in (
            "response.completed",
            "response.incomplete",
            "response.failed",
            "error",
        ):
            pass
    rid = event["response"]["id"]
    assert client_for(server, keys["b"][1]).responses.retrieve(rid).id == rid
    with pytest.raises(openai.NotFoundError):
        client_for(server, keys["a1"][1]).responses.retrieve(rid)
