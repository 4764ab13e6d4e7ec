"""A real Redis Cluster of the test's own: `masters` masters (each with `replicas`
replicas) from Debian's `/usr/bin/redis-server` on free loopback ports in a temporary folder,
joined by `redis-cli --cluster create`. It never touches the machine's Redis on 6379.

Like `cluster.PrivateRedis` it keeps no data on disk (a restart comes back empty), but each
node keeps its `nodes.conf`, so `stop()` then `start()` is a restart of the same cluster.
A short `cluster-node-timeout` (1 s) makes a replica take over a failed master within a
few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import redis

from waiting import free_port, wait_for

NODE_TIMEOUT_MS = 1000


@dataclass
class Node:
    port: int
    bus: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def info(self) -> str:
        with self.client() as c:
            return c.execute_command("CLUSTER", "INFO").decode()  # type: ignore[no-any-return]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class PrivateRedisCluster:
    def __init__(self, tmp: Path | None = None, masters: int = 3, replicas: int = 0) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        if not Path(exe).exists() or not Path(cli).exists():
            raise RuntimeError("redis-server / redis-cli not installed (Debian redis-server)")
        self.exe, self.cli = exe, cli
        self.tmp = Path(tempfile.mkdtemp(prefix="tether-rc-", dir=tmp))
        self.masters, self.replicas = masters, replicas
        self.nodes: list[Node] = []
        for i in range(masters * (1 + replicas)):
            d = self.tmp / f"n{i}"
            d.mkdir()
            self.nodes.append(Node(free_port(), free_port(), d))
        self.created = False

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.masters])
        return f"redis+cluster://{seeds}"

    def _spawn(self, node: Node) -> None:
        node.proc = subprocess.Popen(
            [
                self.exe,
                "--port", str(node.port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-port", str(node.bus),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # A replica always may take over, however long it was cut off.
                "--cluster-replica-validity-factor", "0",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(node.dir),
            ],
            stdout=(node.dir / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def start(self) -> None:
        for node in self.nodes:
            if not node.alive():
                self._spawn(node)
        for node in self.nodes:
            wait_for(lambda node=node: _pings(node), 10, f"redis-server :{node.port}")
        if not self.created:
            subprocess.run(
                [
                    self.cli,
                    "--cluster", "create",
                    *(f"127.0.0.1:{n.port}" for n in self.nodes),
                    "--cluster-replicas", str(self.replicas),
                    "--cluster-yes",
                ],
                check=True,
                stdout=(self.tmp / "create.log").open("ab"),
                stderr=subprocess.STDOUT,
                timeout=60,
            )  # fmt: skip
            self.created = True
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        """Every live node says `cluster_state:ok` and sees the same live masters own
        every slot."""
        alive = {n.port for n in self.nodes if n.alive()}

        def ok() -> bool:
            try:
                live = [n for n in self.nodes if n.alive()]
                if not all("cluster_state:ok" in n.info() for n in live):
                    return False
                views = {frozenset(self._owners(n)) for n in live}
                return len(views) == 1 and next(iter(views)) <= alive
            except redis.RedisError:
                return False

        wait_for(ok, timeout, "the Redis Cluster to be ok")

    def _owners(self, node: Node) -> set[int]:
        """The ports of the masters that own slots, as `node` sees them."""
        with node.client() as c:
            return {int(r[2][1]) for r in c.execute_command("CLUSTER", "SLOTS")}

    def master_ports(self) -> set[int]:
        return self._owners(next(n for n in self.nodes if n.alive()))

    def node_of(self, key: str) -> Node:
        """The master that owns `key`'s slot now."""
        live = next(n for n in self.nodes if n.alive())
        with live.client() as c:
            slot = c.execute_command("CLUSTER", "KEYSLOT", key)
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = master[1]
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(key)

    def kill(self, node: Node) -> None:
        if node.proc is not None:
            node.proc.kill()
            node.proc.wait()
            node.proc = None

    def stop(self) -> None:
        for node in self.nodes:
            self.kill(node)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _pings(node: Node) -> bool:
    try:
        with node.client() as c:
            return bool(c.ping())
    except redis.RedisError:
        return False


def wait_failover(cluster: PrivateRedisCluster, dead: Node, timeout: float = 30) -> None:
    """Wait until a replica took over `dead`'s slots and the cluster is ok again."""
    assert not dead.alive()
    cluster.wait_ok(timeout)  # (every slot's owner must be alive: `dead` is not)


_shared: PrivateRedisCluster | None = None


def shared_cluster() -> PrivateRedisCluster:
    """One 3-master cluster for the whole test run (tests keep apart by key prefix),
    started on first use and removed at exit. Tests that stop or break a cluster make
    their own."""
    global _shared
    if _shared is None:
        import atexit

        cluster = PrivateRedisCluster()
        try:
            cluster.start()
        except BaseException:
            cluster.cleanup()
            raise
        atexit.register(cluster.cleanup)
        _shared = cluster
    return _shared
