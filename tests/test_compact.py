"""`POST /v1/responses/compact` (tether.compact): a conversation as one compaction item
that a later create takes as input, seeing exactly the conversation compacted.

Every reply passes through `spec.ValidatingTransport` (CompactResource, ResponseResource,
ErrorResponse), through the official SDK's `client.responses.compact`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

import spec
from tether import compact
from tether.engines.scripted import scripted_text

from conftest import Server, served
from test_auth import create_key

MODEL = "scripted"
LENGTH = 5


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with served(
        tmp_path_factory.mktemp("compact"),
        "--engine",
        "scripted",
        "--debug-routes",
        "--scripted-rate",
        "0",
        "--scripted-length",
        str(LENGTH),
    ) as server:
        yield server


@pytest.fixture
def client(fast: Server) -> Iterator[openai.OpenAI]:
    with fast.client() as c:
        yield c


def turns(server: Server, rid: str) -> list[tuple[str, str]]:
    """What the scripted engine was given for `rid`: (role, text) in order."""
    messages: Any = server.trace(rid)["messages"]
    return [(m["role"], m["text"]) for m in messages]


def error_of(call: Any, status: type[openai.APIStatusError]) -> dict[str, Any]:
    with pytest.raises(status) as exc:
        call()
    body: dict[str, Any] = exc.value.response.json()["error"]
    return body


def test_compact_then_continue_from_the_compaction_item(
    fast: Server, client: openai.OpenAI
) -> None:
    first = client.responses.create(model=MODEL, input="one", instructions="be brief")
    second = client.responses.create(model=MODEL, input="two", previous_response_id=first.id)
    compacted = client.responses.compact(
        model=MODEL, previous_response_id=second.id, input=[{"role": "user", "content": "three"}]
    )
    assert compacted.object == "response.compaction" and compacted.id.startswith("resp_")
    [item] = compacted.output
    assert item.type == "compaction" and item.id.startswith("cmp_")
    assert compacted.usage.input_tokens > 0 and compacted.usage.output_tokens == 0
    assert spec.CHECKED["CompactResource"] == 1

    window: Any = [item.model_dump(exclude_none=True), {"role": "user", "content": "four"}]
    reply = client.responses.create(model=MODEL, input=window)
    assert reply.status == "completed"
    said = scripted_text(LENGTH)
    # The previous responses' instructions are not carried over (as previous_response_id).
    assert turns(fast, reply.id) == [
        ("user", "one"),
        ("assistant", said),
        ("user", "two"),
        ("assistant", said),
        ("user", "three"),
        ("user", "four"),
    ]
    items = list(client.responses.input_items.list(reply.id, order="asc"))
    assert items[0].type == "compaction"
    assert items[0].encrypted_content == item.encrypted_content  # type: ignore[union-attr]

    # And on from there with previous_response_id: the expanded context carries over.
    after = client.responses.create(model=MODEL, input="five", previous_response_id=reply.id)
    assert turns(fast, after.id)[-3:] == [("user", "four"), ("assistant", said), ("user", "five")]


def test_compact_input_only_and_through_a_stream(fast: Server, client: openai.OpenAI) -> None:
    compacted = client.responses.compact(model=MODEL, input="just this")
    token = compacted.output[0].encrypted_content  # type: ignore[union-attr]
    events = list(
        client.responses.create(
            model=MODEL, stream=True, input=[{"type": "compaction", "encrypted_content": token}]
        )
    )
    rid = events[0].response.id  # type: ignore[union-attr]
    assert events[-1].type == "response.completed"
    assert turns(fast, rid) == [("user", "just this")]


def test_compact_refusals(fast: Server, client: openai.OpenAI) -> None:
    # model is required: 400 naming it (raw, since the SDK requires the argument).
    with httpx2.Client(
        base_url=fast.base_url, timeout=10, transport=spec.ValidatingTransport()
    ) as http:
        r = http.post("/responses/compact", json={"input": "x"})
        assert r.status_code == 400
        assert r.json()["error"] | {"message": ""} == {
            "message": "",
            "type": "invalid_request_error",
            "param": "model",
            "code": "missing_required_parameter",
        }
        r = http.post("/responses/compact", json={"model": MODEL, "input": "x", "stream": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
        # `compact` is a route, never a response id.
        assert http.get("/responses/compact").status_code in (404, 405)
    err = error_of(lambda: client.responses.compact(model=MODEL), openai.BadRequestError)
    assert (err["param"], err["code"]) == ("input", "missing_required_parameter")
    err = error_of(lambda: client.responses.compact(model="nope", input="x"), openai.NotFoundError)
    assert err["code"] == "model_not_found"
    err = error_of(
        lambda: client.responses.compact(model=MODEL, previous_response_id="resp_x"),
        openai.NotFoundError,
    )
    assert (err["param"], err["code"]) == ("previous_response_id", "previous_response_not_found")
    assert spec.CHECKED["ErrorResponse"] == 6


def _tampered(token: str) -> list[str]:
    version, payload, signature = token.split(".")
    turns = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    forged = base64.urlsafe_b64encode(turns.replace(b"secret", b"SECRET")).rstrip(b"=")
    return [
        f"{version}.{forged.decode()}.{signature}",
        token[:-2],
        "tc1.e30.AAAA",
        "hello",
        token.replace("tc1.", "tc9.", 1),
    ]


def test_an_altered_or_foreign_token_is_refused(make_server: Any, client: openai.OpenAI) -> None:
    token = client.responses.compact(model=MODEL, input="the secret").output[0].encrypted_content  # type: ignore[union-attr]
    other: Server = make_server()  # another install: another key
    with other.client() as foreign:
        assert (
            foreign.responses.create(
                model=MODEL, input=[{"type": "message", "role": "user", "content": "x"}]
            ).status
            == "completed"
        )
        bad_tokens = [*_tampered(token), token]
        for n, bad in enumerate(bad_tokens):
            target = foreign if n == len(bad_tokens) - 1 else client
            err = error_of(
                lambda b=bad, t=target: t.responses.create(
                    model=MODEL,
                    input=[
                        {"type": "message", "role": "user", "content": "x"},
                        {"type": "compaction", "encrypted_content": b},
                    ],
                ),
                openai.BadRequestError,
            )
            assert (err["param"], err["code"]) == ("input[1].encrypted_content", "invalid_value"), (
                n,
                err,
            )


def test_tokens_outlive_a_restart(make_server: Any) -> None:
    server: Server = make_server()
    with server.client() as c:
        token = c.responses.compact(model=MODEL, input="kept").output[0].encrypted_content  # type: ignore[union-attr]
    server.restart()
    with server.client() as c:
        reply = c.responses.create(
            model=MODEL, input=[{"type": "compaction", "encrypted_content": token}]
        )
    assert reply.status == "completed"
    assert turns(server, reply.id) == [("user", "kept")]
    key = Path(str(server.db) + ".key")
    assert key.stat().st_mode & 0o077 == 0  # the install's key is private


def test_previous_response_of_another_tenant_is_not_found(make_server: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    secrets = {t: create_key(keys, t)[1] for t in ("a", "b")}
    server: Server = make_server("--keys-file", str(keys))

    def client_of(tenant: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=server.base_url,
            api_key=secrets[tenant],
            max_retries=0,
            _strict_response_validation=True,
            http_client=openai.DefaultHttpxClient(transport=spec.ValidatingTransport()),
        )

    with client_of("a") as a, client_of("b") as b:
        rid = a.responses.create(model=MODEL, input="mine").id
        assert a.responses.compact(model=MODEL, previous_response_id=rid).output
        err = error_of(
            lambda: b.responses.compact(model=MODEL, previous_response_id=rid), openai.NotFoundError
        )
        assert err["param"] == "previous_response_id"


def test_tokens_round_trip_and_refuse_changes() -> None:
    conversation = [
        {"role": "user", "text": "the secret"},
        {
            "role": "assistant",
            "text": "",
            "tool_calls": [{"call_id": "c", "name": "f", "arguments": "{}"}],
        },
        {"role": "tool", "text": "42", "call_id": "c"},
    ]
    token = compact.seal(conversation)
    assert compact.unseal(token) == conversation
    for bad in _tampered(token):
        with pytest.raises(ValueError, match="compaction token"):
            compact.unseal(bad)
