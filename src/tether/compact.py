"""Compaction (`POST /v1/responses/compact`): a conversation packed into one opaque item.

tether does not summarize: engines differ, and a summary would lose what a later turn may
need. A compaction item carries the whole conversation (the turns a run would be given)
as a signed token, so the window a client keeps is one item whatever the conversation's
length, and a later `POST /v1/responses` with that item in `input` sees exactly the
conversation that was compacted, in order.

The token is `tc1.<base64url(orjson(turns))>.<base64url(HMAC-SHA256)>`. The signature
detects corruption and tampering (a changed token is refused with 400); it is not
secrecy: the content is the client's own conversation, which it already holds. The key
is per install: a `<db>.key` file beside the SQLite database, created on first start;
scaled out (PostgreSQL), the processes share no file, so the key is derived from the
database URL, which every process of one install shares.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Any

import orjson

from tether import turns as codec
from tether.turns import Message

VERSION = "tc1"
_key = secrets.token_bytes(32)  # replaced by `configure` in a server (tests of parsing only)


def configure(db: str) -> None:
    """Set this process's signing key for the install whose database is `db`."""
    global _key
    if db.startswith(("postgresql://", "postgres://")):
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


def _sign(payload: str) -> str:
    return _b64(hmac.new(_key, f"{VERSION}.{payload}".encode(), hashlib.sha256).digest())


def seal(turns: list[dict[str, Any]]) -> str:
    """A token carrying `turns` (encoded: `tether.turns.encode`)."""
    payload = _b64(orjson.dumps(turns))
    return f"{VERSION}.{payload}.{_sign(payload)}"


def unseal(token: str) -> list[dict[str, Any]]:
    """The turns a token carries, encoded (`tether.turns.decode` reads them); ValueError
    if it is not one this install sealed."""
    version, _, rest = token.partition(".")
    payload, _, signature = rest.partition(".")
    if version != VERSION or not payload or not signature:
        raise ValueError("not a compaction token of this server")
    if not hmac.compare_digest(signature, _sign(payload)):
        raise ValueError("the compaction token was altered or sealed by another server")
    try:
        turns = orjson.loads(_unb64(payload))
    except (binascii.Error, ValueError):
        raise ValueError("the compaction token is corrupt") from None
    if not isinstance(turns, list):
        raise ValueError("the compaction token is corrupt")
    return turns


def estimate_tokens(turns: list[Message]) -> int:
    """About 4 characters a token: compaction runs no tokenizer (no engine is involved)."""
    return sum(len(t.text) for t in turns) // 4 + len(turns)


def resource(turns: list[Message], usage: dict[str, Any]) -> dict[str, Any]:
    """The `CompactResource`: one compaction item holding the whole conversation.

    Only the compaction item, not the user messages beside it as OpenAI's window has:
    the SDK types `output` as output items (assistant messages only), and one item
    replays the conversation without duplicating any of it."""
    item = {
        "id": f"cmp_{secrets.token_hex(24)}",
        "type": "compaction",
        "encrypted_content": seal(codec.encode(turns)),
    }
    return {
        "id": f"resp_{secrets.token_hex(24)}",
        "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [item],
        "usage": usage,
    }
