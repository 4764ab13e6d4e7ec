"""The usage ledger: `GET /v1/usage` and `tether usage` count exactly the tokens of terminal
responses, by API key, model and terminal status, only within the caller's tenant, and
keep counting them after the responses are deleted or the server restarts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import openai

from conftest import Server, read_deltas
from services import delete_prefix, postgres_url, prefix, redis_url, run
from test_auth import client_for, create_key, tether

Tally = dict[tuple[str | None, str, str], Counter[str]]


def count(tally: Tally, key_id: str | None, response: Any) -> None:
    """Add a terminal response, as its client saw it, to the test's own tally."""
    row = tally.setdefault((key_id, response.model, response.status), Counter())
    row["responses"] += 1
    row["input_tokens"] += response.usage.input_tokens
    row["output_tokens"] += response.usage.output_tokens
    row["reasoning_tokens"] += response.usage.output_tokens_details.reasoning_tokens


def rows_of(tally: Tally) -> list[dict[str, Any]]:
    return sorted(
        (
            {
                "key_id": k,
                "model": m,
                "status": s,
                "responses": c["responses"],
                "input_tokens": c["input_tokens"],
                "output_tokens": c["output_tokens"],
                "reasoning_tokens": c["reasoning_tokens"],
            }
            for (k, m, s), c in tally.items()
        ),
        key=lambda r: (r["key_id"] or "", r["model"], r["status"]),
    )


def usage(client: openai.OpenAI, **params: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/usage", cast_to=object, options={"params": params})
    return body


def ledger(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in row.items() if k not in ("object", "total_tokens")}
        for row in body["data"]
    ]


def cancelled_midway(client: openai.OpenAI, prompt: str = "long", thoughts: int = 0) -> Any:
    """A response cancelled after 3 text deltas (or `thoughts` reasoning deltas): what a
    later retrieve says, which its cancel reply and terminal event agree with."""
    stream = client.responses.create(model="scripted", input=prompt, background=True, stream=True)
    if thoughts:
        rid, seen = "", 0
        for event in stream:
            rid = event.response.id if event.type == "response.created" else rid
            seen += event.type == "response.reasoning_text.delta"
            if seen == thoughts:
                break
    else:
        rid, _ = read_deltas(stream, 3)
    reply = client.responses.cancel(rid)
    terminal = [e for e in stream][-1]
    assert terminal.type == "response.failed"
    final = client.responses.retrieve(rid)
    assert reply.usage == terminal.response.usage == final.usage
    return final


def reasoning_responses(client: openai.OpenAI) -> list[Any]:
    """Responses of a thinking model (the scripted engine's THINK): completed, and
    cancelled while thinking and while answering; each has reasoning tokens."""
    done = client.responses.create(model="scripted", input="THINK=6 go")
    assert done.status == "completed" and done.usage.output_tokens_details.reasoning_tokens == 6
    thinking = cancelled_midway(client, "THINK=1000 go", thoughts=3)
    answering = cancelled_midway(client, "THINK=5 go")
    for cancelled in (thinking, answering):
        assert cancelled.status == "cancelled"
    assert thinking.output[0].type == "reasoning" and len(thinking.output) == 1
    assert thinking.usage.output_tokens_details.reasoning_tokens >= 3
    assert thinking.usage.output_tokens == thinking.usage.output_tokens_details.reasoning_tokens
    assert answering.usage.output_tokens_details.reasoning_tokens == 5
    assert answering.usage.output_tokens >= 5 + 3
    return [done, thinking, answering]


