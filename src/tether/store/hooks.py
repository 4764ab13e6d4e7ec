"""The store's webhook part: endpoints, the outbox of deliveries, and the `Webhooks`
protocol both stores implement (`sqlite_hooks.py`, `pg_hooks.py`).

The outbox (docs/webhooks.md): a response's terminal transition inserts one delivery row
per endpoint of its tenant subscribed to the event type, in the transaction that makes the
response terminal (`sqlite.py`'s `_transition`, `pg_sql.FINISH`). So a terminal response
never lacks its webhook, across any crash; the sender (`tether.hooks_sender`) then
delivers each row at least once: it claims due rows with a lease (one process at a time
per row), posts them, and records the attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

# Terminal statuses and the webhook event each one sends (OpenAI's names).
EVENT_TYPES = tuple(
    f"response.{status}" for status in ("completed", "failed", "incomplete", "cancelled")
)

DELIVERY_COLUMNS = (
    "id, endpoint_id, tenant, response_id, type, created_at, attempts, next_at, "
    "delivered_at, last_status, last_error, gave_up"
)
ENDPOINT_COLUMNS = "id, tenant, url, events, secret, created_at"

# The outbox insert, SQLite flavour (`sqlite.py`'s `_transition`): ? status, ? now,
# ? response id, ? status. The event id is made here: it is the `webhook-id` every
# attempt of the delivery carries.
SQLITE_OUTBOX = """
INSERT INTO webhook_deliveries (id, endpoint_id, tenant, response_id, type, created_at,
                                next_at)
SELECT 'evt_' || lower(hex(randomblob(16))), e.id, e.tenant, r.id, 'response.' || ?1, ?2, ?2
FROM webhook_endpoints e JOIN responses r ON e.tenant = r.tenant
WHERE r.id = ?3 AND EXISTS (SELECT 1 FROM json_each(e.events) WHERE value = 'response.' || ?1)
"""


@dataclass(slots=True)
class Endpoint:
    """Where a tenant's webhooks go. `secret` is `whsec_` + base64 (Standard Webhooks)."""

    id: str
    tenant: str
    url: str
    events: list[str]
    secret: str
    created_at: float


@dataclass(slots=True)
class Delivery:
    """One event for one endpoint, and how its delivery went. `id` is the event id, the
    `webhook-id` header of every attempt. A claimed delivery also carries its endpoint's
    `url` and `secret`."""

    id: str
    endpoint_id: str
    tenant: str
    response_id: str
    type: str
    created_at: float
    attempts: int = 0
    next_at: float = 0.0
    delivered_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    gave_up: bool = False
    url: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)
    old_secret: str = field(default="", repr=False)  # a rotated-out one still valid

    def state(self) -> str:
        if self.delivered_at is not None:
            return "delivered"
        return "gave_up" if self.gave_up else "pending"

    def row(self) -> dict[str, Any]:
        """For `tether webhooks deliveries`: no secret."""
        return {
            "id": self.id,
            "endpoint_id": self.endpoint_id,
            "tenant": self.tenant,
            "response_id": self.response_id,
            "type": self.type,
            "state": self.state(),
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "next_at": None if self.state() != "pending" else self.next_at,
            "delivered_at": self.delivered_at,
        }


def to_endpoint(row: Any) -> Endpoint:
    import json

    return Endpoint(row[0], row[1], row[2], json.loads(row[3]), row[4], float(row[5]))


def to_delivery(row: Any) -> Delivery:
    d = Delivery(*row[:12])
    d.gave_up = bool(d.gave_up)
    if len(row) > 12:
        d.url, d.secret, d.old_secret = row[12], row[13], row[14] or ""
    return d


class Webhooks(Protocol):
    """Endpoints (what the operator configures, `tether webhooks`) and the deliveries
    the outbox holds. Every method may raise `StoreUnavailable` (and SQLite's writes
    `StoreFull`)."""

    #: called after a terminal transition of this process committed (maybe with
    #: deliveries): the sender looks at once instead of at its next poll
    wake: Callable[[], None]

    async def add_endpoint(self, endpoint: Endpoint) -> None: ...

    async def endpoints(self, tenant: str | None = None) -> list[Endpoint]:
        """Endpoints (of `tenant`, or all), oldest first."""
        ...

    async def remove_endpoint(self, endpoint_id: str) -> bool:
        """Remove an endpoint and its deliveries (pending ones are never sent)."""
        ...

    async def rotate_secret(
        self, endpoint_id: str, secret: str, keep_old_until: float | None = None
    ) -> bool:
        """Sign with `secret` from the next attempt on (pending deliveries included);
        with the old secret too until `keep_old_until` (None: the old one is void now)."""
        ...

    async def claim(
        self,
        owner: str,
        now: float,
        lease_until: float,
        per_endpoint: int,
        limit: int,
        busy: Collection[str] = (),
    ) -> list[Delivery]:
        """Lease up to `limit` due deliveries to `owner` until `lease_until`: at most
        `per_endpoint` of one endpoint, none of the endpoints in `busy`. A delivery is due
        when undelivered, not given up, its `next_at` passed and no lease holds it. Each
        claimed delivery carries its endpoint's url and secret(s)."""
        ...

    async def record(
        self,
        delivery_id: str,
        owner: str,
        now: float,
        status: int | None,
        error: str | None,
        next_at: float | None,
    ) -> None:
        """Record one attempt. Delivered (a 2xx `status`) is recorded whoever holds the
        lease now (the receiver has it); a failure only by the lease's holder: it is
        tried again at `next_at`, or never (`next_at=None`: given up)."""
        ...

    async def deliveries(self, endpoint_id: str | None = None, limit: int = 100) -> list[Delivery]:
        """The newest deliveries (of one endpoint, or all), newest first."""
        ...

    async def pending(self) -> int:
        """Deliveries neither delivered nor given up."""
        ...

    async def purge(self, before: float) -> int:
        """Forget deliveries made before `before` that are over (delivered or given up):
        how many."""
        ...
