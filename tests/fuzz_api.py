"""Property-based fuzzing of every operation tether serves (Schemathesis + Hypothesis).

`DOC` is an OpenAPI 3.1 document of the served API, built from the vendored specs: the
Open Responses document's request bodies (`CreateResponseBody` as JSON and as a form,
`CompactResponseMethodPublicBody`) and OpenAI's query parameters for the other routes,
plus tether's own (`/v1/usage`, `/health`, `/metrics`), and the Conversations API's
operations (OpenAI's parameters; items as Open Responses' `ItemParam` or simple
messages). Schemathesis turns each operation into a strategy of requests, valid ones
("positive") and ones that break the schema ("negative"); `Fuzzer.send` sends one over
real HTTP with httpx, so that every reply is also checked against the specs as it passes
(tests/spec.py), and returns what is wrong with the reply: a 5xx, an error body not in
OpenAI's shape, a stack trace, a spec violation. Ids in paths are real ones most of the
time (pools of responses and conversations the fuzzer keeps stocked), so that the routes
get past their 404s.

Used by tests/test_fuzz.py (tens of examples per operation) and bench/fuzz.py (1,000+).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from schemathesis import GenerationMode

import spec

MODEL = "scripted"
_SOURCE = spec.SPEC  # the Open Responses document (with its erratum corrected)
_CREATE = _SOURCE["components"]["schemas"]["CreateResponseBody"]
# The create bodies tether serves (not only refuses): CreateResponseBody's properties that
# tether supports, `model` and `input` required, simple messages as well as the spec's
# items. Generated next to CreateResponseBody itself (anything goes, mostly refused).
_SUPPORTED = (
    "previous_response_id",
    "metadata",
    "temperature",
    "top_p",
    "stream",
    "stream_options",
    "background",
    "max_output_tokens",
    "max_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
    "truncation",
    "instructions",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "text",
)
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "additionalProperties": False,
    "properties": {
        "role": {"enum": ["user", "system", "developer", "assistant"]},
        "content": {"type": "string", "maxLength": 200},
    },
}
_SERVED_CREATE = {
    "type": "object",
    "required": ["model", "input"],
    "additionalProperties": False,
    "properties": {
        "model": {"enum": [MODEL]},
        "input": {
            "anyOf": [
                {"type": "string", "maxLength": 200},
                {"type": "array", "items": _MESSAGE, "minItems": 1, "maxItems": 4},
                _CREATE["properties"]["input"],
            ]
        },
        **{k: _CREATE["properties"][k] for k in _SUPPORTED},
        # OpenAI's `conversation` (Open Responses has none): an id or `{"id"}`.
        "conversation": {
            "anyOf": [
                {"type": "string"},
                {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
            ]
        },
    },
}
_CREATE_BODY = {"anyOf": [_SERVED_CREATE, {"$ref": "#/components/schemas/CreateResponseBody"}]}
_REQUEST = {
    "content": {
        kind: {"schema": _CREATE_BODY}
        for kind in ("application/json", "application/x-www-form-urlencoded")
    }
}
_COMPACT = _SOURCE["paths"]["/responses/compact"]["post"]["requestBody"]
_ANY = {"default": {"description": "checked by the fuzzer itself"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_INCLUDE = _query("include", {"type": "array", "items": {"type": "string"}})
_RID = _path("response_id")
_CID = _path("conversation_id")
_ITEM_ID = _path("item_id")
_CONVERSATION_ITEMS = {
    "type": "array",
    "maxItems": 20,
    "items": {"anyOf": [_MESSAGE, {"$ref": "#/components/schemas/ItemParam"}]},
}
_METADATA = {
    "type": "object",
    "maxProperties": 16,
    "additionalProperties": {"type": "string", "maxLength": 512},
}


def _json_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


# Every route reads it (tether.logs keeps a caller's sane id, echoes it, logs it): so
# even the routes without parameters have an input to fuzz.
_REQUEST_ID = {
    "name": "x-request-id",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
}


def _op(*parameters: dict[str, Any], body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"parameters": [*parameters, _REQUEST_ID], "responses": _ANY}
    if body is not None:
        op["requestBody"] = body
    return op


DOC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "tether (as served)", "version": "1"},
    "components": _SOURCE["components"],
    "paths": {
        "/v1/responses": {
            "post": _op(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                },
                body=_REQUEST,
            )
        },
        "/v1/responses/compact": {"post": _op(body=_COMPACT)},
        # Counted as a create with this body would be: the same schema.
        "/v1/responses/input_tokens": {"post": _op(body=_REQUEST)},
        "/v1/responses/{response_id}": {
            "get": _op(
                _RID,
                _INCLUDE,
                _query("stream", {"type": "boolean"}),
                _query("starting_after", {"type": "integer", "minimum": 0}),
                _query("include_obfuscation", {"type": "boolean"}),
            ),
            "delete": _op(_RID),
        },
        "/v1/responses/{response_id}/cancel": {"post": _op(_RID)},
        "/v1/responses/{response_id}/input_items": {
            "get": _op(
                # OpenAI's text: "Limit can range between 1 and 100" (its schema omits it).
                _RID,
                _INCLUDE,
                _query("limit", {"type": "integer", "default": 20, "minimum": 1, "maximum": 100}),
                _query("order", {"type": "string", "enum": ["asc", "desc"]}),
                _query("after", {"type": "string"}),
            )
        },
        "/v1/conversations": {
            "post": _op(body=_json_body({"metadata": _METADATA, "items": _CONVERSATION_ITEMS}, []))
        },
        "/v1/conversations/{conversation_id}": {
            "get": _op(_CID),
            "post": _op(_CID, body=_json_body({"metadata": _METADATA}, ["metadata"])),
            "delete": _op(_CID),
        },
        "/v1/conversations/{conversation_id}/items": {
            "post": _op(_CID, _INCLUDE, body=_json_body({"items": _CONVERSATION_ITEMS}, ["items"])),
            "get": _op(
                _CID,
                _INCLUDE,
                _query("limit", {"type": "integer", "default": 20, "minimum": 1, "maximum": 100}),
                _query("order", {"type": "string", "enum": ["asc", "desc"]}),
                _query("after", {"type": "string"}),
            ),
        },
        "/v1/conversations/{conversation_id}/items/{item_id}": {
            "get": _op(_CID, _ITEM_ID, _INCLUDE),
            "delete": _op(_CID, _ITEM_ID),
        },
        "/v1/models": {"get": _op()},
        "/v1/models/{model_id}": {"get": _op(_path("model_id"))},
        "/v1/usage": {
            "get": _op(
                _query("key_id", {"type": "string"}),
                _query("model", {"type": "string"}),
                _query("status", {"type": "string"}),
            )
        },
        "/health": {"get": _op()},
        "/metrics": {"get": _op()},
    },
}


def operations() -> list[Any]:
    schema = schemathesis.openapi.from_dict(DOC)
    return [result.ok() for result in schema.get_all_operations()]


def strategy(operation: Any) -> st.SearchStrategy[Any]:
    """Valid and invalid requests for `operation` (invalid ones only where its
    parameters or body leave room to break them)."""
    modes = [GenerationMode.POSITIVE]
    if operation.body or any(True for _ in operation.iter_parameters()):
        modes.append(GenerationMode.NEGATIVE)
    return st.one_of(*(operation.as_strategy(mode) for mode in modes))


def example_settings(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


@dataclass
class Tally:
    """What one operation's examples got: statuses and problems."""

    examples: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


