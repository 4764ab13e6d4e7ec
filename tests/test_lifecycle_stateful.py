"""A stateful property test: random interleavings against a real server (docs/contract.md §1-4, §6).

Hypothesis drives one `tether serve` process (or, scaled out, two API replicas and two
workers) through creates in every mode, partial reads, extra readers, resumes at random
cursors, cancels (repeated, concurrent), disconnects, completions, injected engine failures
and restarts (graceful or SIGKILL); some creates are turns of two shared conversations
(docs/contract.md §9), between which clients add items. After every step every response
is checked: a finished one in full, once (`invariants.check_response`), then for a status
or usage that changes; a cancel that returned 200 must read `cancelled`. When an example
ends, every response is
checked again with its readers read to the end and the engine's token trace, and the usage
ledger must have grown by exactly the example's responses and their reported usage. And
each conversation's items must be exactly, in order, the items clients added and its ended
turns' input and output as their terminal events reported them (a failed turn: nothing),
each turn's prompt exactly the items before its own (when its engine trace is at hand).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, note, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cluster import Cluster
from conftest import Server, raw_events
from invariants import FINAL_STATES, Cancel, Seen, check_response
from services import postgres_url, prefix, redis_url

LENGTH = 40
T = TypeVar("T")


class Reader:
    """One open stream, read a few events at a time by the rules."""

    def __init__(self, method: str, url: str, seen: Seen, **kwargs: Any) -> None:
        self.seen = seen
        self._cm = httpx.stream(method, url, timeout=15, **kwargs)
        self._response = self._cm.__enter__()
        if self._response.is_error:  # read and closed before it is raised
            self._response.read()
            self._cm.__exit__(None, None, None)
            self._response.raise_for_status()
        self._lines: Iterator[str] = self._response.iter_lines()

    def pull(self, k: int) -> None:
        """Read up to `k` events (fewer if the stream ends)."""
        got = 0
        while got < k and not self.seen.done:
            line = next(self._lines, None)
            if line is None:
                break
            if line == "data: [DONE]":
                self.seen.done = True
            elif line.startswith("data: "):
                self.seen.events.append(json.loads(line[6:]))
                got += 1

    def close(self) -> None:
        self.seen.connected = False
        with contextlib.suppress(httpx.HTTPError):  # the server may already be gone
            self._cm.__exit__(None, None, None)


@dataclass
class Tracked:
    rid: str
    generation: int  # server process generation it was created in
    background: bool
    readers: list[Reader] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    post_stream: Reader | None = None
    final: tuple[str, Any] | None = None  # status and usage, once checked terminal
    conversation: str | None = None  # the conversation it is a turn of


LOCKED = "conversation_locked"  # a turn (or items) while another turn is in progress


def item_texts(items: list[dict[str, Any]]) -> list[str]:
    """Items as the texts a scripted engine's trace shows for them."""
    return ["".join(p.get("text", "") for p in i.get("content", [])) for i in items]


def pick(data: st.DataObject, pool: list[T]) -> T:
    """Choose from a pool whose size depends on the server's timing: draw an index, not
    an element, so replays draw the same kind of value."""
    return pool[data.draw(st.integers(0, 2**16)) % len(pool)]


