"""The Codex CLI, unchanged, against a real `tether serve` (issue 13's acceptance).

`codex exec` (npm `@openai/codex`, pinned; `scripts/install` puts it in `.cache/codex`)
runs one turn non-interactively against tether, over HTTP and over WebSocket, with its
real requests: ~4,600 tokens of prompt, function and namespace tools, `reasoning`,
`include`, `client_metadata`, `store: false`. Nothing sits between the two: the tests
read Codex's `--json` event lines, tether's stored responses (through the SDK) and what
the engine or the fake upstream did.

Codex keeps no response ids, and `store: false` responses are never listed, so the ids
come from the server's database (read-only); everything else goes through the API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from upstreams import FakeUpstream, fake_upstream

from conftest import Server, raw_events, wait_for

CODEX_VERSION = "0.171.0"  # scripts/install installs the same
CODEX = Path(__file__).resolve().parents[1] / ".cache" / "codex" / "node_modules" / ".bin" / "codex"
MARKER = "tether-codex-7f3a"  # what the command Codex runs prints
COMMAND = f"echo {MARKER}"
TRANSPORTS = ["http", "websocket"]


def codex_binary() -> Path:
    """The pinned CLI; missing: a failure under CI, a skip (with the reason) elsewhere."""
    if CODEX.exists() and shutil.which("node"):
        return CODEX
    reason = (
        f"Codex CLI {CODEX_VERSION} is not installed in .cache/codex "
        "(scripts/install installs it with npm)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def call_directive(name: str, arguments: dict[str, Any]) -> str:
    """The scripted engine's prompt directive that makes it call a function tool:
    `CALL=name:{json}`, one word (a space inside a string is written `\\u0020`)."""
    text = json.dumps(arguments, separators=(",", ":")).replace(" ", "\\u0020")
    return f"CALL={name}:{text}"


CONFIG = """\
model = "{model}"
model_provider = "local"
check_for_update_on_startup = false
approval_policy = "never"
# Commands run sandboxed, read-only: the embedded model chooses its own.
sandbox_mode = "read-only"
web_search = "disabled"
[analytics]
enabled = false
[feedback]
enabled = false
[otel]
exporter = "none"
[model_providers.local]
name = "local"
base_url = "{base_url}"
wire_api = "responses"
env_key = "TETHER_TEST_KEY"
request_max_retries = 0
stream_max_retries = 0
"""


@dataclass
class Turn:
    """One `codex exec` run: its exit code, `--json` events and stderr."""

    returncode: int
    events: list[dict[str, Any]]
    stderr: str
    exited_at: float = 0.0

    def items(self, kind: str) -> list[dict[str, Any]]:
        return [
            e["item"]
            for e in self.events
            if e["type"] == "item.completed" and e["item"]["type"] == kind
        ]

    @property
    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


@dataclass
class Codex:
    """`codex exec` with its own CODEX_HOME, pointed at one base URL and model."""

    home: Path
    work: Path
    base_url: str
    model: str
    websocket: bool = False
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            CONFIG.format(model=self.model, base_url=self.base_url)
        )

    def argv(self, prompt: str) -> list[str]:
        extra = ["-c", "model_providers.local.supports_websockets=true"] if self.websocket else []
        return [
            str(codex_binary()),
            "exec",
            "--skip-git-repo-check",
            "--ephemeral",
            "-C",
            str(self.work),
            "--json",
            *extra,
            prompt,
        ]

    def start(self, prompt: str) -> subprocess.Popen[str]:
        env = {
            **os.environ,
            "CODEX_HOME": str(self.home),
            "TETHER_TEST_KEY": "test",
            "NO_COLOR": "1",
        }
        # stderr to a file: nothing reads it while Codex runs, so a pipe could fill up.
        with self.stderr.open("w") as err:
            proc = subprocess.Popen(
                self.argv(prompt),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.procs.append(proc)
        return proc

    @property
    def stderr(self) -> Path:
        return self.home / "stderr.log"

    def run(self, prompt: str, timeout: float = 120.0) -> Turn:
        proc = self.start(prompt)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(
                f"codex did not finish in {timeout} s:\n{out}\n{self.stderr.read_text()}"
            ) from None
        return Turn(proc.returncode, parse(out), self.stderr.read_text(), time.time())

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def parse(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture
def codex_at(tmp_path: Path) -> Iterator[Any]:
    """`codex_at(server_or_url, model, websocket)`: a Codex configured for it."""
    made: list[Codex] = []

    def make(base_url: str, model: str, websocket: bool = False) -> Codex:
        codex_binary()
        codex = Codex(
            tmp_path / f"codex-home-{len(made)}", tmp_path / "work", base_url, model, websocket
        )
        made.append(codex)
        return codex

    yield make
    for codex in made:
        codex.stop_all()


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as f:
        yield f


def response_ids(server: Server) -> list[str]:
    """Every response the server holds, oldest first (Codex sends `store: false`)."""
    with sqlite3.connect(f"file:{server.db}?mode=ro", uri=True) as con:
        return [r[0] for r in con.execute("SELECT id FROM responses ORDER BY created_at")]


def turns(server: Server, websocket: bool) -> list[Any]:
    """The responses of Codex's turn, oldest first. Over WebSocket the first is Codex's
    warm-up (`generate: false`): completed at once, no output; it is checked and left out."""
    with server.client() as client:
        responses = [client.responses.retrieve(r) for r in response_ids(server)]
    if websocket:
        warmup = responses.pop(0)
        assert warmup.status == "completed" and warmup.output == [], warmup
        assert warmup.usage is None or warmup.usage.output_tokens == 0
    return responses


def explain(turn: Turn) -> str:
    return f"codex exit {turn.returncode}\nevents: {turn.events}\nstderr: {turn.stderr[-3000:]}"


def check_tool_turn(turn: Turn) -> None:
    """Codex ran the command the model called and ended the turn with a message."""
    assert turn.returncode == 0, explain(turn)
    assert turn.types[-1] == "turn.completed", explain(turn)
    assert "turn.failed" not in turn.types and "error" not in turn.types, explain(turn)
    [command] = turn.items("command_execution")
    assert MARKER in command["command"], command
    assert command["exit_code"] == 0 and MARKER in command["aggregated_output"], command
    assert turn.items("agent_message"), explain(turn)


def check_stored_tool_loop(server: Server, websocket: bool) -> list[Any]:
    """Two responses: a completed function call, then a completed message answering
    its output (the `function_call_output` Codex sent is among the second's input)."""
    first, second = turns(server, websocket)
    with server.client() as client:
        assert first.status == "completed" and second.status == "completed"
        [call] = [i for i in first.output if i.type == "function_call"]
        assert call.name == "exec_command" and json.loads(call.arguments)["cmd"] == COMMAND
        inputs = list(client.responses.input_items.list(second.id, order="asc"))
        [output] = [i for i in inputs if i.type == "function_call_output"]
        assert output.call_id == call.call_id and MARKER in str(output.output)
        assert [i.type for i in second.output][-1] == "message"
        return [first, second]


# --- the pinned client ----------------------------------------------------------------


def test_the_pinned_codex_is_installed() -> None:
    out = subprocess.run(
        [str(codex_binary()), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert out.strip() == f"codex-cli {CODEX_VERSION}"


# --- (a) the scripted engine calls exec_command --------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_scripted_tool_loop(make_server: Any, codex_at: Any, transport: str) -> None:
    server: Server = make_server("--scripted-rate", "0", "--scripted-length", "12")
    codex: Codex = codex_at(server.base_url, "scripted", transport == "websocket")
    turn = codex.run(f"{call_directive('exec_command', {'cmd': COMMAND})} run it")
    check_tool_turn(turn)
    first, second = check_stored_tool_loop(server, codex.websocket)
    for response in (first, second):
        assert response.usage.output_tokens == server.trace(response.id)["produced"]


# --- (b) the same through a chat-completions upstream -------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_chat_upstream_tool_loop(
    make_server: Any, fake: FakeUpstream, codex_at: Any, transport: str
) -> None:
    arguments = json.dumps({"cmd": COMMAND})
    fake.call_arguments = [arguments[:9], arguments[9:20], arguments[20:]]
    server: Server = make_server("--upstream", f"fake={fake.url}", engine="none")
    codex: Codex = codex_at(server.base_url, "fake", transport == "websocket")
    turn = codex.run("CALL=exec_command run it")
    check_tool_turn(turn)
    [message] = turn.items("agent_message")
    assert message["text"].startswith("The result is") and MARKER in message["text"]
    check_stored_tool_loop(server, codex.websocket)
    first, second = (c.body for c in fake.calls)
    assert "exec_command" in {t["function"]["name"] for t in first["tools"]}
    assert second["messages"][-1]["role"] == "tool"
    assert second["messages"][-2]["tool_calls"][0]["function"]["arguments"] == arguments


# --- (c) the embedded model -------------------------------------------------------------------


@pytest.mark.timeout(600)  # ~7,300 prompt tokens a request, on CPU
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_embedded_model_takes_codex_first_request(
    make_server: Any, codex_at: Any, transport: str
) -> None:
    server: Server = make_server(engine="local")
    with server.client() as client:
        model = client.models.list().data[0].id
    codex: Codex = codex_at(server.base_url, model, transport == "websocket")
    turn = codex.run("Say hello in one short sentence.", timeout=540)
    assert turn.returncode == 0, explain(turn)
    assert turn.types[-1] == "turn.completed", explain(turn)
    responses = turns(server, codex.websocket)
    assert responses and all(r.status == "completed" for r in responses), responses
    assert responses[0].usage.input_tokens > 2_000  # Codex's whole prompt was read


# --- (d) SIGINT to Codex mid-turn -------------------------------------------------------------


def interrupt(proc: subprocess.Popen[str], ready: Any, what: str) -> tuple[float, str]:
    """Wait until `ready()`, SIGINT Codex, wait for it to exit: (exit time, stdout)."""
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        wait_for(ready, timeout=60, what=what)
    finally:
        proc.send_signal(signal.SIGINT)
    proc.wait(30)
    exited = time.time()
    reader.join(10)
    return exited, "".join(out)


def final(server: Server, rid: str) -> Any:
    with server.client() as client:
        return wait_for(
            lambda: (
                (r := client.responses.retrieve(rid)).status not in ("queued", "in_progress") and r
            ),
            timeout=30,
            what="a terminal status",
        )


def check_cancelled(server: Server, response: Any, out: str) -> int:
    """The response ended `cancelled`, its log with `response.failed`, and its usage
    counts exactly the tokens its log holds: that count."""
    assert response.status == "cancelled", (response, out)
    events = raw_events(server, response.id)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "cancelled"
    deltas = sum(e["type"] == "response.output_text.delta" for e in events)
    assert response.usage.output_tokens == deltas
    assert events[-1]["response"]["usage"]["output_tokens"] == deltas
    return deltas


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigint_cancels_the_scripted_run(make_server: Any, codex_at: Any, transport: str) -> None:
    rate = 20.0
    server: Server = make_server("--scripted-rate", str(rate), "--scripted-length", "2000")
    codex: Codex = codex_at(server.base_url, "scripted", transport == "websocket")
    proc = codex.start("Tell me a long story.")

    def producing() -> bool:
        ids = response_ids(server)[codex.websocket :]  # after the warm-up
        try:
            return bool(ids) and int(server.trace(ids[0])["produced"]) >= 5
        except httpx.HTTPStatusError:  # no trace before the run starts
            return False

    exited, out = interrupt(proc, producing, "tokens of Codex's turn")
    [rid] = response_ids(server)[codex.websocket :]
    response = final(server, rid)
    trace = server.trace(rid)
    assert check_cancelled(server, response, out) == trace["produced"]
    # Stopped within one token step of Codex leaving (its exit closed the connection).
    assert sum(t > exited for t in trace["token_times"]) <= 1, (trace, exited)
    assert trace["aborted_at"] is not None and not trace["finished"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigint_closes_the_chat_upstream(
    make_server: Any, fake: FakeUpstream, codex_at: Any, transport: str
) -> None:
    server: Server = make_server("--upstream", f"fake={fake.url}", engine="none")
    codex: Codex = codex_at(server.base_url, "fake", transport == "websocket")
    proc = codex.start("RATE=20 LENGTH=2000 Tell me a long story.")
    exited, out = interrupt(
        proc, lambda: fake.calls and len(fake.calls[0].generated) >= 5, "tokens from the upstream"
    )
    call = fake.calls[0]
    assert call.gone.wait(10), "the upstream connection stayed open"
    assert call.disconnected_at is not None
    assert call.generated_after(exited) <= 1, (call.generated, exited)
    [rid] = response_ids(server)[codex.websocket :]
    response = final(server, rid)
    check_cancelled(server, response, out)
