"""Webhooks (docs/webhooks.md): what the outbox costs the runs, and how soon an event
arrives after its response ended.

Four rounds on the embedded store, scripted engine at full speed, `--responses` background
responses created by `--clients` concurrent clients, without any webhook endpoint and with
one (a threaded HTTP receiver on loopback answering 200); first as fast as the clients go
(a burst: the backlog), then at a steady `--pace` of creates per second (the latency).
Per round: responses ended per second, the server's CPU per response, and with the
endpoint, from each response's `finished_at` (as the server stored it) to the arrival of
its event at the receiver: p50 / p99 / max, and duplicates. The default
`webhook_poll` (0.5 s) is kept: a latency well below it is the sender being woken by the
terminal transition, not its poll.

    PYTHONPATH=src python bench/webhooks.py [--responses 400] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from _report import Chart, Transcript, progress, save
from _server import (
    Server,
    _env,
    cpu_seconds,
    free_port,
    machine,
    percentile,
    table,
    tether_cmd,
)


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.arrivals: dict[str, list[tuple[float, str]]] = {}  # response id -> (time, evt)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver

            def do_POST(self) -> None:
                event = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with receiver.lock:
                    receiver.arrivals.setdefault(event["data"]["id"], []).append(
                        (time.time(), event["id"])
                    )
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self) -> int:
        with self.lock:
            return len(self.arrivals)


def one_round(
    n: int, clients: int, receiver: Receiver | None, pace: float = 0.0, bar: Any = None
) -> dict[str, Any]:
    """`pace`: responses created per second (0: as fast as the clients go); `bar` counts
    the creates."""
    srv = Server(tether_cmd(rate=0, length=20), name="tether")
    db = srv.workdir / "bench.db"
    if receiver is not None:
        subprocess.run(
            [sys.executable, "-m", "tether", "webhooks", "add", f"http://127.0.0.1:{receiver.port}/h",
             "--events", "response.completed", "--db", str(db)],
            check=True, capture_output=True, cwd=srv.workdir, env=_env(),
        )  # fmt: skip
    srv.start()
    try:
        with httpx.Client(timeout=30) as http:
            began, cpu = time.monotonic(), cpu_seconds(srv.pid)

            def create(i: int) -> str:
                if pace:
                    time.sleep(max(0.0, began + i / pace - time.monotonic()))
                r = http.post(
                    f"{srv.base_url}/responses",
                    json={"model": "scripted", "input": f"n{i}", "background": True},
                )
                r.raise_for_status()
                if bar is not None:
                    bar.update(1)
                return str(r.json()["id"])

            with ThreadPoolExecutor(clients) as pool:
                rids = list(pool.map(create, range(n)))
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            while (
                con.execute("SELECT count(*) FROM responses WHERE status = 'completed'").fetchone()[
                    0
                ]
                < n
            ):
                time.sleep(0.01)  # the server has no push API for "all done"
            ended = time.monotonic() - began
            result: dict[str, Any] = {"responses/s": f"{n / ended:.0f}"}
            if receiver is None:
                result["server CPU ms/response"] = f"{(cpu_seconds(srv.pid) - cpu) * 1000 / n:.2f}"
                return result
            deadline = time.monotonic() + 60
            while receiver.count() < n and time.monotonic() < deadline:
                time.sleep(0.01)
            finished = dict(con.execute("SELECT id, finished_at FROM responses").fetchall())
            lags = [
                (receiver.arrivals[rid][0][0] - finished[rid]) * 1000
                for rid in rids
                if rid in receiver.arrivals
            ]
            lags.sort()
            result["server CPU ms/response"] = f"{(cpu_seconds(srv.pid) - cpu) * 1000 / n:.2f}"
            result.update(
                {
                    "delivered": f"{len(lags)}/{n}",
                    "duplicates": sum(len(v) - 1 for v in receiver.arrivals.values()),
                    "lag p50 ms": f"{percentile(lags, 50):.1f}",
                    "lag p99 ms": f"{percentile(lags, 99):.1f}",
                    "lag max ms": f"{lags[-1]:.1f}",
                }
            )
            return result
    finally:
        srv.stop()
        srv.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--responses", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pace", type=float, default=50.0, help="third round's creates/s")
    args = parser.parse_args()
    with Transcript() as printed:
        rows = measure(args)
    save("webhooks", printed.text, *charts(rows))


def charts(rows: list[dict[str, Any]]) -> list[Chart]:
    """Responses/s and CPU per response per round; the delivery lag with the endpoint."""
    names = [str(r["round"]).replace(", ", ",\n") for r in rows]
    hooked = [r for r in rows if "lag p50 ms" in r]
    return [
        Chart(
            "responses ended per second",
            "responses/s",
            names,
            {"responses/s": [float(r["responses/s"]) for r in rows]},
        ),
        Chart(
            "server CPU per response",
            "ms",
            names,
            {"CPU ms": [float(r["server CPU ms/response"]) for r in rows]},
        ),
        Chart(
            "response end → webhook event received",
            "ms",
            [str(r["round"]).replace("one endpoint, ", "") for r in hooked],
            {stat: [float(r[f"lag {stat} ms"]) for r in hooked] for stat in ("p50", "p99", "max")},
            marks={"webhook_poll 500 ms": 500.0},
        ),
    ]


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    print(machine())
    print(f"{args.responses} background responses, {args.clients} clients, scripted rate 0\n")
    rows = []
    receiver = Receiver()
    bar = progress(total=4 * args.responses, desc="responses created", unit="resp")
    for pace in (0.0, args.pace):
        label = f", {pace:g} responses/s" if pace else ", burst"
        for hooked in (None, receiver):
            receiver.arrivals.clear()
            result = one_round(args.responses, args.clients, hooked, pace, bar)
            rows.append({"round": ("one endpoint" if hooked else "no endpoint") + label, **result})
    bar.close()
    receiver.server.shutdown()
    columns = ["round", "responses/s", "server CPU ms/response", "delivered", "duplicates",
               "lag p50 ms", "lag p99 ms", "lag max ms"]  # fmt: skip
    print(table(columns, [[r.get(c, "-") for c in columns] for r in rows]))
    return rows


if __name__ == "__main__":
    main()
