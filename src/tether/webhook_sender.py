"""The webhook sender: a daemon of every process (`webhook_sender` setting) that delivers
the outbox (`store/hooks.py`), at least once.

Each round it claims due deliveries with a lease (so one process at a time holds each),
posts each in a task of its own, and records the attempt: delivered on a 2xx; otherwise
tried again after a delay that starts at `webhook_retry_first` and doubles (capped at
`webhook_retry_max_delay`, with up to 10% jitter so a receiver coming back is not hit by
every retry at once), until `webhook_retry_window` after the event, then given up. Every
attempt carries the same `webhook-id` and body, freshly signed.

It never delays runs: it has its own tasks, and the store calls it makes are the short
ones of the outbox. A slow or dead receiver holds at most `webhook_concurrency` attempts
(each bounded by `webhook_timeout`), and only its own endpoint's: the claim passes over an
endpoint whose attempts are all in flight. A process that dies mid-attempt leaves its
lease to expire; the delivery is then attempted again (maybe twice received: at least
once, never lost).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter

import anyio
import httpx

from tether import metrics
from tether.config import Settings
from tether.store.hooks import Delivery, Webhooks
from tether.webhooks import TargetRefused, body, check_target, headers

log = logging.getLogger("tether.webhooks")
BATCH = 64  # deliveries claimed at most per round
PENDING_EVERY = 2.0  # seconds between counts of pending deliveries (/metrics)
PURGE_EVERY = 60.0  # seconds between purges of deliveries over for `retention`
# After a wake-up, wait this long before claiming, so a burst of terminal transitions
# (or of finished attempts) is one claim, not one each: claims stay off the runs' way.
GATHER = 0.01
REPLY_READ = 64 * 1024  # bytes of a receiver's answer read at most


class Sender:
    def __init__(self, hooks: Webhooks, settings: Settings, owner: str) -> None:
        self.hooks = hooks
        self.settings = settings
        self.owner = owner
        self._inflight: Counter[str] = Counter()  # endpoint id -> attempts going on
        self._limits: dict[str, anyio.CapacityLimiter] = {}
        self._capped: set[str] = set()  # endpoints the last claims took all they could of
        self._woken = False
        self._wakeup: anyio.Event | None = None

    @property
    def lease(self) -> float:
        """Seconds a claim holds a delivery: its attempt, after waiting at most one
        attempt's time for its endpoint's limit, with room to record it."""
        return 3 * self.settings.webhook_timeout + 5.0

    def wake(self) -> None:
        """A terminal transition committed here, or an attempt ended: look for due
        deliveries now (after `GATHER`), not at the next poll."""
        self._woken = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(self) -> None:
        """Deliver until cancelled (the runner's daemon)."""
        self.hooks.wake = self.wake
        counted = purged = 0.0
        async with (
            httpx.AsyncClient(
                timeout=self.settings.webhook_timeout, follow_redirects=False, trust_env=False
            ) as client,
            anyio.create_task_group() as group,
        ):
            while True:
                self._woken = False
                claimed: list[Delivery] = []
                try:
                    claimed = await self._claim()
                    if time.monotonic() - counted > PENDING_EVERY:
                        counted = time.monotonic()
                        metrics.webhooks_pending(await self.hooks.pending())
                    if time.monotonic() - purged > PURGE_EVERY:
                        purged = time.monotonic()
                        await self.hooks.purge(time.time() - self.settings.retention)
                except Exception as exc:  # the store is out: try again next round
                    log.warning("claiming webhook deliveries failed: %s", exc)
                for delivery in claimed:
                    self._inflight[delivery.endpoint_id] += 1
                    group.start_soon(self._deliver, client, delivery)
                if len(claimed) < BATCH:
                    if not self._woken:
                        self._wakeup = anyio.Event()
                        with anyio.move_on_after(self.settings.webhook_poll):
                            await self._wakeup.wait()
                        self._wakeup = None
                    await anyio.sleep(GATHER)

    async def _claim(self) -> list[Delivery]:
        limit = self.settings.webhook_concurrency
        busy = [e for e, n in self._inflight.items() if n >= limit]
        now = time.time()
        claimed = await self.hooks.claim(self.owner, now, now + self.lease, limit, BATCH, busy)
        # An endpoint passed over, or given all its limit allows, may have more due: the end
        # of one of its attempts is then worth a look (and only then: a claim is a write).
        taken = Counter(d.endpoint_id for d in claimed)
        self._capped.update(busy, (e for e, n in taken.items() if n >= limit))
        return claimed

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        """One attempt, in a task of its own; whatever goes wrong stays in it (the
        delivery is then attempted again when its lease expires)."""
        endpoint = delivery.endpoint_id
        try:
            limiter = self._limits.get(endpoint)
            if limiter is None:
                limiter = self._limits[endpoint] = anyio.CapacityLimiter(
                    self.settings.webhook_concurrency
                )
            async with limiter:
                status, error = await self._attempt(client, delivery)
            await self._record(delivery, status, error)
        except Exception:
            log.exception("webhook %s: the attempt failed unexpectedly", delivery.id)
        finally:
            self._inflight[endpoint] -= 1
            if not self._inflight[endpoint]:
                del self._inflight[endpoint]
                self._limits.pop(endpoint, None)
            if endpoint in self._capped:  # a slot is free, and more may be due
                self._capped.discard(endpoint)
                self.wake()

    async def _record(self, delivery: Delivery, status: int | None, error: str | None) -> None:
        now = time.time()
        delivered = status is not None and 200 <= status < 300
        next_at = None if delivered else self._next_at(delivery, now)
        try:
            await self.hooks.record(delivery.id, self.owner, now, status, error, next_at)
        except Exception as exc:  # its lease expires: attempted again (at least once)
            log.warning("recording webhook %s failed: %s", delivery.id, exc)
            return
        result = "delivered" if delivered else "retried" if next_at else "gave_up"
        metrics.webhook_attempt(result)
        if not delivered:
            log.log(
                logging.INFO if next_at else logging.WARNING,
                "webhook %s to %s: attempt %d failed (%s); %s",
                delivery.id,
                delivery.endpoint_id,
                delivery.attempts + 1,
                error,
                "given up" if next_at is None else f"next in {next_at - now:.1f}s",
            )

    async def _attempt(
        self, client: httpx.AsyncClient, delivery: Delivery
    ) -> tuple[int | None, str | None]:
        """One POST: its status (None: no answer) and what went wrong, if anything."""
        try:
            check_target(delivery.url, self.settings.webhook_allowed_hosts)
        except TargetRefused as exc:
            return None, str(exc)
        payload = body(delivery)
        try:
            with anyio.fail_after(self.settings.webhook_timeout):  # the whole attempt
                async with client.stream(
                    "POST", delivery.url, content=payload, headers=headers(delivery, payload)
                ) as reply:
                    status = reply.status_code
                    # A short answer is read so the connection can serve the next attempt;
                    # a long one is not ours to buffer (its connection is closed instead).
                    seen = 0
                    async for chunk in reply.aiter_raw():
                        seen += len(chunk)
                        if seen > REPLY_READ:
                            break
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]
        return status, None if 200 <= status < 300 else f"HTTP {status}"

    def _next_at(self, delivery: Delivery, now: float) -> float | None:
        """When to try again after this failed attempt; None: give up (the window is over)."""
        s = self.settings
        failures = delivery.attempts + 1
        delay = min(s.webhook_retry_first * 2 ** min(failures - 1, 40), s.webhook_retry_max_delay)
        at = now + delay * (1 + random.random() / 10)  # jitter: spread a backlog's retries
        return None if at > delivery.created_at + s.webhook_retry_window else at
