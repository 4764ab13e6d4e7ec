"""Bad input gets a clear error and loses nothing.

contract §6.3: every HTTP error has the body `{"error": {"message", "type", "param",
"code"}}` and never a stack trace. Beyond that, a rejected request changes nothing: the
server's SQLite file is opened read-only and its tables are counted around each one.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import Server, served, wait_for

MODEL = "scripted"
TABLES = ("responses", "events", "idempotency_keys")
ERROR_KEYS = {"message", "type", "param", "code"}
LIVE = ("queued", "in_progress")


# --- helpers ----------------------------------------------------------------------------

ANY = object()  # `param`/`code` may be any string or null


def check_error(
    response: Any,
    status: int,
    *,
    param: object = str,
    code: object = ANY,
    type_: str = "invalid_request_error",
) -> dict[str, Any]:
    """contract §6.3: exactly `{"error": {message, type, param, code}}`, no stack trace.

    `response` is an httpx (or the SDK's httpx2) response. `param`/`code` are the exact
    expected values, `str` for "some non-empty string", or `ANY` for a string or null.
    """
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    text = response.text
    assert "Traceback" not in text and 'File "' not in text, text
    body = json.loads(text)
    assert isinstance(body, dict) and list(body) == ["error"], body
    err: dict[str, Any] = body["error"]
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["type"] == type_, err
    for key, want in (("param", param), ("code", code)):
        if want is ANY:
            assert err[key] is None or isinstance(err[key], str), (key, err)
        elif want is str:
            assert isinstance(err[key], str) and err[key], (key, err)
        else:
            assert err[key] == want, (key, err)
    return err


def check_sdk_error(exc: openai.APIStatusError, status: int, **kwargs: Any) -> dict[str, Any]:
    """The SDK's view of an error: `.status_code`, and `.body` is the inner error dict."""
    assert exc.status_code == status
    err = check_error(exc.response, status, **kwargs)
    assert exc.body == err
    assert exc.code == err["code"] and exc.param == err["param"]
    return err


def scalar(server: Server, sql: str, *args: Any) -> int:
    """One number from the server's SQLite file, through a read-only connection."""
    con = sqlite3.connect(f"{Path(server.db).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return int(con.execute(sql, args).fetchone()[0])
    finally:
        con.close()


def counts(server: Server) -> dict[str, int]:
    return {t: scalar(server, f"SELECT COUNT(*) FROM {t}") for t in TABLES}


def live_rows(server: Server) -> int:
    return scalar(
        server, "SELECT COUNT(*) FROM responses WHERE status IN ('queued', 'in_progress')"
    )


@contextlib.contextmanager
def stores_nothing(server: Server) -> Iterator[None]:
    """The body of the `with` must leave every table exactly as it found it."""
    # Nothing may be running, or its events would move the counts (e.g. after an earlier
    # test's request was wrongly accepted).
    wait_for(lambda: live_rows(server) == 0, what="no response in flight")
    before = counts(server)
    yield
    assert counts(server) == before, "a rejected request changed the store"


def wait_ended(client: openai.OpenAI, rid: str) -> openai.types.responses.Response:
    result: openai.types.responses.Response = wait_for(
        lambda: (r := client.responses.retrieve(rid)).status not in LIVE and r, what=f"{rid} to end"
    )
    return result


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that, after `finished` below, only ever sees rejected requests."""
    with served(
        tmp_path_factory.mktemp("errors"),
        "--engine",
        "scripted",
        "--debug-routes",
        "--scripted-rate",
        "1000",
    ) as server:
        yield server


@pytest.fixture(scope="module")
def finished(quiet: Server) -> dict[str, str]:
    """One response per terminal state that §3.6 refuses to cancel, all already over."""
    with quiet.client() as c:
        ids = {
            "completed": c.responses.create(model=MODEL, input="hi").id,
            "incomplete": c.responses.create(model=MODEL, input="hi", max_output_tokens=3).id,
            "failed": c.responses.create(model=MODEL, input="FAIL_AT=3").id,
        }
        for status, rid in ids.items():
            assert c.responses.retrieve(rid).status == status
    return ids


@pytest.fixture
def qclient(quiet: Server, finished: dict[str, str]) -> Iterator[openai.OpenAI]:
    with quiet.client() as c:
        yield c


@pytest.fixture
def fast(make_server: Callable[..., Server]) -> Server:
    """A fresh server of its own (its tables start empty), 1000 tokens/s."""
    return make_server("--scripted-rate", "1000")


# --- create: bad bodies -----------------------------------------------------------------

LONG_KEY = "k" * 65
BAD_CREATES: list[tuple[str, dict[str, Any], int, str, object]] = [
    # id, kwargs for client.responses.create, status, param, code
    ("missing-model", {"input": "x"}, 400, "model", "missing_required_parameter"),
    ("missing-input", {"model": MODEL}, 400, "input", "missing_required_parameter"),
    ("null-model", {"model": None, "input": "x"}, 400, "model", str),
    ("model-not-string", {"model": 5, "input": "x"}, 400, "model", str),
    (
        "temperature-hot",
        {"model": MODEL, "input": "x", "temperature": "hot"},
        400,
        "temperature",
        str,
    ),
    ("temperature-3", {"model": MODEL, "input": "x", "temperature": 3}, 400, "temperature", str),
    ("top_p-2", {"model": MODEL, "input": "x", "top_p": 2}, 400, "top_p", str),
    (
        "max_output_tokens-0",
        {"model": MODEL, "input": "x", "max_output_tokens": 0},
        400,
        "max_output_tokens",
        str,
    ),
    (
        "max_output_tokens-float",
        {"model": MODEL, "input": "x", "max_output_tokens": 1.5},
        400,
        "max_output_tokens",
        str,
    ),
    ("input-5", {"model": MODEL, "input": 5}, 400, "input", str),
    ("input-list-of-strings", {"model": MODEL, "input": ["hi"]}, 400, "input[0]", str),
    (
        "bad-role",
        {"model": MODEL, "input": [{"role": "robot", "content": "x"}]},
        400,
        "input[0].role",
        str,
    ),
    ("no-content", {"model": MODEL, "input": [{"role": "user"}]}, 400, "input[0].content", str),
    (
        "bad-part-type",
        {
            "model": MODEL,
            "input": [{"role": "user", "content": [{"type": "input_video", "text": "x"}]}],
        },
        400,
        "input[0].content[0].type",
        str,
    ),
    (
        "bad-item-type",
        {"model": MODEL, "input": [{"type": "bogus", "role": "user", "content": "x"}]},
        400,
        "input[0].type",
        str,
    ),
    (
        "instructions-object",
        {"model": MODEL, "input": "x", "instructions": {}},
        400,
        "instructions",
        str,
    ),
    (
        "stream-not-bool",
        {"model": MODEL, "input": "x", "extra_body": {"stream": "yes"}},
        400,
        "stream",
        str,
    ),
    ("store-not-bool", {"model": MODEL, "input": "x", "store": "no"}, 400, "store", str),
    (
        "background-not-bool",
        {"model": MODEL, "input": "x", "background": "no"},
        400,
        "background",
        str,
    ),
    (
        "stream_options-not-object",
        {"model": MODEL, "input": "x", "stream_options": "fast"},
        400,
        "stream_options",
        str,
    ),
    (
        "metadata-not-object",
        {"model": MODEL, "input": "x", "metadata": ["a"]},
        400,
        "metadata",
        str,
    ),
    (
        "metadata-value-int",
        {"model": MODEL, "input": "x", "metadata": {"k": 1}},
        400,
        "metadata.k",
        str,
    ),
    (
        "metadata-value-513",
        {"model": MODEL, "input": "x", "metadata": {"k": "v" * 513}},
        400,
        "metadata.k",
        str,
    ),
    (
        "metadata-17-keys",
        {"model": MODEL, "input": "x", "metadata": {f"k{i}": "v" for i in range(17)}},
        400,
        "metadata",
        str,
    ),
    # Both specs: "Keys are strings with a maximum length of 64 characters."
    (
        "metadata-key-65",
        {"model": MODEL, "input": "x", "metadata": {LONG_KEY: "v"}},
        400,
        "metadata",
        str,
    ),
    ("unknown-model", {"model": "no-such-model", "input": "x"}, 404, "model", "model_not_found"),
    (
        "unknown-previous",
        {"model": MODEL, "input": "x", "previous_response_id": "resp_does_not_exist"},
        404,
        "previous_response_id",
        str,
    ),
    # A parameter in neither spec.
    (
        "unknown-parameter",
        {"model": MODEL, "input": "x", "extra_body": {"foo": 1}},
        400,
        "foo",
        str,
    ),
    # Spec parameters tether refuses (docs/fields.md), with a non-default value.
    (
        "prompt",
        {"model": MODEL, "input": "x", "extra_body": {"prompt": {"id": "pmpt_1"}}},
        400,
        "prompt",
        str,
    ),
    # An unknown conversation is 404; with `previous_response_id` a 400 (exclusive).
    (
        "conversation",
        {"model": MODEL, "input": "x", "conversation": "conv_123"},
        404,
        "conversation",
        str,
    ),
    (
        "conversation_and_previous",
        {
            "model": MODEL,
            "input": "x",
            "conversation": {"id": "conv_123"},
            "previous_response_id": "resp_1",
        },
        400,
        "conversation",
        str,
    ),
    (
        "moderation",
        {
            "model": MODEL,
            "input": "x",
            "extra_body": {"moderation": {"model": "omni-moderation-latest"}},
        },
        400,
        "moderation",
        str,
    ),
    (
        "hosted-tool",
        {"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]},
        400,
        "tools[0].type",
        str,
    ),
    # Found by bench/fuzz.py (500s before): a tool's own fields, a part's type not a string.
    (
        "tool-field",
        {"model": MODEL, "input": "x", "tools": [{"type": "function", "name": "f", "bogus": 1}]},
        400,
        "tools[0].bogus",
        str,
    ),
    (
        "part-type-list",
        {"model": MODEL, "input": [{"role": "user", "content": [{"type": ["x"], "text": "a"}]}]},
        400,
        "input[0].content[0].type",
        str,
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "code"),
    [c[1:] for c in BAD_CREATES],
    ids=[c[0] for c in BAD_CREATES],
)
def test_bad_create_is_rejected_and_stores_nothing(
    quiet: Server,
    qclient: openai.OpenAI,
    kwargs: dict[str, Any],
    status: int,
    param: str,
    code: object,
) -> None:
    # contract §6.3 (400/404), §5.4 (unknown previous_response_id)
    with stores_nothing(quiet), pytest.raises(openai.APIStatusError) as exc:
        qclient.responses.create(**kwargs)
    cls = {400: openai.BadRequestError, 404: openai.NotFoundError}[status]
    assert isinstance(exc.value, cls)
    err = check_sdk_error(exc.value, status, param=param, code=code)
    if status == 400 and param not in ("model", "input"):  # the message names it
        assert param.split(".")[0].split("[")[0] in err["message"], err


@pytest.mark.parametrize(
    "mode",
    [{"stream": True}, {"background": True}, {"stream": True, "background": True}],
    ids=["stream", "background", "background-stream"],
)
def test_bad_create_is_a_json_error_in_every_mode(
    quiet: Server, qclient: openai.OpenAI, mode: dict[str, bool]
) -> None:
    # contract §5.1, §6.3: refused before anything starts, so never a 200 event stream
    with stores_nothing(quiet), pytest.raises(openai.BadRequestError) as exc:
        qclient.responses.create(model=MODEL, input=5, **mode)  # type: ignore[call-overload]
    check_sdk_error(exc.value, 400, param="input")
    with stores_nothing(quiet), pytest.raises(openai.NotFoundError) as nf:
        qclient.responses.create(model="no-such-model", input="x", **mode)  # type: ignore[call-overload]
    check_sdk_error(nf.value, 404, param="model", code="model_not_found")


RAW_BODIES = [
    ("malformed", b'{"model": "scripted", "input": '),
    ("empty", b""),
    ("array", b'[{"model": "scripted", "input": "x"}]'),
    ("null", b"null"),
    ("string", b'"hello"'),
    ("number", b"5"),
    ("nan", b'{"model": "scripted", "input": "x", "temperature": NaN}'),
    ("invalid-utf8", b'{"model": "scripted", "input": "\xff\xfe"}'),
    ("lone-surrogate", b'{"model": "scripted", "input": "\\ud800"}'),
    ("deeply-nested", b'{"model": "scripted", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
]


@pytest.mark.parametrize("body", [b for _, b in RAW_BODIES], ids=[i for i, _ in RAW_BODIES])
def test_unparseable_body_is_400(quiet: Server, finished: dict[str, str], body: bytes) -> None:
    # contract §6.3: what the SDK cannot send — not JSON, or JSON but not an object
    with stores_nothing(quiet):
        r = httpx.post(
            f"{quiet.base_url}/responses",
            content=body,
            headers={"content-type": "application/json"},
            timeout=10,
        )
    err = check_error(r, 400, param=None)
    assert "JSON" in err["message"]


def test_defaults_of_unsupported_parameters_are_accepted_and_echoed(fast: Server) -> None:
    # Default or empty values of parameters tether does not act on change nothing.
    with fast.client() as client:
        response = client.responses.create(
            model=MODEL,
            input="x",
            max_output_tokens=2,
            tools=[],
            tool_choice="auto",
            text={"format": {"type": "text"}},
            include=[],
            reasoning={"effort": None},
            extra_body={"top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0},
        )
    assert response.status == "incomplete"
    assert response.tools == []
    assert response.tool_choice == "auto"
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "text"
    assert response.top_logprobs == 0
    assert response.reasoning is None or response.reasoning.effort is None
    assert counts(fast)["responses"] == 1


def test_body_over_the_limit_is_413(make_server: Callable[..., Server]) -> None:
    # contract §6.3: 413 body too large
    server = make_server("--scripted-rate", "1000", "--max-body-bytes", "1000")
    big = "x" * 2000
    with server.client() as client:
        with stores_nothing(server), pytest.raises(openai.APIStatusError) as exc:
            client.responses.create(model=MODEL, input=big)
        check_sdk_error(exc.value, 413, param=None)
        # A chunked body declares no length: the limit still holds while reading it.
        payload = json.dumps({"model": MODEL, "input": big}).encode()
        chunks = (payload[i : i + 100] for i in range(0, len(payload), 100))
        with stores_nothing(server):
            r = httpx.post(f"{server.base_url}/responses", content=chunks, timeout=10)
        check_error(r, 413, param=None)
        # Under the limit, the same server accepts.
        ok = client.responses.create(model=MODEL, input="x" * 500, max_output_tokens=2)
        assert ok.status == "incomplete"
    assert counts(server)["responses"] == 1


# --- reads, cancel, delete on bad ids ---------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", ""])
def test_bad_starting_after_is_400(quiet: Server, finished: dict[str, str], value: str) -> None:
    # contract §4.5: invalid `starting_after` (negative, not an integer)
    rid = finished["completed"]
    with stores_nothing(quiet):
        r = httpx.get(
            f"{quiet.base_url}/responses/{rid}",
            params={"stream": "true", "starting_after": value},
            timeout=10,
        )
    check_error(r, 400, param="starting_after", code=ANY)


def test_bad_starting_after_through_the_sdk(
    quiet: Server, qclient: openai.OpenAI, finished: dict[str, str]
) -> None:
    # contract §4.5
    with stores_nothing(quiet), pytest.raises(openai.BadRequestError) as exc:
        qclient.responses.retrieve(finished["completed"], stream=True, starting_after=-1)
    check_sdk_error(exc.value, 400, param="starting_after")


UNKNOWN_ID_CALLS: list[tuple[str, Callable[[openai.OpenAI, str], Any]]] = [
    ("retrieve", lambda c, rid: c.responses.retrieve(rid)),
    ("stream", lambda c, rid: list(c.responses.retrieve(rid, stream=True))),
    ("cancel", lambda c, rid: c.responses.cancel(rid)),
    ("delete", lambda c, rid: c.responses.delete(rid)),
    ("input_items", lambda c, rid: c.responses.input_items.list(rid)),
]


@pytest.mark.parametrize(
    "call", [c for _, c in UNKNOWN_ID_CALLS], ids=[i for i, _ in UNKNOWN_ID_CALLS]
)
def test_unknown_response_id_is_404(
    quiet: Server, qclient: openai.OpenAI, call: Callable[[openai.OpenAI, str], Any]
) -> None:
    # contract §3.1, §6.3: unknown id → 404 invalid_request_error
    rid = "resp_does_not_exist"
    with stores_nothing(quiet), pytest.raises(openai.NotFoundError) as exc:
        call(qclient, rid)
    err = check_sdk_error(exc.value, 404)
    assert rid in err["message"]


ROUTES_404 = [
    ("GET", "/v1/nope"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/nope"),
    ("GET", "/playground/nope.js"),  # `/` is the playground page
    ("POST", "/v1/responses/resp_x/cancel/now"),
    ("GET", "/v1/responses/a/b/c"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES_404, ids=[p for _, p in ROUTES_404])
def test_unknown_route_is_404_in_openai_shape(
    quiet: Server, finished: dict[str, str], method: str, path: str
) -> None:
    # contract §6.3
    with stores_nothing(quiet):
        r = httpx.request(method, f"{quiet.url}{path}", json={}, timeout=10)
    check_error(r, 404, param=None, code=None)


ROUTES_405 = [
    ("PUT", "/v1/responses", {"POST"}),
    ("GET", "/v1/responses", {"POST"}),
    ("PATCH", "/v1/responses/{id}", {"GET", "DELETE"}),
    ("GET", "/v1/responses/{id}/cancel", {"POST"}),
    ("DELETE", "/v1/responses/{id}/input_items", {"GET"}),
    ("POST", "/v1/models", {"GET"}),
]


@pytest.mark.parametrize(
    ("method", "path"), [r[:2] for r in ROUTES_405], ids=[f"{m} {p}" for m, p, _ in ROUTES_405]
)
def test_wrong_method_is_405_in_openai_shape(
    quiet: Server, finished: dict[str, str], method: str, path: str
) -> None:
    # contract §6.3
    url = quiet.url + path.format(id=finished["completed"])
    with stores_nothing(quiet):
        r = httpx.request(method, url, timeout=10)
    check_error(r, 405, param=None, code=None)


@pytest.mark.parametrize(
    ("method", "path", "allowed"), ROUTES_405, ids=[f"{m} {p}" for m, p, _ in ROUTES_405]
)
def test_wrong_method_names_the_allowed_methods(
    quiet: Server, finished: dict[str, str], method: str, path: str, allowed: set[str]
) -> None:
    # RFC 9110 §15.5.6: a 405 MUST carry `Allow` with the methods the path supports.
    r = httpx.request(method, quiet.url + path.format(id=finished["completed"]), timeout=10)
    assert r.status_code == 405
    assert "allow" in r.headers, dict(r.headers)
    listed = {m.strip() for m in r.headers["allow"].split(",")}
    assert allowed <= listed, (allowed, listed)


# --- cancel and delete of the wrong state -----------------------------------------------


@pytest.mark.parametrize(
    ("status", "article"), [("completed", "a"), ("incomplete", "an"), ("failed", "a")]
)
def test_cancel_of_a_finished_response_is_400_without_retry(
    quiet: Server, qclient: openai.OpenAI, finished: dict[str, str], status: str, article: str
) -> None:
    # contract §3.6
    rid = finished[status]
    before = qclient.responses.retrieve(rid)
    with stores_nothing(quiet), pytest.raises(openai.BadRequestError) as exc:
        qclient.responses.with_raw_response.cancel(rid)
    err = check_sdk_error(exc.value, 400)
    assert err["message"] == f"Cannot cancel {article} {status} response."
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert qclient.responses.retrieve(rid) == before  # untouched


def test_delete_in_flight_is_400_then_finished_is_deleted(
    server: Server, client: openai.OpenAI
) -> None:
    # At 100 tokens/s a background response stays in flight for 2 s.
    rid = client.responses.create(model=MODEL, input="x", background=True).id
    rows = counts(server)["responses"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.delete(rid)
    check_sdk_error(exc.value, 400, param="response_id")
    assert counts(server)["responses"] == rows
    assert client.responses.retrieve(rid).status in LIVE  # still there, still running
    assert client.responses.cancel(rid).status == "cancelled"

    r = httpx.delete(f"{server.base_url}/responses/{rid}", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": rid, "object": "response", "deleted": True}
    assert counts(server)["responses"] == rows - 1
    assert scalar(server, "SELECT COUNT(*) FROM events WHERE response_id = ?", rid) == 0
    for _, call in UNKNOWN_ID_CALLS:
        with pytest.raises(openai.NotFoundError) as nf:
            call(client, rid)
        check_sdk_error(nf.value, 404)

    # The SDK's own delete of a finished response.
    done = client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    assert client.responses.delete(done.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(done.id)


# --- Idempotency-Key (contract §5.3) ------------------------------------------------------


def test_idempotent_retry_returns_the_same_response_and_runs_once(fast: Server) -> None:
    # contract §5.3, in all three shapes a retry can take
    with fast.client() as client:
        key = {"Idempotency-Key": str(uuid.uuid4())}
        first = client.responses.create(model=MODEL, input="hi", extra_headers=key)
        again = client.responses.create(model=MODEL, input="hi", extra_headers=key)
        assert again.id == first.id
        assert again.model_dump() == first.model_dump()

        bkey = {"Idempotency-Key": str(uuid.uuid4())}
        queued = client.responses.create(
            model=MODEL, input="hi", background=True, extra_headers=bkey
        )
        requeued = client.responses.create(
            model=MODEL, input="hi", background=True, extra_headers=bkey
        )
        assert requeued.id == queued.id

        skey = {"Idempotency-Key": str(uuid.uuid4())}
        streamed = list(
            client.responses.create(model=MODEL, input="hi", stream=True, extra_headers=skey)
        )
        restreamed = list(
            client.responses.create(model=MODEL, input="hi", stream=True, extra_headers=skey)
        )
        sid = streamed[0].response.id  # type: ignore[union-attr]
        assert restreamed[0].response.id == sid  # type: ignore[union-attr]
        # The retry is a reader of the same log (contract §2.4): the same events.
        assert [e.model_dump() for e in restreamed] == [e.model_dump() for e in streamed]

        rows = counts(fast)
        assert rows["responses"] == 3 and rows["idempotency_keys"] == 3
        for rid in (first.id, queued.id, sid):
            final = wait_ended(client, rid)
            assert final.usage is not None
            # One run per response: the engine produced exactly the tokens it reported.
            assert fast.trace(rid)["produced"] == final.usage.output_tokens
        assert counts(fast)["responses"] == 3


def test_idempotency_key_with_a_different_body_is_409(fast: Server) -> None:
    # contract §5.3
    with fast.client() as client:
        key = {"Idempotency-Key": str(uuid.uuid4())}
        first = client.responses.create(
            model=MODEL, input="one", max_output_tokens=2, extra_headers=key
        )
        for other in (
            {"input": "two", "max_output_tokens": 2},
            {"input": "one", "max_output_tokens": 3},
            {"input": "one", "max_output_tokens": 2, "background": True},
        ):
            with stores_nothing(fast), pytest.raises(openai.ConflictError) as exc:
                client.responses.create(model=MODEL, extra_headers=key, **other)  # type: ignore[call-overload]
            check_sdk_error(exc.value, 409)
            # The SDK retries 409 unless told not to.
            assert exc.value.response.headers.get("x-should-retry") == "false"
        assert client.responses.retrieve(first.id).status == "incomplete"
        # Another key is another response.
        other_key = {"Idempotency-Key": str(uuid.uuid4())}
        second = client.responses.create(
            model=MODEL, input="two", max_output_tokens=2, extra_headers=other_key
        )
        assert second.id != first.id
    assert counts(fast)["responses"] == 2


def test_rejected_create_does_not_take_the_idempotency_key(fast: Server) -> None:
    # contract §5.3, §6.3: a refused request stores nothing, not even its key
    with fast.client() as client:
        key = {"Idempotency-Key": str(uuid.uuid4())}
        with stores_nothing(fast), pytest.raises(openai.BadRequestError):
            client.responses.create(model=MODEL, input=5, extra_headers=key)  # type: ignore[arg-type]
        with stores_nothing(fast), pytest.raises(openai.NotFoundError):
            client.responses.create(model="no-such-model", input="x", extra_headers=key)
        ok = client.responses.create(model=MODEL, input="x", max_output_tokens=2, extra_headers=key)
        assert ok.status == "incomplete"
    assert counts(fast)["responses"] == 1
