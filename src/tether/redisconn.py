"""Redis for scale-out: one server or a Redis Cluster, the key layout on it, and a
subscriber that works on both.

`--redis` takes `redis://` / `rediss://` (one server: redis-py's own URL, passed through
unchanged) or `redis+cluster://[user[:password]@]host:port[,host:port...][/][?shards=N]`
(`rediss+cluster://` for TLS): a Redis Cluster, found from any of the listed nodes
(redis-py's `RedisCluster.from_url` takes one node and no scheme of its own, so tether
names the cluster in the scheme and lists seed nodes in the host part).

The layout (`Layout`) says where every key and channel lives. One server keeps the names
tether always used (`{prefix}:runs`, `{prefix}:log:{id}`, ...), so an upgrade finds its
queue. On a cluster:

- the keys of one response share its hash slot: the live log is `{prefix}:log:{resp_id}`
  (braces included: a hash tag on the response id);
- the run queue, the deferred class, cancel signals, worker wake-ups and live-log wake-ups
  are split into `shards` (default 8) by a hash of the response id; shard k's keys and
  channels share one hash tag, `{prefix:qJ}`, with J chosen so that the shards' slots spread
  evenly over the slot space (so over the masters of a cluster made with even slot ranges);
- channels are sharded pub/sub (`SPUBLISH` / `SSUBSCRIBE`, Redis 7): a message goes to the
  master owning the channel's slot (and its replicas), not to every node of the cluster as a
  plain `PUBLISH` does.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import anyio
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisClusterException, RedisError

# What a Redis problem raises: redis-py's errors (a cluster's "no node reachable" and
# "slot not covered" are not `RedisError`s), and the socket's.
ERRORS = (RedisError, RedisClusterException, OSError)
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
DEFAULT_SHARDS = 8
Client = aioredis.Redis | RedisCluster


@dataclass(frozen=True)
class Target:
    """What a `--redis` URL names."""

    url: str
    cluster: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    shards: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # username, password, ssl


def parse(url: str) -> Target:
    """The `Target` of a `--redis` URL; ValueError naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"--redis {url!r}: expected redis://, rediss:// or redis+cluster://")
    if scheme not in CLUSTER_SCHEMES:
        return Target(url)  # redis-py reads it (and says what is wrong with it)
    rest, _, query = rest.partition("?")
    hosts, _, path = rest.partition("/")
    options: dict[str, Any] = {"ssl": True} if CLUSTER_SCHEMES[scheme] else {}
    if "@" in hosts:
        auth, _, hosts = hosts.rpartition("@")
        user, colon, password = auth.partition(":")
        if colon:
            options["password"] = unquote(password)
        if user:
            options["username"] = unquote(user)
    if path not in ("", "0"):
        raise ValueError(f"--redis {url!r}: a Redis Cluster has only database 0")
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"--redis {url!r}: expected host:port[,host:port...], got {item!r}")
        nodes.append((host.strip("[]"), int(port)))
    shards = DEFAULT_SHARDS
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name != "shards" or not values[-1].isdigit() or int(values[-1]) < 1:
            raise ValueError(f"--redis {url!r}: the one option is shards=N (N >= 1)")
        shards = int(values[-1])
    return Target(url, True, tuple(nodes), shards, options)


def connect(target: Target, **options: Any) -> Client:
    """A client for `target`; `options` are redis-py's (timeouts, retry)."""
    if not target.cluster:
        return aioredis.Redis.from_url(target.url, **options)
    nodes = [ClusterNode(host, port) for host, port in target.nodes]
    return RedisCluster(startup_nodes=nodes, **target.options, **options)


class Layout:
    """The names of tether's keys and channels under `prefix` on `target`."""

    def __init__(self, prefix: str, target: Target) -> None:
        self.prefix = prefix
        self.cluster = target.cluster
        self.shards = target.shards
        if self.cluster and ("{" in prefix or "}" in prefix):
            raise ValueError("--redis-prefix: no braces on a Redis Cluster (they are hash tags)")
        # One tag per shard; on one server the names are those tether always used.
        self._tags = [_spread(prefix, k, self.shards) for k in range(self.shards)]

    def shard(self, response_id: str) -> int:
        return zlib.crc32(response_id.encode()) % self.shards if self.shards > 1 else 0

    def _name(self, k: int, what: str) -> str:
        return f"{{{self._tags[k]}}}:{what}" if self.cluster else f"{self.prefix}:{what}"

    def runs(self, k: int) -> str:
        return self._name(k, "runs")

    def later(self, k: int) -> str:
        return self._name(k, "later")

    def cancel(self, k: int) -> str:
        return self._name(k, "cancel")

    def ring(self, k: int) -> str:
        return self._name(k, "ring")

    def wake(self, k: int) -> str:
        return self._name(k, "wake")

    def log(self, response_id: str) -> str:
        if self.cluster:
            return f"{self.prefix}:log:{{{response_id}}}"
        return f"{self.prefix}:log:{response_id}"

    @property
    def publish(self) -> str:
        """The command that publishes on this layout's channels."""
        return "SPUBLISH" if self.cluster else "PUBLISH"


