"""Cancel inside a server-side MCP tool loop: does the MCP server see the cancellation in
time, and does anything start after the reply? (issue 17)

Run: `python bench/mcp_cancel.py` (about 2 minutes). Starts a scripted-engine tether
(`--scripted-rate 200 --scripted-length 30`) and the test MCP server of `tests/mcp_server.py`
(streamable HTTP; `--transport sse` for the older transport), both on loopback. Then, one
at a time, `--responses` background responses each run a loop of three calls of the slow
tool (`CALLS=3`, `slow(seconds=--call-seconds)`) then a 30-token answer, and are cancelled
by id (`client.responses.cancel`) at a random moment, uniform in [0, --within] seconds after
the create's reply (seeded RNG; `--seed` repeats a run). So the cancel lands while the
server lists tools, while the model streams a call's arguments, while a call is in flight,
between steps, or during the final answer.

The MCP server records, with its clock (the machine's: client, tether and server share
it), when each call started, finished or saw its cancellation. Per response, the phase at
the cancel is the server's view: a call was in flight when one started before the reply
and did not finish before it. Figures:

- cancel call -> reply (every response that was cancelled);
- reply -> the MCP server saw the cancellation, for calls in flight (negative: before the
  reply, as the cancel is sent before the run ends). Goal: p99 <= 50 ms;
- calls started after the reply: goal 0 (docs/contract.md §8.4).

Checks per response: the reply is `cancelled` (a cancel that came after the response
ended by itself gets a 400 and is counted apart), its in-flight `mcp_call` is `incomplete`,
a later retrieve agrees with the reply, and its usage equals the deltas in its log.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Chart, Transcript, progress, save
from _server import Server, machine, percentile, table, tether_server

REPO = Path(__file__).resolve().parent.parent
DELTAS = ("response.output_text.delta", "response.mcp_call_arguments.delta")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", type=int, default=200)
    parser.add_argument("--call-seconds", type=float, default=0.3)
    parser.add_argument("--within", type=float, default=1.3)
    parser.add_argument(
        "--transport", choices=["streamable-http", "sse"], default="streamable-http"
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    with Transcript() as printed:
        code, figures = measure(args)
    save("mcp_cancel", printed.text, *figures)
    return code


def measure(args: argparse.Namespace) -> tuple[int, list[Chart]]:
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed {seed}, {args.responses} responses, transport {args.transport}, {machine()}")
    mcp = Server(
        [sys.executable, str(REPO / "tests" / "mcp_server.py"), "{port}", args.transport],
        name="mcp",
    )
    path = "/sse" if args.transport == "sse" else "/mcp"
    tool = {
        "type": "mcp",
        "server_label": "calc",
        "server_url": f"{mcp.url}{path}",
        "require_approval": "never",
    }
    prompt = f'CALLS=3 CALL=calc__slow:{{"seconds":{args.call_seconds}}} go'
    replies, seen_after, late, failed = [], [], 0, []
    started_after = 0
    phases: dict[str, int] = {}
    with (
        mcp,
        tether_server(rate=200, length=30) as srv,
        openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as client,
        httpx.Client() as http,
    ):
        for _ in progress(range(args.responses), desc="responses cancelled", unit="resp"):
            known = len(http.get(f"{mcp.url}/seen").json())
            created = client.responses.create(
                model="scripted",
                input=prompt,
                tools=[tool],
                background=True,  # type: ignore[list-item]
            )
            time.sleep(rng.uniform(0, args.within))
            called = time.time()
            try:
                reply = client.responses.cancel(created.id)
            except openai.BadRequestError:
                late += 1  # it ended by itself first
                continue
            replied = time.time()
            replies.append((replied - called) * 1000)
            time.sleep(0.2)  # a call started after the reply would show by now
            seen = http.get(f"{mcp.url}/seen").json()[known:]
            problems = check(client, http, srv.base_url, reply, seen, replied)
            failed += [f"{created.id}: {p}" for p in problems]
            started_after += sum(1 for s in seen if s["event"] == "started" and s["at"] > replied)
            phase = phase_of(reply, seen, replied)
            phases[phase] = phases.get(phase, 0) + 1
            if phase == "call in flight":
                got = [s["at"] for s in seen if s["event"] == "cancelled"]
                if got:
                    seen_after.append((got[0] - replied) * 1000)
                else:
                    failed.append(f"{created.id}: the MCP server never saw the cancel")
    print()
    print(table(["phase at the cancel", "responses"], sorted(phases.items())))
    print()
    rows = [
        ["cancel call -> reply", *_stats(replies)],
        ["reply -> MCP server saw the cancel (calls in flight)", *_stats(seen_after)],
    ]
    print(table(["ms", "n", "p50", "p99", "max"], rows))
    print()
    ok = percentile(seen_after, 99) <= 50 if seen_after else False
    checks = [
        ["MCP server saw the cancel within 50 ms of the reply (p99)", "yes" if ok else "NO"],
        ["calls started after the reply", started_after],
        ["responses that ended before the cancel (400, left out)", late],
        ["failed checks", len(failed)],
    ]
    print(table(["check", "result"], checks))
    for problem in failed[:20]:
        print("  ", problem)
    code = 0 if ok and not failed and started_after == 0 else 1
    return code, charts(replies, seen_after, phases)


def charts(replies: list[float], seen_after: list[float], phases: dict[str, int]) -> list[Chart]:
    """Latency p50 / p99 / max of the reply and of the MCP server seeing the cancel; phases."""
    measured = [
        (n, v)
        for n, v in (
            ("cancel call\n→ reply", replies),
            ("reply → MCP server\nsaw the cancel", seen_after),
        )
        if v
    ]
    return [
        Chart(
            "cancel in an MCP tool loop (ms)",
            "ms",
            [n for n, _ in measured],
            {
                "p50": [percentile(v, 50) for _, v in measured],
                "p99": [percentile(v, 99) for _, v in measured],
                "max": [max(v) for _, v in measured],
            },
            marks={"goal: MCP server sees it, p99 ≤ 50 ms": 50.0},
        ),
        Chart(
            "phase at the cancel",
            "responses",
            [k.replace(" (", "\n(") for k in sorted(phases)],
            {"responses": [phases[k] for k in sorted(phases)]},
        ),
    ]


def _stats(values: list[float]) -> list[object]:
    if not values:
        return [0, "-", "-", "-"]
    return [
        len(values),
        f"{percentile(values, 50):.1f}",
        f"{percentile(values, 99):.1f}",
        f"{max(values):.1f}",
    ]


def phase_of(reply: Any, seen: list[dict[str, Any]], replied: float) -> str:
    started = [s for s in seen if s["event"] == "started" and s["at"] <= replied]
    finished = [s for s in seen if s["event"] == "finished" and s["at"] <= replied]
    if len(started) > len(finished):
        return "call in flight"
    kinds = [i.type for i in reply.output]
    if kinds == [] or (kinds == ["mcp_list_tools"] and reply.output[0].error):
        return "listing tools (or before)"
    if kinds[-1] == "message":
        return "final answer"
    last = reply.output[-1]
    if last.type == "mcp_call" and last.status == "incomplete":
        return "generating a call's arguments"
    return "between steps"


def check(
    client: openai.OpenAI,
    http: httpx.Client,
    base_url: str,
    reply: Any,
    seen: list[dict[str, Any]],
    replied: float,
) -> list[str]:
    problems = []
    if reply.status != "cancelled":
        problems.append(f"reply status {reply.status}")
    if client.responses.retrieve(reply.id).model_dump() != reply.model_dump():
        problems.append("retrieve differs from the reply")
    in_flight = phase_of(reply, seen, replied) == "call in flight"
    calls = [i for i in reply.output if i.type == "mcp_call"]
    if in_flight and (not calls or calls[-1].status != "incomplete"):
        problems.append("the call in flight is not incomplete")
    body = http.get(f"{base_url}/responses/{reply.id}", params={"stream": "true"}).text
    events = [orjson.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    deltas = sum(e["type"] in DELTAS for e in events)
    if reply.usage is None or reply.usage.output_tokens != deltas:
        problems.append(f"usage {reply.usage} != {deltas} deltas")
    if events[-1]["type"] != "response.failed":
        problems.append(f"the log ends with {events[-1]['type']}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