def test_ledger_is_exact_per_key_model_and_status(make_server: Any, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys = {
        name: create_key(keys_file, tenant, name)
        for name, tenant in (("a1", "a"), ("a2", "a"), ("b", "b"))
    }
    server: Server = make_server(
        "--keys-file", str(keys_file), "--scripted-rate", "200", "--scripted-length", "200"
    )
    a1, a2, b = (client_for(server, keys[n][1]) for n in ("a1", "a2", "b"))
    ids = {n: keys[n][0] for n in keys}
    tally_a: Tally = {}
    tally_b: Tally = {}
    for text in ("one", "two words", "three little words"):
        count(tally_a, ids["a1"], a1.responses.create(model="scripted", input=text))
    count(
        tally_a,
        ids["a1"],
        a1.responses.create(model="scripted", input="short", max_output_tokens=16),
    )
    count(tally_a, ids["a2"], cancelled_midway(a2))
    doomed = b.responses.create(model="scripted", input="b's")
    count(tally_b, ids["b"], doomed)
    assert {s for (_, _, s) in tally_a} == {"completed", "incomplete", "cancelled"}

    body = usage(a1)
    assert body["tenant"] == "a"
    assert ledger(body) == rows_of(tally_a)
    assert body["totals"]["responses"] == 5
    assert body["totals"]["output_tokens"] == sum(c["output_tokens"] for c in tally_a.values())
    assert ledger(usage(a2, key_id=ids["a2"])) == rows_of(
        {k: v for k, v in tally_a.items() if k[0] == ids["a2"]}
    )
    assert ledger(usage(a1, status="cancelled")) == rows_of(
        {k: v for k, v in tally_a.items() if k[2] == "cancelled"}
    )
    assert ledger(usage(b)) == rows_of(tally_b)

    # Deleting a response, or restarting the server, does not unbill it.
    b.responses.delete(doomed.id)
    server.restart()
    assert ledger(usage(b)) == rows_of(tally_b)

    # The operator's view reads the database: every tenant, the same numbers.
    out = tether("usage", "--db", str(server.db), "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [
        {k: v for k, v in r.items() if k != "tenant"} for r in rows if r["tenant"] == "a"
    ] == rows_of(tally_a)
    assert [r["tenant"] for r in rows].count("b") == len(tally_b)
    table = tether("usage", "--db", str(server.db), "--tenant", "b")
    assert table.stdout.splitlines()[0].split() == [
        "tenant",
        "key_id",
        "model",
        "status",
        "responses",
        "input_tokens",
        "output_tokens",
        "reasoning_tokens",
    ]
    assert len(table.stdout.splitlines()) == 1 + len(tally_b) + 1  # the totals line


def test_ledger_without_keys(server: Server, client: openai.OpenAI) -> None:
    tally: Tally = {}
    count(tally, None, client.responses.create(model="scripted", input="hi", max_output_tokens=20))
    count(tally, None, cancelled_midway(client))
    body = usage(client)
    assert body["tenant"] == "default"
    assert ledger(body) == rows_of(tally)


def assert_totals(body: dict[str, Any], tally: Tally) -> None:
    for field in ("responses", "input_tokens", "output_tokens", "reasoning_tokens"):
        assert body["totals"][field] == sum(c[field] for c in tally.values()), field
    assert body["totals"]["total_tokens"] == sum(
        c["input_tokens"] + c["output_tokens"] for c in tally.values()
    )


def test_ledger_counts_reasoning_tokens(make_server: Any) -> None:
    # Thinking is a part of the output tokens: the ledger keeps that part apart, exactly as
    # each response's usage reported it, also for a cancel while thinking or answering.
    server: Server = make_server("--scripted-rate", "100", "--scripted-length", "200")
    tally: Tally = {}
    with server.client() as client:
        finals = reasoning_responses(client)
        for response in finals:
            count(tally, None, response)
        count(tally, None, client.responses.create(model="scripted", input="no thinking"))
        body = usage(client)
    assert ledger(body) == rows_of(tally)
    assert_totals(body, tally)
    thought = sum(r.usage.output_tokens_details.reasoning_tokens for r in finals)
    assert body["totals"]["reasoning_tokens"] == thought >= 6 + 3 + 5
    assert [r["reasoning_tokens"] for r in body["data"] if r["status"] == "cancelled"] == [
        finals[1].usage.output_tokens_details.reasoning_tokens + 5
    ]

    out = tether("usage", "--db", str(server.db), "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [{k: v for k, v in r.items() if k != "tenant"} for r in rows] == rows_of(tally)
    table = tether("usage", "--db", str(server.db)).stdout.splitlines()
    assert table[0].split()[-1] == "reasoning_tokens"
    assert table[-1].split() == [
        "total",
        *(str(body["totals"][f]) for f in ("responses", "input_tokens", "output_tokens")),
        str(thought),
    ]


def test_usage_cli_bad_database_is_a_clear_error(tmp_path: Path) -> None:
    out = tether("usage", "--db", str(tmp_path / "missing.db"))
    assert out.returncode == 1
    assert "cannot read the usage ledger" in out.stderr and "Traceback" not in out.stderr


def test_ledger_on_postgres(tmp_path: Path) -> None:
    with postgres_url() as db:
        redis, keys = redis_url(), prefix()
        server = Server(
            db,
            [
                "--engine",
                "scripted",
                "--redis",
                redis,
                "--redis-prefix",
                keys,
                "--scripted-rate",
                "200",
                "--scripted-length",
                "100",
            ],
            log_dir=tmp_path,
        )
        server.start()
        try:
            with server.client() as client:
                tally: Tally = {}
                count(tally, None, client.responses.create(model="scripted", input="a"))
                count(tally, None, client.responses.create(model="scripted", input="b c"))
                count(tally, None, cancelled_midway(client))
                for response in reasoning_responses(client):
                    count(tally, None, response)
                body = usage(client)
                assert ledger(body) == rows_of(tally)
                assert_totals(body, tally)
                assert body["totals"]["reasoning_tokens"] > 0
            out = tether("usage", "--db", db, "--json")
            assert out.returncode == 0, out.stderr
            rows = [json.loads(line) for line in out.stdout.splitlines()]
            assert [{k: v for k, v in r.items() if k != "tenant"} for r in rows] == rows_of(tally)
        finally:
            server.stop()
            run(delete_prefix(redis, keys))