class Lifecycle(RuleBasedStateMachine):
    server: ClassVar[Server]
    steps: ClassVar[int] = 0
    created: ClassVar[int] = 0
    rules: ClassVar[Counter[str]] = Counter()  # steps per rule (restarts: kill / term)
    # Steps that must pass between two restarts; 0 (CI) = no limit. A restart costs
    # ~0.8 s (a new process), the other rules ~0.08 s, and hypothesis's swarm testing
    # makes some examples restart-heavy: bench/stateful.py's long run spaces them out.
    restart_gap: ClassVar[int] = 0

    @initialize()
    def setup(self) -> None:
        self.responses: list[Tracked] = []
        self.generation = 0
        self.since_restart = 0
        self.ledger_before = self._ledger()
        # Two conversations, and what was added to each, in order: ("items", ids) or
        # ("turn", tracked). One turn at a time (§9.5): the order things were accepted in.
        self.history: dict[str, list[tuple[str, Any]]] = {}
        for _ in range(2):
            r = httpx.post(f"{self.base}/conversations", json={}, timeout=10)
            assert r.status_code == 200, r.text
            self.history[r.json()["id"]] = []

    @property
    def base(self) -> str:
        return self.server.base_url

    # --- rules --------------------------------------------------------------------------

    @rule(
        stream=st.booleans(),
        background=st.booleans(),
        fail_at=st.one_of(st.none(), st.none(), st.none(), st.integers(0, LENGTH)),
        budget=st.one_of(st.none(), st.none(), st.integers(1, 10)),
        turn=st.one_of(st.none(), st.integers(0, 1)),
    )
    def create(
        self,
        stream: bool,
        background: bool,
        fail_at: int | None,
        budget: int | None,
        turn: int | None,
    ) -> None:
        body: dict[str, Any] = {
            "model": "scripted",
            "stream": stream,
            "background": background,
            "input": "hi" if fail_at is None else f"FAIL_AT={fail_at}",
        }
        cid = None
        if turn is not None:
            cid = list(self.history)[turn]
            body["conversation"] = cid
            # The directive goes in the instructions, which the conversation does not
            # keep: in its input it would fail every later turn too.
            body["input"] = f"hi {Lifecycle.created}"
            if fail_at is not None:
                body["instructions"] = f"FAIL_AT={fail_at}"
        if not stream and not background:
            budget = min(budget or 3, 3)  # this create blocks until the run ends: keep it short
        if budget is not None:
            body["max_output_tokens"] = budget
        if stream:
            seen = Seen(after=-1)
            try:
                reader = Reader("POST", f"{self.base}/responses", seen, json=body)
            except httpx.HTTPStatusError as exc:
                assert cid is not None and exc.response.json()["error"]["code"] == LOCKED
                self._step("create (conversation_locked)")
                return
            reader.pull(1)
            tracked = Tracked(
                seen.events[0]["response"]["id"],
                self.generation,
                background,
                [reader],
                post_stream=reader,
            )
        else:
            r = httpx.post(f"{self.base}/responses", json=body, timeout=30)
            if cid is not None and r.status_code == 400 and r.json()["error"]["code"] == LOCKED:
                self._step("create (conversation_locked)")
                return
            assert r.status_code == 200, r.text
            tracked = Tracked(r.json()["id"], self.generation, background)
        tracked.conversation = cid
        if cid is not None:
            self.history[cid].append(("turn", tracked))
        self.responses.append(tracked)
        Lifecycle.created += 1
        self._step("create" if cid is None else "create (turn)")

    @rule(turn=st.integers(0, 1), n=st.integers(1, 3))
    def add_items(self, turn: int, n: int) -> None:
        cid = list(self.history)[turn]
        items = [{"role": "user", "content": f"added {k}"} for k in range(n)]
        r = httpx.post(f"{self.base}/conversations/{cid}/items", json={"items": items}, timeout=10)
        if r.status_code == 400 and r.json()["error"]["code"] == LOCKED:
            self._step("add_items (conversation_locked)")
            return
        assert r.status_code == 200, r.text
        self.history[cid].append(("items", [i["id"] for i in r.json()["data"]]))
        self._step("add_items")

    @precondition(lambda self: self._open_readers())
    @rule(data=st.data(), k=st.integers(1, 8))
    def read_some(self, data: st.DataObject, k: int) -> None:
        pick(data, self._open_readers()).pull(k)
        self._step("read_some")

    @precondition(lambda self: self.responses)
    @rule(data=st.data(), cursor=st.one_of(st.none(), st.integers(0, LENGTH + 12)))
    def open_reader(self, data: st.DataObject, cursor: int | None) -> None:
        tracked = pick(data, self.responses)
        params = {"stream": "true"}
        if cursor is not None:
            params["starting_after"] = str(cursor)
        seen = Seen(after=-1 if cursor is None else cursor)
        reader = Reader("GET", f"{self.base}/responses/{tracked.rid}", seen, params=params)
        tracked.readers.append(reader)
        self._step("open_reader")

    @precondition(lambda self: self.responses)
    @rule(data=st.data(), clients=st.integers(1, 3))
    def cancel(self, data: st.DataObject, clients: int) -> None:
        # Mostly cancel a response that is still running: that is where the races are.
        live = [
            t
            for t in self.responses
            if httpx.get(f"{self.base}/responses/{t.rid}", timeout=10).json()["status"]
            in ("queued", "in_progress")
        ]
        prefer_live = data.draw(st.integers(0, 4)) > 0
        tracked = pick(data, live if live and prefer_live else self.responses)

        def one() -> None:
            r = httpx.post(f"{self.base}/responses/{tracked.rid}/cancel", timeout=15)
            tracked.cancels.append(Cancel(r.status_code, r.json(), time.time()))

        threads = [threading.Thread(target=one) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        self._step("cancel")

    @precondition(lambda self: self._open_readers())
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        pick(data, self._open_readers()).close()
        self._step("disconnect")

    @precondition(lambda self: self.responses)
    @rule(data=st.data())
    def let_it_finish(self, data: st.DataObject) -> None:
        tracked = pick(data, self.responses)
        raw_events(self.server, tracked.rid)  # follows the log to its terminal event
        self._step("let_it_finish")

    @precondition(lambda self: self.since_restart >= Lifecycle.restart_gap)
    @rule(kill=st.booleans())
    def restart(self, kill: bool) -> None:
        for reader in self._open_readers():
            reader.close()
        if kill:
            self.server.kill()
        else:
            self.server.stop()
        self.server.start()
        self.generation += 1
        self._step("restart (SIGKILL)" if kill else "restart (SIGTERM)")
        self.since_restart = 0

    # --- checks -------------------------------------------------------------------------

    @invariant()
    def every_response_holds(self) -> None:
        """After every step, per response: once it is terminal, its full log is checked
        (one terminal event, last; contiguous; usage = deltas = text; cancels so far;
        each reader's events so far are the log's from its cursor), and from then on its
        status and usage never change; a cancel that returned 200 means `cancelled`."""
        for tracked in self.responses:
            now = httpx.get(f"{self.base}/responses/{tracked.rid}", timeout=10).json()
            if any(c.status == 200 for c in tracked.cancels):
                assert now["status"] == "cancelled", tracked.rid
            if tracked.final is not None:
                assert (now["status"], now["usage"]) == tracked.final, tracked.rid
            elif now["status"] in FINAL_STATES:
                log = raw_events(self.server, tracked.rid)
                so_far = [
                    Seen(r.seen.after, list(r.seen.events), connected=False)
                    for r in tracked.readers
                ]
                check_response(self.base, tracked.rid, log, so_far, tracked.cancels, None)
                tracked.final = (now["status"], now["usage"])

    def teardown(self) -> None:
        for tracked in getattr(self, "responses", []):
            log = raw_events(self.server, tracked.rid)
            for reader in tracked.readers:
                if reader.seen.connected:
                    reader.pull(10_000)
                    reader.close()
                    reader.seen.connected = True  # it stayed connected to the end
            trace = None
            if tracked.generation == self.generation:
                trace = self.server.trace(tracked.rid)
            note(f"checking {tracked.rid}")
            check_response(
                self.base,
                tracked.rid,
                log,
                [r.seen for r in tracked.readers],
                tracked.cancels,
                trace,
            )
        if hasattr(self, "responses"):
            self._check_ledger()
            self._check_conversations()

    def _check_conversations(self) -> None:
        """§9: each conversation's items are exactly, in order, the items clients added
        and its turns' input and output as their terminal events reported them (a failed
        turn: none); each turn's prompt was exactly the items before its own."""
        for cid, history in self.history.items():
            r = httpx.get(
                f"{self.base}/conversations/{cid}/items",
                params={"order": "asc", "limit": 100},
                timeout=10,
            )
            items = r.json()["data"]
            assert not r.json()["has_more"]
            expected: list[Any] = []
            for kind, what in history:
                if kind == "items":
                    expected += what
                    continue
                tracked: Tracked = what
                log = raw_events(self.server, tracked.rid)
                final = log[-1]["response"]
                assert final["conversation"] == {"id": cid}, tracked.rid
                before = len(expected)
                if final["status"] != "failed":
                    inputs = httpx.get(
                        f"{self.base}/responses/{tracked.rid}/input_items",
                        params={"order": "asc"},
                        timeout=10,
                    ).json()["data"]
                    expected += [i["id"] for i in inputs] + [o["id"] for o in final["output"]]
                    # As the terminal event reported them, field for field.
                    at = len(expected) - len(final["output"])
                    assert items[at : len(expected)] == final["output"], tracked.rid
                if tracked.generation == self.generation:
                    try:
                        trace = self.server.trace(tracked.rid)
                    except httpx.HTTPStatusError:
                        trace = None  # a cancel beat the claim: no run, no trace
                    if trace is not None and trace.get("messages"):
                        prompt = [m["text"] for m in trace["messages"] if m["role"] != "system"]
                        assert prompt[:-1] == item_texts(items[:before]), tracked.rid
            assert [i["id"] for i in items] == expected, cid

    def _ledger(self) -> Counter[tuple[str, str, str]]:
        """The usage ledger's counts, by model, status and field."""
        body = httpx.get(f"{self.base}/usage", timeout=10).json()
        counts: Counter[tuple[str, str, str]] = Counter()
        for row in body["data"]:
            for f in ("responses", "input_tokens", "output_tokens", "reasoning_tokens"):
                counts[(row["model"], row["status"], f)] += row[f]
        return counts

    def _check_ledger(self) -> None:
        """Every response of the example, all terminal now, entered the usage ledger
        exactly once with the usage it reports, whatever raced or crashed."""
        expected: Counter[tuple[str, str, str]] = Counter()
        for tracked in self.responses:
            now = httpx.get(f"{self.base}/responses/{tracked.rid}", timeout=10).json()
            assert now["status"] in FINAL_STATES, tracked.rid
            usage = now["usage"] or {}
            expected[(now["model"], now["status"], "responses")] += 1
            for f in ("input_tokens", "output_tokens"):
                expected[(now["model"], now["status"], f)] += usage.get(f, 0)
            details = usage.get("output_tokens_details") or {}
            expected[(now["model"], now["status"], "reasoning_tokens")] += details.get(
                "reasoning_tokens", 0
            )
        grown = self._ledger()
        grown.subtract(self.ledger_before)
        assert +grown == +expected, (dict(grown), dict(expected))

    def _open_readers(self) -> list[Reader]:
        return [
            r for t in self.responses for r in t.readers if r.seen.connected and not r.seen.done
        ]

    def _step(self, rule: str) -> None:
        Lifecycle.steps += 1
        Lifecycle.rules[rule] += 1
        self.since_restart += 1


def run(
    tmp: Path, examples: int, steps: int, chosen_seed: int, rate: int = 30, scaled: bool = False
) -> None:
    """Run the machine against a fresh server (also used by bench/stateful.py).
    `scaled`: two API replicas (requests alternate between them) and two workers on
    PostgreSQL + Redis instead; a restart restarts all four processes."""
    flags = [
        "--scripted-rate",
        str(rate),
        "--scripted-length",
        str(LENGTH),
        "--lease-timeout",
        "1.5",
        # A cancel that does not stop the run shows as tokens after the reply. Scaled
        # out, the stop signal crosses Redis to another process: a longer bound.
        "--cancel-timeout",
        "1.0" if scaled else "0.3",
    ]
    with contextlib.ExitStack() as stack:
        server: Any
        if scaled:
            db = stack.enter_context(postgres_url())
            server = Cluster(tmp, db, redis_url(), prefix(), args=tuple(flags))
        else:
            server = Server(tmp / "stateful.db", ["--engine", "scripted", "--debug-routes", *flags])
        server.start()
        stack.callback(server.stop)
        Lifecycle.server = server
        run_state_machine_as_test(
            seed(chosen_seed)(Lifecycle),  # type: ignore[arg-type]
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )


@pytest.mark.parametrize("scaled", [False, True], ids=["one-process", "scaled-out"])
def test_random_interleavings(tmp_path: Path, scaled: bool) -> None:
    chosen = int(os.environ.get("TETHER_SEED", random.randrange(2**32)))
    print(f"seed={chosen} (rerun with TETHER_SEED={chosen})")
    Lifecycle.steps = Lifecycle.created = 0
    Lifecycle.rules.clear()
    examples = int(os.environ.get("TETHER_EXAMPLES", "8"))
    # Scaled out, a restart is four processes: fewer of them, so the steps go to the races.
    Lifecycle.restart_gap = 6 if scaled else 0
    try:
        run(tmp_path, examples=examples, steps=12, chosen_seed=chosen, scaled=scaled)
    finally:
        Lifecycle.restart_gap = 0
    print(f"{Lifecycle.steps} steps, {Lifecycle.created} responses, {dict(Lifecycle.rules)}")
