"""Who is asking: API keys, tenants, and the ASGI middleware that names the caller.

Every route reads the caller with `principal(conn)`. Without keys configured everyone is
the tenant "default" with no key id (and the CLI binds only to loopback, docs/contract.md §7).
With keys, a request without a valid, unrevoked key is answered 401 before any route
runs, and every response belongs to its key's tenant.

Keys live in a JSON file (`--keys-file`) that stores only SHA-256 hashes of the secrets;
secrets are 256-bit random, so a fast hash is enough (nothing to brute-force). The file
is read again whenever it changes, so `tether keys revoke` takes effect on a running
server at its next request. Keys may also come from the environment
(`TETHER_API_KEYS="tenant:secret,..."`), hashed as they are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

SECRET_PREFIX = "sk-tether-"
# Reachable without a key: the playground's page and files (it asks for a key itself),
# liveness, and the Prometheus scrape.
OPEN_PATHS = ("/health", "/metrics", "/playground/")


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    key_id: str | None  # the API key's public id (never the secret); None without keys


ANONYMOUS = Principal("default", None)


def principal(conn: HTTPConnection) -> Principal:
    """The caller of this request or WebSocket, as named by the auth middleware."""
    found: Principal = conn.scope.get("tether.principal", ANONYMOUS)
    return found


def digest(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


@dataclass(slots=True)
class Key:
    id: str
    tenant: str
    name: str
    hash: str
    created_at: int
    revoked_at: int | None = None


# --- the keys file -------------------------------------------------------------------


def load_keys(path: Path) -> list[Key]:
    """The keys in `path` (none if it does not exist yet)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return [Key(**k) for k in raw.get("keys", [])]


def save_keys(path: Path, keys: list[Key]) -> None:
    """Write atomically (a reader never sees half a file) and readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"keys": [asdict(k) for k in keys]}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def create_key(path: Path, tenant: str, name: str = "") -> tuple[Key, str]:
    """Add a key for `tenant`: the stored key and its secret (shown once, never stored)."""
    if not tenant or any(c.isspace() for c in tenant):
        raise ValueError("a tenant is a non-empty name without spaces")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = Key(
        id="key_" + secrets.token_hex(8),
        tenant=tenant,
        name=name,
        hash=digest(secret),
        created_at=int(time.time()),
    )
    save_keys(path, [*load_keys(path), key])
    return key, secret


def revoke_key(path: Path, key_id: str) -> Key:
    """Mark a key revoked (kept, so its usage stays attributable). KeyError if unknown."""
    keys = load_keys(path)
    for key in keys:
        if key.id == key_id:
            if key.revoked_at is None:
                key.revoked_at = int(time.time())
                save_keys(path, keys)
            return key
    raise KeyError(key_id)


def env_keys(spec: str) -> list[Key]:
    """Keys from `tenant:secret,tenant:secret` (e.g. TETHER_API_KEYS); ids derive from
    the hash, so they are stable across restarts and replicas."""
    keys = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        tenant, sep, secret = part.partition(":")
        if not sep or not tenant or not secret:
            raise ValueError("TETHER_API_KEYS entries are 'tenant:secret'")
        h = digest(secret)
        keys.append(Key(id="key_env_" + h[7:19], tenant=tenant, name="env", hash=h, created_at=0))
    return keys


class KeyRing:
    """The configured keys; `enabled` is False when none are configured (no file, no env).
    A configured but empty or all-revoked file still enables auth: it refuses everyone."""

    def __init__(self, path: Path | None = None, env: str | None = None) -> None:
        self.path = path
        self._env = env_keys(env) if env else []
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, Key] = {}
        self.enabled = path is not None or bool(self._env)
        self._reload()

    def _reload(self) -> None:
        stamp = None
        if self.path is not None:
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = (0, 0)
            if stamp == self._stamp:
                return
        keys = [*self._env, *(load_keys(self.path) if self.path is not None else [])]
        self._by_hash = {k.hash: k for k in keys}
        self._stamp = stamp

    def lookup(self, secret: str) -> Key | None:
        self._reload()  # one stat(); a revoke is seen at the next request
        return self._by_hash.get(digest(secret))

    def keys(self) -> list[Key]:
        self._reload()
        return list(self._by_hash.values())

    def tenant_of(self, key_id: str) -> str | None:
        return next((k.tenant for k in self.keys() if k.id == key_id), None)


# --- the middleware ------------------------------------------------------------------


class AuthMiddleware:
    """Names the caller of each request and WebSocket (`scope["tether.principal"]`), or
    answers 401 in OpenAI's error shape. Pure ASGI, so streams pass through untouched."""

    def __init__(self, app: ASGIApp, keyring: KeyRing) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keyring.enabled:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/" or path.startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        problem, key = self._check(scope)
        if key is None:
            await _refuse(scope, receive, send, problem)
            return
        scope["tether.principal"] = Principal(key.tenant, key.id)
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> tuple[str, Key | None]:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None:
            return (
                "You didn't provide an API key. Send it in the Authorization header "
                "(Authorization: Bearer YOUR_KEY)."
            ), None
        scheme, _, secret = header.decode("latin-1").partition(" ")
        key = self.keyring.lookup(secret.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            return "Incorrect API key provided.", None
        if key.revoked_at is not None:
            return "This API key has been revoked.", None
        return "", key


async def _refuse(scope: Scope, receive: Receive, send: Send, message: str) -> None:
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="tether"'),
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    # A WebSocket handshake: answer 401 over HTTP where the server supports it (uvicorn
    # does), else refuse the handshake (the client sees 403).
    if "websocket.http.response" in scope.get("extensions", {}):
        await receive()  # the handshake's websocket.connect comes first
        await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


def bind_is_safe(host: str, keyring: KeyRing) -> bool:
    """docs/contract.md §7: without keys, serve only on loopback."""
    return keyring.enabled or host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def describe(key: Key) -> dict[str, Any]:
    """A key as listed (no hash)."""
    return {
        "id": key.id,
        "tenant": key.tenant,
        "name": key.name,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    }
