"""Delivering queued onbind notifications to homeservers, with retries and a give-up age.

Every instance runs this; claims on the outbox (a lease per row, ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL) make sure a notification is sent by one instance at a time. A notification counts as
delivered when the homeserver answers 2xx; a permanent 4xx marks it failed with the reason;
anything else (5xx, 408, 429, network) is retried with exponential backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from appservice.clock import Clock
from appservice.config.model import DeliveryConfig
from appservice.db.outbox import OutboxEntry, OutboxStore
from appservice.federation.client import FederationClient
from appservice.federation.discovery import FederationError
from appservice.metrics import Metrics
from appservice.services.invites import ONBIND_PATH

log = logging.getLogger(__name__)

_BATCH = 100
_RETRYABLE_4XX = {408, 429}


class OnbindDelivery:
    """Sends due outbox entries."""

    def __init__(
        self,
        outbox: OutboxStore,
        federation: FederationClient,
        config: DeliveryConfig,
        clock: Clock,
        *,
        request_timeout_s: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._outbox = outbox
        self._metrics = metrics if metrics is not None else Metrics()
        self._federation = federation
        self._config = config
        self._clock = clock
        # A claim outlives any attempt, so a slow attempt is never sent twice in parallel; a
        # crashed worker's claims lapse after it and another instance takes over.
        self._lease_ms = int((request_timeout_s * 3 + 60) * 1000)
        self._limit = asyncio.Semaphore(config.concurrency)

    async def deliver_due(self) -> int:
        """Deliver everything due now; returns how many were delivered."""
        delivered = 0
        while True:
            batch = await self._outbox.claim_due(self._clock.now_ms(), self._lease_ms, _BATCH)
            if not batch:
                return delivered
            results = await asyncio.gather(
                *(self._deliver_one(entry) for entry in batch), return_exceptions=True
            )
            for entry, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result  # cancelled: stop here, the claims lapse
                    # Its claim lapses and it is tried again then (database trouble, mostly).
                    log.error(
                        "onbind for invite %s: delivery attempt failed: %r",
                        entry.invite_id,
                        result,
                    )
                elif result:
                    delivered += 1
            if len(batch) < _BATCH:
                return delivered

    async def _deliver_one(self, entry: OutboxEntry) -> bool:
        attempts = entry.attempts + 1
        async with self._limit:
            # The batch may have waited for the semaphore past the lease, and another instance
            # may have taken the entry over: renew the claim, or leave the entry to that one.
            claim = self._clock.now_ms() + self._lease_ms
            assert entry.claimed_until is not None
            if not await self._outbox.renew_claim(entry.id, entry.claimed_until, claim):
                log.info("onbind for invite %s: claim lost, skipped", entry.invite_id)
                return False
            self._metrics.onbind_attempts.inc()
            try:
                status, body = await self._federation.post_json(
                    entry.destination, ONBIND_PATH, json.loads(entry.body)
                )
            except FederationError as e:
                await self._retry_or_fail(entry, claim, attempts, str(e))
                return False
            except Exception as e:  # never leave an entry claimed by an unexpected failure
                log.exception("onbind for invite %s: unexpected failure", entry.invite_id)
                await self._retry_or_fail(entry, claim, attempts, f"internal error: {e!r}")
                return False
        if 200 <= status < 300:
            self._metrics.onbind_delivered.inc()
            if await self._outbox.mark_delivered(
                entry.id, attempts, self._clock.now_ms(), claim=claim
            ):
                log.info("onbind for invite %s delivered to %s", entry.invite_id, entry.destination)
            else:
                log.warning(
                    "onbind for invite %s delivered to %s after its claim was lost",
                    entry.invite_id,
                    entry.destination,
                )
            return True
        reason = f"HTTP {status}{_matrix_error(body)}"
        if 400 <= status < 500 and status not in _RETRYABLE_4XX:
            if await self._outbox.mark_failed(entry.id, attempts, reason, claim=claim):
                self._metrics.onbind_failed.inc()
                log.warning(
                    "onbind for invite %s refused by %s: %s",
                    entry.invite_id,
                    entry.destination,
                    reason,
                )
            return False
        await self._retry_or_fail(entry, claim, attempts, reason)
        return False

    async def _retry_or_fail(
        self, entry: OutboxEntry, claim: int, attempts: int, reason: str
    ) -> None:
        now = self._clock.now_ms()
        # The exponent is capped: the delay is capped anyway, and 2 ** 1024 overflows a float.
        backoff = self._config.retry_initial * 2 ** min(attempts - 1, 32)
        delay_ms = int(min(self._config.retry_max, backoff) * 1000)
        if now + delay_ms - entry.created_ts > self._config.give_up_after * 1000:
            if await self._outbox.mark_failed(
                entry.id, attempts, f"gave up after {attempts} attempts: {reason}", claim=claim
            ):
                self._metrics.onbind_failed.inc()
                log.warning(
                    "onbind for invite %s to %s failed for good after %d attempts: %s",
                    entry.invite_id,
                    entry.destination,
                    attempts,
                    reason,
                )
            return
        if await self._outbox.mark_retry(entry.id, attempts, now + delay_ms, reason, claim=claim):
            log.info(
                "onbind for invite %s to %s failed (attempt %d, retry in %ds): %s",
                entry.invite_id,
                entry.destination,
                attempts,
                delay_ms // 1000,
                reason,
            )


def _matrix_error(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("errcode"), str):
        return f" {body['errcode']}: {str(body.get('error', ''))[:200]}"
    return ""