class Fuzzer:
    """Sends generated requests to one server and judges its replies."""

    def __init__(self, base_url: str, pool_size: int = 4) -> None:
        self.url = base_url.rstrip("/")  # http://127.0.0.1:PORT (no /v1)
        self.http = httpx.Client(timeout=60)
        self.pool = [self._create() for _ in range(pool_size)]
        self.conversations = [self._conversation() for _ in range(pool_size)]
        self.tallies: dict[str, Tally] = {}

    def close(self) -> None:
        self.http.close()

    def _create(self) -> str:
        # In the background, so that some are still running when a cancel or a stream
        # of theirs is fuzzed.
        r = self.http.post(
            f"{self.url}/v1/responses",
            json={"model": MODEL, "input": [{"role": "user", "content": "hi"}], "background": True},
        )
        r.raise_for_status()
        rid: str = r.json()["id"]
        return rid

    def _conversation(self) -> str:
        r = self.http.post(
            f"{self.url}/v1/conversations",
            json={
                "items": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
            },
        )
        r.raise_for_status()
        cid: str = r.json()["id"]
        return cid

    def send(self, case: Any, rng: random.Random) -> list[str]:
        """Send `case` (real ids and model most of the time) and return its problems."""
        self._aim(case, rng)
        kwargs = case.as_transport_kwargs(base_url=self.url)
        request = _httpx_request(kwargs)
        assume(request is not None)  # not sendable at all (e.g. a header httpx refuses)
        tally = self.tallies.setdefault(case.operation.label, Tally())
        tally.examples += 1
        try:
            reply = self.http.request(**request)
        except spec.SpecViolation as exc:
            return self._note(tally, [f"spec: {exc}"], case)
        tally.statuses[reply.status_code] += 1
        problems = judge(reply)
        if case.operation.method.upper() == "DELETE" and reply.status_code == 200:
            rid = case.path_parameters.get("response_id")
            if rid in self.pool:  # keep the pool stocked with live ids
                self.pool[self.pool.index(rid)] = self._create()
            cid = case.path_parameters.get("conversation_id")
            if cid in self.conversations and "item_id" not in case.path_parameters:
                self.conversations[self.conversations.index(cid)] = self._conversation()
        return self._note(tally, problems, case)

    def _note(self, tally: Tally, problems: list[str], case: Any) -> list[str]:
        for problem in problems:
            tally.problems.append(f"{problem} <- {case.as_curl_command()[:600]}")
        return problems

    def _aim(self, case: Any, rng: random.Random) -> None:
        params = case.path_parameters or {}
        if "response_id" in params and rng.random() < 0.75:
            params["response_id"] = rng.choice(self.pool)
        if "model_id" in params and rng.random() < 0.5:
            params["model_id"] = MODEL
        if "conversation_id" in params and rng.random() < 0.75:
            params["conversation_id"] = rng.choice(self.conversations)
            if "item_id" in params and rng.random() < 0.6:
                items = self.http.get(
                    f"{self.url}/v1/conversations/{params['conversation_id']}/items"
                ).json()["data"]
                if items:
                    params["item_id"] = rng.choice(items)["id"]
        if isinstance(case.body, dict) and "conversation" in case.body and rng.random() < 0.5:
            case.body["conversation"] = rng.choice(self.conversations)
            case.body.pop("previous_response_id", None)
        if isinstance(case.body, dict) and rng.random() < 0.5:
            case.body["model"] = MODEL
        if (
            isinstance(case.body, dict)
            and "previous_response_id" in case.body
            and rng.random() < 0.5
        ):
            case.body["previous_response_id"] = rng.choice(self.pool)


