"""Sealed tokens: JSON that tether hands a client and later reads back, authenticated
with the install's key.

Two kinds use it: compaction items (`tether.compact`, the conversation a compacted
window replays) and reasoning items' `encrypted_content` (`include:
["reasoning.encrypted_content"]`, the thinking a `store: false` client sends back). A
token is `<kind>.<base64url(orjson(value))>.<base64url(HMAC-SHA256)>`; the MAC covers the
kind, so a token of one kind is never accepted as the other.

Signed, not encrypted. The MAC detects corruption, tampering and tokens of another
install (refused with 400). Secrecy would add nothing: a compaction token carries the
client's own conversation, and a reasoning token carries thinking the same response
already shows in the item's `content` (tether does not hide a model's thinking the way
OpenAI does), so the client holds every byte either way. The field keeps OpenAI's name,
`encrypted_content`, because that is what clients send back.

The key is per install: a `<db>.key` file beside the SQLite database, created on first
start; scaled out (PostgreSQL), the processes share no file, so the key is derived from
the database URL, which every process of one install shares.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

import orjson

_key = secrets.token_bytes(32)  # replaced by `configure` in a server (tests of parsing only)


class Unsealed(ValueError):
    """A token this install did not seal, or one altered since."""


def configure(db: str) -> None:
    """Set this process's key for the install whose database is `db`."""
    global _key
    if db.startswith(("postgresql://", "postgres://")):
        # The historical derivation (compaction came first): tokens sealed by earlier
        # versions stay readable.
        _key = hashlib.sha256(b"tether-compaction\0" + db.encode()).digest()
        return
    path = Path(db).with_name(Path(db).name + ".key")
    if not path.exists():
        # Written whole, then linked into place: a process starting at the same moment
        # reads either no file or the whole key, and only one key ever wins.
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_bytes(32).hex())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    _key = bytes.fromhex(path.read_text().strip())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(kind: str, payload: str) -> str:
    return _b64(hmac.new(_key, f"{kind}.{payload}".encode(), hashlib.sha256).digest())


def seal(kind: str, value: Any) -> str:
    """A token of `kind` carrying `value` (anything orjson writes)."""
    payload = _b64(orjson.dumps(value))
    return f"{kind}.{payload}.{_mac(kind, payload)}"


def unseal(kind: str, token: str, what: str = "token") -> Any:
    """The value a token of `kind` carries; `Unsealed` (a ValueError naming `what`) if
    this install did not seal it or it was altered."""
    version, _, rest = token.partition(".")
    payload, _, signature = rest.partition(".")
    if version != kind or not payload or not signature:
        raise Unsealed(f"the {what} is not one this server sealed")
    if not hmac.compare_digest(signature, _mac(kind, payload)):
        raise Unsealed(f"the {what} was altered or sealed by another server")
    try:
        return orjson.loads(_unb64(payload))
    except (binascii.Error, ValueError):
        raise Unsealed(f"the {what} is corrupt") from None
