"""What the inviteExpired user does: turn invites to it into rejections with a reason.

Transactions from the homeserver are recorded here (handled ids with the digest of their events,
and one action per invite or join of the inviteExpired user) in one database transaction; a job
performs the actions.

A transaction is a retry only if its id came before *with the same events*: Synapse on SQLite
numbers its transactions from 1 again after a restart (its sequence starts from the largest id
still in its table, and delivered transactions are deleted), so an id alone would make every
transaction after such a restart look handled, and it would be dropped.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

from appservice.clock import Clock
from appservice.db.appservice import LEAVE, REJECT, AppserviceStore
from appservice.db.database import AppDatabase
from appservice.db.invites import Invite, InviteStore
from appservice.notifications.generator import MessageGenerator

log = logging.getLogger(__name__)

# Handled transaction ids are kept this long (the homeserver stops retrying long before).
TRANSACTION_MEMORY_S = 7 * 86400

# The bot's notice that an invite expired (appservice.bot_expiry_notice), recorded with the
# rejection of the inviteExpired user's invite and posted by the bot (matrix/bot.py).
BOT_EXPIRY_NOTICE = "bot_expiry_notice"


def events_digest(events: list[dict[str, Any]]) -> str:
    """What tells a transaction's events apart: SHA-256 over the sorted digests of each event's
    ``event_id`` (or, for an event without one, of its canonical JSON). The order of the events
    does not matter; how often one occurs does."""
    parts = []
    for event in events:
        event_id = event.get("event_id")
        if isinstance(event_id, str):
            item = "id:" + event_id
        else:
            item = "json:" + json.dumps(event, sort_keys=True, separators=(",", ":"))
        parts.append(hashlib.sha256(item.encode("utf-8", "surrogatepass")).digest())
    return hashlib.sha256(b"".join(sorted(parts))).hexdigest()


_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60))


def _count(count: int, unit: str) -> str:
    return f"{count} {unit}{'s' if count != 1 else ''}"


def human_duration(seconds: float) -> str:
    """``7 days``, ``60 hours``, ``1 minute``, ``45 seconds``: the largest unit that divides it
    exactly, else the largest unit it is at least two of (rounded)."""
    for unit, size in _UNITS:
        if seconds >= size and seconds % size == 0:
            return _count(int(seconds // size), unit)
    for unit, size in _UNITS:
        if seconds >= 2 * size:
            return _count(round(seconds / size), unit)
    return _count(round(seconds), "second")


def _invite_token(event: dict[str, Any]) -> str | None:
    """The token of the 3PID invite a membership event comes from, if any."""
    content = event.get("content")
    third_party = content.get("third_party_invite") if isinstance(content, dict) else None
    signed = third_party.get("signed") if isinstance(third_party, dict) else None
    token = signed.get("token") if isinstance(signed, dict) else None
    return token if isinstance(token, str) else None


class ExpiredInviteService:
    """Records what the inviteExpired user must do."""

    def __init__(
        self,
        db: AppDatabase,
        store: AppserviceStore,
        invites: InviteStore,
        generator: MessageGenerator,
        clock: Clock,
        *,
        expired_user_id: str,
        expire_after_s: float,
    ) -> None:
        self._db = db
        self._store = store
        self._invites = invites
        self._generator = generator
        self._clock = clock
        self.expired_user_id = expired_user_id
        self._expire_after_s = expire_after_s
        # The bot's actions (kind, room_id, event_id) for an event, recorded in the same
        # transaction as the inviteExpired user's (set when the appservice runs, see matrix/bot.py).
        self.bot_action_for: Callable[[dict[str, Any]], tuple[str, str, str] | None] | None = None
        self.bot_user_id = ""
        # The bot's notice text for an expired invite and how long it waited, when the bot
        # posts one (set when the appservice runs with appservice.bot_expiry_notice).
        self.post_expiry_notice = False
        # Wakes the job that performs actions (after the transaction committed).
        self.on_recorded: Callable[[], None] = lambda: None

    async def handle_transaction(self, txn_id: str, events: list[dict[str, Any]]) -> None:
        """Record a homeserver transaction; a retried one (same id, same events) is a no-op."""
        now = self._clock.now_ms()
        digest = events_digest(events)
        recorded = 0
        async with self._db.transaction():
            if not await self._store.record_transaction(txn_id, digest, now):
                log.info("transaction %s was already handled", txn_id)
                return
            if await self._store.transaction_id_seen_with_other_events(txn_id, digest):
                log.info(
                    "transaction %s reuses an id with other events (the homeserver restarted?):"
                    " handling it",
                    txn_id,
                )
            for event in events:
                action = self._action_for(event)
                user_id = self.expired_user_id
                if action is None and self.bot_action_for is not None:
                    action, user_id = self.bot_action_for(event), self.bot_user_id
                if action is None:
                    continue
                kind, room_id, event_id = action
                if kind == LEAVE and await self._store.has_open_action(room_id, REJECT):
                    continue  # our own join while posting a notice: that action leaves anyway
                reason = await self._reason(event) if kind == REJECT else ""
                if await self._store.add_action(
                    secrets.token_urlsafe(12),
                    kind,
                    room_id,
                    user_id,
                    reason,
                    event_id,
                    now,
                ):
                    recorded += 1
                notice = await self._expiry_notice(event) if kind == REJECT else None
                if notice is not None and await self._store.add_action(
                    secrets.token_urlsafe(12),
                    BOT_EXPIRY_NOTICE,
                    room_id,
                    self.bot_user_id,
                    notice,
                    event_id,
                    now,
                ):
                    recorded += 1
        if recorded:
            log.info("transaction %s: %d room action(s) recorded", txn_id, recorded)
            self.on_recorded()

    def _action_for(self, event: dict[str, Any]) -> tuple[str, str, str] | None:
        """(kind, room_id, event_id) for a membership of the inviteExpired user, else None."""
        if event.get("type") != "m.room.member" or event.get("state_key") != self.expired_user_id:
            return None
        content = event.get("content")
        room_id = event.get("room_id")
        event_id = event.get("event_id")
        if not isinstance(content, dict) or not isinstance(room_id, str):
            return None
        if not isinstance(event_id, str):
            return None
        membership = content.get("membership")
        if membership == "invite":
            return REJECT, room_id, event_id
        if membership == "join":
            return LEAVE, room_id, event_id
        return None

    async def _expiry_notice(self, event: dict[str, Any]) -> str | None:
        """The bot's notice for the invite of this event when it is one of ours that expired
        (not one withdrawn through the bot or by the operator before its time), if enabled."""
        if not self.post_expiry_notice or not self.bot_user_id:
            return None
        token = _invite_token(event)
        invite = await self._invites.by_token(token) if token else None
        if invite is None or invite.resolved_ts is None:
            return None
        if invite.resolved_ts - invite.created_ts < self._expire_after_s * 1000:
            return None
        if await self._invites.withdrawn_by(invite.id) is not None:
            return None
        # The same words as the rejection reason (invite_expired_reason.txt).
        return self._expired_reason(invite)

    def _expired_reason(self, invite: Invite) -> str:
        return self._generator.expired_invite_reason(
            invitee=invite.display_name,
            sender=invite.sender,
            invited_on=_day(invite.created_ts),
            expired_after=human_duration(self._expire_after_s),
            room_id=invite.room_id,
        )

    async def _reason(self, event: dict[str, Any]) -> str:
        """The rejection reason, with the invite's details when it is one of ours."""
        content = event.get("content", {})
        third_party = content.get("third_party_invite")
        token = _invite_token(event)
        display_name = ""
        if isinstance(third_party, dict) and isinstance(third_party.get("display_name"), str):
            display_name = third_party["display_name"]
        invite = await self._invites.by_token(token) if token else None
        if invite is not None:
            withdrawn_by = await self._invites.withdrawn_by(invite.id)
            if withdrawn_by is not None:
                return self._generator.withdrawn_invite_reason(
                    invitee=invite.display_name,
                    sender=invite.sender,
                    invited_on=_day(invite.created_ts),
                    withdrawn_by=withdrawn_by,
                    room_id=invite.room_id,
                )
            return self._expired_reason(invite)
        sender = event.get("sender")
        return self._generator.expired_invite_reason(
            invitee=display_name,
            sender=sender if isinstance(sender, str) and display_name else "",
            invited_on="",
            expired_after="",
            room_id=str(event.get("room_id", "")),
        )

    async def purge(self) -> int:
        """Forget old transactions and old finished actions."""
        cutoff = self._clock.now_ms() - TRANSACTION_MEMORY_S * 1000
        return await self._store.purge_transactions(
            cutoff
        ) + await self._store.purge_finished_actions(cutoff)


def _day(ms: int) -> str:
    """The UTC date of a timestamp, as the reason templates show it."""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d")