def _httpx_request(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Schemathesis's request (in `requests`' terms) for httpx; None if httpx cannot
    even encode it (a header outside latin-1): nothing to learn from the server then."""
    headers = {
        k: v
        for k, v in kwargs.get("headers", {}).items()
        if not k.lower().startswith("x-schemathesis")
    }
    try:
        for k, v in headers.items():
            k.encode("latin-1")
            str(v).encode("latin-1")
    except UnicodeEncodeError:
        return None
    request: dict[str, Any] = {
        "method": kwargs["method"],
        "url": kwargs["url"],
        "headers": headers,
        "params": kwargs.get("params") or {},
    }
    if "json" in kwargs:
        request["content"] = json.dumps(kwargs["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    elif isinstance(kwargs.get("data"), dict):
        request["content"] = _form(kwargs["data"])
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        request["content"] = data.encode() if isinstance(data, str) else data
    return request


def _form(data: dict[str, Any]) -> bytes:
    """A form body as tether reads one: scalars as text, objects/arrays as JSON text."""
    pairs = []
    for key, value in data.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str | int | float):
            text = str(value)
        else:
            text = json.dumps(value)
        pairs.append((str(key), text))
    return urlencode(pairs).encode()


ERROR_KEYS = {"message", "type", "param", "code"}


def judge(reply: httpx.Response) -> list[str]:
    """What is wrong with a reply: a server error, an error body not in OpenAI's shape,
    a stack trace. (Spec checks of 2xx bodies happen as the body passes: tests/spec.py.)"""
    where = f"{reply.request.method} {reply.request.url.path} -> {reply.status_code}"
    problems = []
    if reply.status_code >= 500:
        problems.append(f"server error: {where}: {reply.text[:300]}")
    if "Traceback" in reply.text or 'File "' in reply.text:
        problems.append(f"stack trace: {where}")
    if reply.status_code >= 400:
        problems += [f"{where}: {p}" for p in _error_shape(reply)]
    return problems


def _error_shape(reply: httpx.Response) -> list[str]:
    if not reply.headers.get("content-type", "").startswith("application/json"):
        return [f"error is not JSON: {reply.headers.get('content-type')}"]
    body = reply.json()
    if not isinstance(body, dict) or list(body) != ["error"]:
        return [f"error body is not {{'error': ...}}: {str(body)[:200]}"]
    err = body["error"]
    if not isinstance(err, dict) or set(err) != ERROR_KEYS:
        return [f"error keys are not {sorted(ERROR_KEYS)}: {str(err)[:200]}"]
    if not (
        isinstance(err["message"], str)
        and err["message"]
        and isinstance(err["type"], str)
        and all(err[k] is None or isinstance(err[k], str) for k in ("param", "code"))
    ):
        return [f"error fields have the wrong types: {str(err)[:200]}"]
    return []


def fuzz(fuzzer: Fuzzer, operation: Any, examples: int, seed: int, stop_on_problem: bool) -> Tally:
    """Run `examples` generated requests of `operation`. `stop_on_problem`: fail at the
    first problem (Hypothesis then shrinks it and prints a reproducer); else count."""
    rng = random.Random(seed)

    @example_settings(examples)
    @given(case=strategy(operation))
    def run(case: Any) -> None:
        problems = fuzzer.send(case, rng)
        if stop_on_problem:
            assert not problems, problems

    hypothesis_seed(seed)(run)()
    return fuzzer.tallies.get(operation.label, Tally())
