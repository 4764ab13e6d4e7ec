"""A loopback TCP proxy that cuts connections at random points (client tests, stdlib only).

Each accepted connection is relayed to `upstream_port`; the proxy cuts it (both sockets
shut down and closed) after a random number of bytes sent to the client, or after a random
time, drawn from a seeded `random.Random`. After `max_cuts` cuts it relays faithfully.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading


class CuttingProxy:
    def __init__(
        self,
        upstream_port: int,
        rng: random.Random,
        *,
        cut_bytes: tuple[int, int] | None = None,
        cut_seconds: tuple[float, float] | None = None,
        max_cuts: int = 30,
    ) -> None:
        self.upstream_port = upstream_port
        self.rng = rng
        self.cut_bytes = cut_bytes
        self.cut_seconds = cut_seconds
        self.max_cuts = max_cuts
        self.cuts = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        _kill(self._listener)  # shutdown() wakes the blocked accept(); close() alone would not
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _kill(sock)
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                _kill(client)
                continue
            with self._lock:
                self.connections += 1
                self._sockets |= {client, upstream}
                cutting = self.cuts < self.max_cuts
                budget = self.rng.randint(*self.cut_bytes) if cutting and self.cut_bytes else None
                seconds = (
                    self.rng.uniform(*self.cut_seconds) if cutting and self.cut_seconds else None
                )
            pair = (client, upstream)
            if seconds is not None:
                timer = threading.Timer(seconds, self._cut, pair)
                timer.daemon = True
                timer.start()
            threading.Thread(
                target=self._pump, args=(client, upstream, None, pair), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, budget, pair), daemon=True
            ).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        budget: int | None,
        pair: tuple[socket.socket, socket.socket],
    ) -> None:
        downstream = dst is pair[0]
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if budget is not None and len(data) >= budget:
                    dst.sendall(data[:budget])
                    self._cut(*pair)
                    return
                if budget is not None:
                    budget -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        if downstream:  # the server finished (or the connection broke): not a cut
            with self._lock:
                self._sockets -= set(pair)
            for sock in pair:
                _kill(sock)
        else:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _cut(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            if client not in self._sockets:
                return  # already cut or finished
            self._sockets -= {client, upstream}
            self.cuts += 1
        _kill(client)
        _kill(upstream)


def _kill(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