def _spread(prefix: str, k: int, shards: int) -> str:
    """The first tag `prefix:qJ` whose slot lies in the k-th of `shards` equal parts of the
    slot space."""
    for j in range(100_000):
        tag = f"{prefix}:q{j}"
        if key_slot(tag.encode()) * shards // REDIS_CLUSTER_HASH_SLOTS == k:
            return tag
    raise AssertionError("unreachable: CRC16 covers every part")  # pragma: no cover


# --- subscribing -----------------------------------------------------------------------

OnMessage = Callable[[str, bytes], None]
PING_EVERY = 1.0  # an idle subscription pings, so a silent (hung) node is noticed
DEAD_AFTER = 3.0  # no reply from a node for this long: the subscription is down


class Lost(RedisError):
    """A subscription ended: a node went silent, or its slot moved (failover)."""


async def subscribe(
    client: Client,
    target: Target,
    channels: list[str],
    on_message: OnMessage,
    on_ready: Callable[[], None],
    closing: Callable[[], bool],
    timeouts: dict[str, Any],
) -> None:
    """Deliver messages on `channels` to `on_message(channel, data)` until `closing()`;
    `on_ready()` once every channel is subscribed. Raises (a `RedisError`, an `OSError`,
    `TimeoutError`, in an ExceptionGroup) when any part of the subscription is lost: the
    caller subscribes again, and counts messages in between as missed.

    One connection per node: on a cluster, each master owning some of the channels, with
    `SSUBSCRIBE` (one per channel: a command's channels must share a slot); on one server,
    one `SUBSCRIBE`. Each node is read by a task of its own, so a quiet node never delays
    a busy one's messages."""
    groups: dict[tuple[str, int], list[str]] = {}
    if target.cluster:
        assert isinstance(client, RedisCluster)
        await client.initialize()
        for channel in channels:
            owner = client.get_node_from_key(channel)
            if owner is None:
                raise Lost(f"no master owns {channel!r}")
            groups.setdefault((owner.host, int(owner.port)), []).append(channel)
    else:
        groups[("", 0)] = channels
    pending = len(channels)

    def confirmed() -> None:
        nonlocal pending
        pending -= 1
        if pending == 0:
            on_ready()

    async def one(node: tuple[str, int], names: list[str]) -> None:
        own = None
        if target.cluster:
            # No retries of its own: a lost node must end this subscription now (the
            # caller subscribes again, to whichever master owns the slots then).
            options = {**target.options, **timeouts, "retry": Retry(NoBackoff(), 0)}
            own = aioredis.Redis(host=node[0], port=node[1], **options)
            pubsub = own.pubsub()
        else:
            assert isinstance(client, aioredis.Redis)
            pubsub = client.pubsub()
        try:
            await _listen(pubsub, names, target.cluster, on_message, confirmed, closing)
        finally:
            with anyio.move_on_after(1.0, shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                if own is not None:
                    await own.aclose()

    async with anyio.create_task_group() as tg:
        for node, names in groups.items():
            tg.start_soon(one, node, names)


async def _listen(
    pubsub: Any,
    names: list[str],
    sharded: bool,
    on_message: OnMessage,
    confirmed: Callable[[], None],
    closing: Callable[[], bool],
) -> None:
    if sharded:
        for name in names:
            await pubsub.ssubscribe(name)
    else:
        await pubsub.subscribe(*names)
    heard = pinged = time.monotonic()
    while not closing():
        message = await pubsub.get_message(timeout=PING_EVERY)
        now = time.monotonic()
        if message is not None:
            heard = now
            kind = message["type"]
            if kind in ("message", "smessage"):
                channel = message["channel"]
                on_message(
                    channel.decode() if isinstance(channel, bytes) else channel, message["data"]
                )
            elif kind in ("subscribe", "ssubscribe"):
                confirmed()
            elif kind == "sunsubscribe":
                # The server dropped us: the channel's slot moved to another node.
                raise Lost(f"shard channel {message['channel']!r} moved")
        elif now - heard > DEAD_AFTER:
            raise Lost("Redis subscription silent")
        if now - pinged > PING_EVERY and now - heard > PING_EVERY:
            await pubsub.ping()
            pinged = now


async def refresh(client: Client) -> None:
    """After a failure: on a cluster, learn the current masters (a failover may have
    promoted a replica) before subscribing again. Best effort."""
    if isinstance(client, RedisCluster):
        # A failure here shows again, and is logged, when subscribing fails.
        with contextlib.suppress(*ERRORS):
            await client.nodes_manager.initialize()
