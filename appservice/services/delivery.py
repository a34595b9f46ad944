"""Delivering queued onbind notifications to homeservers: short leases kept alive by a
heartbeat, clean stops, and backoff per homeserver.

Every instance runs this. A worker claims rows under its own owner id with a lease of
``delivery.lease`` that it renews while it works, so a killed worker's rows are due again
seconds later; a stopping worker starts nothing new and gives back what it did not start.

A notification counts as delivered when the homeserver answers 2xx; a permanent 4xx marks it
failed with the reason. A homeserver that does not answer (network, TLS, timeout, 408, 429, 502,
503, 504) is backed off as a whole: its rows wait, one probe at a time (across all instances)
finds out whether it is back, first after ``homeserver_retry_initial`` and then doubling up to
``homeserver_retry_max``, and its first success lets its whole queue go at once. Any other 5xx
means the homeserver is up but failed this notification: that row alone backs off
(``retry_initial`` doubling up to ``retry_max``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any

from appservice.clock import Clock
from appservice.config.model import DeliveryConfig
from appservice.db.destinations import DestinationStore
from appservice.db.outbox import OutboxEntry, OutboxStore
from appservice.federation.client import FederationClient
from appservice.federation.discovery import FederationError
from appservice.jobs.heartbeat import heartbeat
from appservice.metrics import Metrics
from appservice.services.invites import ONBIND_PATH

log = logging.getLogger(__name__)

_BATCH = 100
# Answers that say the homeserver (or the proxy in front of it) cannot take requests now.
HOMESERVER_DOWN_STATUSES = frozenset({408, 429, 502, 503, 504})


class OnbindDelivery:
    """Sends due outbox entries."""

    def __init__(
        self,
        outbox: OutboxStore,
        federation: FederationClient,
        config: DeliveryConfig,
        clock: Clock,
        *,
        destinations: DestinationStore | None = None,
        metrics: Metrics | None = None,
        owner: str | None = None,
    ) -> None:
        self._outbox = outbox
        self._destinations = destinations or DestinationStore(outbox.db)
        self._federation = federation
        self._config = config
        self._clock = clock
        self._metrics = metrics if metrics is not None else Metrics()
        # Who holds the claims of this worker: one id per process.
        self.owner = owner or f"onbind-{secrets.token_hex(6)}"
        self._lease_ms = int(float(config.lease) * 1000)
        self._limit = asyncio.Semaphore(config.concurrency)
        self._stopping = False
        self._recovered = False
        # Homeservers found down during this run: their other claimed rows are not sent.
        self._down_now: set[str] = set()

    def stop_claiming(self) -> None:
        """Claim nothing more and start no claimed row (a stop is coming)."""
        self._stopping = True

    async def release_claims(self) -> int:
        """Give back every row this worker claimed and did not finish; how many."""
        return await self._outbox.release(self.owner)

    async def _renew_leases(self) -> None:
        await self._outbox.heartbeat(self.owner, self._clock.now_ms() + self._lease_ms)

    async def deliver_due(self) -> int:
        """Deliver everything due now (and probe backed-off homeservers whose turn it is);
        returns how many were delivered."""
        delivered = 0
        async with heartbeat("onbind delivery", self._renew_leases, float(self._config.lease) / 3):
            while not self._stopping:
                self._recovered = False
                self._down_now.clear()
                now = self._clock.now_ms()
                batch: list[OutboxEntry] = []
                for destination in await self._destinations.take_probes(now, self._lease_ms):
                    probe = await self._outbox.claim_probe(
                        self.owner, destination, now, self._lease_ms
                    )
                    if probe is not None:
                        batch.append(probe)
                due = await self._outbox.claim_due(self.owner, now, self._lease_ms, _BATCH)
                batch += due
                if not batch:
                    return delivered
                results = await asyncio.gather(
                    *(self._deliver_one(entry) for entry in batch), return_exceptions=True
                )
                for entry, result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        if not isinstance(result, Exception):
                            raise result  # cancelled: stop here; the stop releases the claims
                        # Its claim lapses and it is tried again then (database trouble, mostly).
                        log.error(
                            "onbind for invite %s: delivery attempt failed: %r",
                            entry.invite_id,
                            result,
                        )
                    elif result:
                        delivered += 1
                if len(due) < _BATCH and not self._recovered:
                    return delivered
        return delivered

    async def _deliver_one(self, entry: OutboxEntry) -> bool:
        attempts = entry.attempts + 1
        async with self._limit:
            if self._stopping:
                return False  # not started: given back by release_claims
            if entry.destination in self._down_now:
                # Found down by another request of this batch: wait for its probe instead.
                await self._outbox.release_one(entry.id, self.owner)
                return False
            # The batch may have waited for the semaphore past the lease, and another instance
            # may have taken the entry over: renew the claim, or leave the entry to that one.
            claim = self._clock.now_ms() + self._lease_ms
            if not await self._outbox.renew_claim(entry.id, self.owner, claim):
                log.info("onbind for invite %s: claim lost, skipped", entry.invite_id)
                return False
            self._metrics.onbind_attempts.inc()
            try:
                status, body = await self._federation.post_json(
                    entry.destination, ONBIND_PATH, json.loads(entry.body)
                )
            except FederationError as e:
                await self._homeserver_down(entry, attempts, str(e))
                return False
            except Exception as e:  # never leave an entry claimed by an unexpected failure
                log.exception("onbind for invite %s: unexpected failure", entry.invite_id)
                await self._retry_or_fail(entry, attempts, f"internal error: {e!r}")
                return False
        reason = f"HTTP {status}{_matrix_error(body)}"
        if status in HOMESERVER_DOWN_STATUSES:
            await self._homeserver_down(entry, attempts, reason)
            return False
        await self._homeserver_up(entry.destination)
        if 200 <= status < 300:
            self._metrics.onbind_delivered.inc()
            if await self._outbox.mark_delivered(
                entry.id, attempts, self._clock.now_ms(), claim=self.owner
            ):
                log.info("onbind for invite %s delivered to %s", entry.invite_id, entry.destination)
            else:
                log.warning(
                    "onbind for invite %s delivered to %s after its claim was lost",
                    entry.invite_id,
                    entry.destination,
                )
            return True
        if 400 <= status < 500:
            if await self._outbox.mark_failed(entry.id, attempts, reason, claim=self.owner):
                self._metrics.onbind_failed.inc()
                log.warning(
                    "onbind for invite %s refused by %s: %s",
                    entry.invite_id,
                    entry.destination,
                    reason,
                )
            return False
        await self._retry_or_fail(entry, attempts, reason)
        return False

    async def _homeserver_up(self, destination: str) -> None:
        """It answered: if it was backed off, its queue may go now (this run goes on)."""
        if await self._destinations.record_success(destination, self._clock.now_ms()):
            self._recovered = True
            log.info("homeserver %s answers again: sending its queued onbinds", destination)

    async def _homeserver_down(self, entry: OutboxEntry, attempts: int, reason: str) -> None:
        """Back the homeserver off; this row waits for its next probe, and rows to it older
        than the give-up age are failed."""
        now = self._clock.now_ms()
        self._down_now.add(entry.destination)
        state = await self._destinations.record_failure(
            entry.destination,
            now,
            reason,
            int(float(self._config.homeserver_retry_initial) * 1000),
            int(float(self._config.homeserver_retry_max) * 1000),
        )
        await self._retry_or_fail(entry, attempts, reason, next_attempt_ts=state.retry_at)
        give_up_ms = int(float(self._config.give_up_after) * 1000)
        stale = await self._outbox.fail_unclaimed_before(
            entry.destination, now - give_up_ms, f"gave up: {entry.destination}: {reason}"
        )
        if stale:
            self._metrics.onbind_failed.inc(stale)
            log.warning(
                "gave up %d onbind notification(s) to %s, unreachable for longer than %ds",
                stale,
                entry.destination,
                give_up_ms // 1000,
            )
        if state.failures == 1 or state.failures % 10 == 0:
            log.warning(
                "homeserver %s does not answer (%d failure(s) in a row, next probe in %ds): %s",
                entry.destination,
                state.failures,
                max(0, state.retry_at - now) // 1000,
                reason,
            )

    async def _retry_or_fail(
        self, entry: OutboxEntry, attempts: int, reason: str, *, next_attempt_ts: int | None = None
    ) -> None:
        now = self._clock.now_ms()
        if next_attempt_ts is None:
            # The exponent is capped: the delay is capped anyway, and 2 ** 1024 overflows.
            backoff = self._config.retry_initial * 2 ** min(attempts - 1, 32)
            next_attempt_ts = now + int(min(self._config.retry_max, backoff) * 1000)
        if next_attempt_ts - entry.created_ts > self._config.give_up_after * 1000:
            if await self._outbox.mark_failed(
                entry.id, attempts, f"gave up after {attempts} attempts: {reason}", claim=self.owner
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
        if await self._outbox.mark_retry(
            entry.id, attempts, next_attempt_ts, reason, claim=self.owner
        ):
            log.info(
                "onbind for invite %s to %s failed (attempt %d, retry in %ds): %s",
                entry.invite_id,
                entry.destination,
                attempts,
                max(0, next_attempt_ts - now) // 1000,
                reason,
            )


def _matrix_error(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("errcode"), str):
        return f" {body['errcode']}: {str(body.get('error', ''))[:200]}"
    return ""
