"""Performs the recorded room actions of the inviteExpired user through the homeserver.

Rejecting is ``leave`` while invited (with the reason); in notice mode the user joins, posts the
reason as ``m.notice`` and leaves. Homeserver errors are retried with exponential backoff; a
403/404 (the invite is gone, the user is not in the room) means there is nothing left to do.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mautrix.errors import IntentError, MatrixConnectionError, MatrixRequestError
from mautrix.types import RoomID, UserID

from appservice.clock import Clock
from appservice.db.appservice import LEAVE, REJECT, AppserviceStore, RoomAction
from appservice.jobs.heartbeat import heartbeat
from appservice.metrics import Metrics

log = logging.getLogger(__name__)

_BATCH = 50
# Renewed every third of it while the worker runs: a killed instance's actions are taken over
# this long after it died.
LEASE_S = 15.0
RETRY_INITIAL_S = 5.0
RETRY_MAX_S = 15 * 60.0
GIVE_UP_AFTER_S = 3 * 86400.0


class RoomActionWorker:
    """Claims due actions and performs them as the inviteExpired user."""

    def __init__(
        self,
        store: AppserviceStore,
        intent_for: Callable[[str], Any],
        clock: Clock,
        *,
        post_notice: bool = False,
        metrics: Metrics | None = None,
        owner: str | None = None,
        performers: Mapping[str, Callable[[Any, RoomAction], Awaitable[None]]] | None = None,
    ) -> None:
        # Other kinds of action (the bot's) and what performs them with the action's intent.
        self._performers = dict(performers or {})
        self._store = store
        # Who holds the claims of this worker: one id per process.
        self.owner = owner or f"actions-{secrets.token_hex(6)}"
        self._lease_ms = int(LEASE_S * 1000)
        self._stopping = False
        self._metrics = metrics if metrics is not None else Metrics()
        self._intent_for = intent_for
        self._clock = clock
        self._post_notice = post_notice

    def stop_claiming(self) -> None:
        """Claim nothing more and start no claimed action (a stop is coming)."""
        self._stopping = True

    async def release_claims(self) -> int:
        """Give back every action this worker claimed and did not finish; how many."""
        return await self._store.release(self.owner)

    async def _renew_leases(self) -> None:
        await self._store.heartbeat(self.owner, self._clock.now_ms() + self._lease_ms)

    async def perform_due(self) -> int:
        """Perform every due action, one after the other; returns how many were done."""
        done = 0
        async with heartbeat("room actions", self._renew_leases, LEASE_S / 3):
            while not self._stopping:
                batch = await self._store.claim_due(
                    self.owner, self._clock.now_ms(), self._lease_ms, _BATCH
                )
                for action in batch:
                    if self._stopping:
                        break  # the rest is given back by release_claims
                    done += await self._perform(action)
                if len(batch) < _BATCH:
                    break
        return done

    async def _perform(self, action: RoomAction) -> int:
        # Renewed right before the attempt: the batch is worked through one by one, and a row
        # whose claim lapsed meanwhile may be another instance's now.
        claim = self.owner
        if not await self._store.renew_claim(action, claim, self._clock.now_ms() + self._lease_ms):
            return 0
        attempts = action.attempts + 1
        intent = self._intent_for(action.user_id)
        room_id = RoomID(action.room_id)
        try:
            await intent.ensure_registered()
            if action.kind == REJECT and self._post_notice:
                await self._notice_and_leave(intent, room_id, action.reason)
            elif action.kind in (REJECT, LEAVE):
                await intent.leave_room(room_id, reason=action.reason or None)
            elif action.kind in self._performers:
                await self._performers[action.kind](intent, action)
            else:
                await self._store.mark_failed(
                    action.id, attempts, f"unknown kind {action.kind}", claim=claim
                )
                return 0
        except MatrixRequestError as e:
            if e.http_status in (403, 404):
                # Already rejected, or not in the room: the goal is reached.
                log.info("%s in %s: nothing to do (%s)", action.kind, room_id, e.errcode)
                await self._store.mark_done(action.id, attempts, self._clock.now_ms(), claim=claim)
                return 1
            await self._retry_or_fail(action, claim, attempts, f"HTTP {e.http_status} {e.errcode}")
            return 0
        except (MatrixConnectionError, OSError, TimeoutError) as e:
            await self._retry_or_fail(action, claim, attempts, f"{type(e).__name__}: {e}")
            return 0
        except Exception as e:  # a malformed answer, or a bug: retried, never stuck
            log.exception("%s in %s failed unexpectedly", action.kind, room_id)
            await self._retry_or_fail(action, claim, attempts, f"{type(e).__name__}: {e}")
            return 0
        await self._store.mark_done(action.id, attempts, self._clock.now_ms(), claim=claim)
        if action.kind == REJECT:
            self._metrics.expired_invites_rejected.inc()
        log.info("%s done in %s as %s", action.kind, room_id, UserID(action.user_id))
        return 1

    async def _notice_and_leave(self, intent: Any, room_id: RoomID, reason: str) -> None:
        """Join, post the reason as m.notice, leave. When posting is refused for good (no
        permission), leave with the reason instead: the user must not stay in the room."""
        await intent.join_room_by_id(room_id)
        try:
            await intent.send_notice(room_id, reason)
        except (MatrixRequestError, IntentError) as e:
            status = getattr(e, "http_status", 403)
            if not 400 <= status < 500 or status == 429:
                raise  # retried: join (again), post, leave
            log.info("may not post in %s (%s): leaving with the reason instead", room_id, e)
            await intent.leave_room(room_id, reason=reason or None)
            return
        await intent.leave_room(room_id)

    async def _retry_or_fail(
        self, action: RoomAction, claim: str, attempts: int, reason: str
    ) -> None:
        now = self._clock.now_ms()
        delay_s = min(RETRY_MAX_S, RETRY_INITIAL_S * 2 ** (attempts - 1))
        if now + delay_s * 1000 - action.created_ts > GIVE_UP_AFTER_S * 1000:
            await self._store.mark_failed(action.id, attempts, f"gave up: {reason}", claim=claim)
            log.warning("%s in %s failed for good: %s", action.kind, action.room_id, reason)
            return
        await self._store.mark_retry(
            action.id, attempts, now + int(delay_s * 1000), reason, claim=claim
        )
        log.warning(
            "%s in %s failed (attempt %d, retry in %ds): %s",
            action.kind,
            action.room_id,
            attempts,
            int(delay_s),
            reason,
        )
