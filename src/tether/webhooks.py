"""Webhooks as OpenAI sends them: the event body, its Standard Webhooks signature, the
endpoint secrets, and which targets may receive them (docs/webhooks.md).

Signed exactly as OpenAI signs (the `openai` SDK's `webhooks.unwrap` verifies it): the
headers `webhook-id` (the event id), `webhook-timestamp` (Unix seconds of this attempt)
and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` keyed
by the secret's base64-decoded bytes after `whsec_`; after a rotation that keeps the old
secret for 24 hours, a second `v1,...` signature by it, space-separated: the SDK accepts
either). Every attempt of a delivery carries
the same id and body, and a fresh timestamp (receivers reject old ones as replays).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import orjson

from tether.store.hooks import EVENT_TYPES, Delivery


def new_secret() -> str:
    """A signing secret: `whsec_` + base64 of 32 random bytes (shown to the operator once)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_endpoint_id() -> str:
    return "we_" + secrets.token_hex(12)


def body(delivery: Delivery) -> bytes:
    """The event, as OpenAI's `response.*` webhook events are shaped: the same bytes on
    every attempt (they are derived from the delivery row alone)."""
    return orjson.dumps(
        {
            "id": delivery.id,
            "object": "event",
            "created_at": int(delivery.created_at),
            "type": delivery.type,
            "data": {"id": delivery.response_id},
        }
    )


def sign(secret: str, msg_id: str, timestamp: int, payload: bytes) -> str:
    """The `webhook-signature` header's value for one attempt."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, payload)
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(delivery: Delivery, payload: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        "content-type": "application/json",
        "user-agent": "tether-webhooks",
        "webhook-id": delivery.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(
            sign(secret, delivery.id, timestamp, payload)
            for secret in (delivery.secret, delivery.old_secret)
            if secret
        ),
    }


def parse_events(value: str) -> list[str]:
    """`--events response.completed,response.failed`: known types only (ValueError)."""
    events = [e.strip() for e in value.split(",") if e.strip()]
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown or not events:
        raise ValueError(
            f"unknown event types {unknown}; choose from {', '.join(EVENT_TYPES)}"
            if unknown
            else "name at least one event type"
        )
    return list(dict.fromkeys(events))


class TargetRefused(ValueError):
    """A webhook URL tether will not send to."""


def check_target(url: str, allowed_hosts: Iterable[str]) -> None:
    """Refuse a URL that is not http(s) to a loopback address or an operator-allowed host
    (`webhook_allowed_hosts`). Checked when an endpoint is added and before every attempt,
    so that neither a stored URL nor a changed setting lets tether be used to reach the
    network it sits in (SSRF). Redirects are never followed (`webhook_sender`)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a bad port
    except ValueError as exc:
        raise TargetRefused(f"{url!r} is not a URL: {exc}") from None
    del port
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"{url!r}: only http:// and https:// URLs with a host")
    host = parts.hostname.lower()
    if host in {h.lower().strip() for h in allowed_hosts}:
        return
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise TargetRefused(
        f"{host} is not loopback nor in webhook_allowed_hosts (TETHER_WEBHOOK_ALLOWED_HOSTS)"
    )
