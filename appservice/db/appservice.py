"""The application service's durable state: handled transactions and pending room actions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appservice.db.database import AppDatabase
from appservice.db.work_queue import FAILED, PENDING, LeasedQueue

DONE = "done"
__all__ = ["DONE", "FAILED", "LEAVE", "PENDING", "REJECT", "AppserviceStore", "RoomAction"]

REJECT = "reject"
LEAVE = "leave"


@dataclass(frozen=True)
class RoomAction:
    """Something the inviteExpired user must do in a room."""

    id: str
    kind: str
    room_id: str
    user_id: str
    reason: str
    event_id: str
    state: str
    created_ts: int
    attempts: int
    last_error: str | None
    claimed_until: int | None = None


_COLUMNS = (
    "id, kind, room_id, user_id, reason, event_id, state, created_ts, attempts, last_error,"
    " claimed_until"
)


def _action(row: Any) -> RoomAction:
    return RoomAction(
        id=row["id"],
        kind=row["kind"],
        room_id=row["room_id"],
        user_id=row["user_id"],
        reason=row["reason"],
        event_id=row["event_id"],
        state=row["state"],
        created_ts=row["created_ts"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        claimed_until=row["claimed_until"],
    )


class AppserviceStore:
    """SQL for ``appservice_transactions`` and ``appservice_actions``."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db
        self._queue = LeasedQueue(db, "appservice_actions", _COLUMNS, DONE, "done_ts")

    async def record_transaction(self, txn_id: str, events_digest: str, now_ms: int) -> bool:
        """Remember a transaction by its id and the digest of its events; False when this id
        came with these events before (a retry). The same id with other events is new: a
        homeserver may number its transactions from 1 again after a restart."""
        row = await self._db.fetchrow(
            "INSERT INTO appservice_transactions (txn_id, events_digest, received_ts)"
            " VALUES ($1, $2, $3)"
            " ON CONFLICT (txn_id, events_digest) DO NOTHING RETURNING txn_id",
            txn_id,
            events_digest,
            now_ms,
        )
        return row is not None

    async def transaction_id_seen_with_other_events(self, txn_id: str, events_digest: str) -> bool:
        """Whether ``txn_id`` was recorded with events other than ``events_digest``."""
        value = await self._db.fetchval(
            "SELECT 1 FROM appservice_transactions WHERE txn_id = $1 AND events_digest <> $2"
            " LIMIT 1",
            txn_id,
            events_digest,
        )
        return value is not None

    async def add_action(
        self,
        action_id: str,
        kind: str,
        room_id: str,
        user_id: str,
        reason: str,
        event_id: str,
        now_ms: int,
    ) -> bool:
        """Record an action (once per event and kind); False when it was already recorded."""
        row = await self._db.fetchrow(
            "INSERT INTO appservice_actions (id, kind, room_id, user_id, reason, event_id, state,"
            " created_ts, next_attempt_ts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)"
            " ON CONFLICT (event_id, kind) DO NOTHING RETURNING id",
            action_id,
            kind,
            room_id,
            user_id,
            reason,
            event_id,
            PENDING,
            now_ms,
        )
        return row is not None

    async def claim_due(
        self, owner: str, now_ms: int, lease_ms: int, limit: int
    ) -> list[RoomAction]:
        """Claim due actions for ``owner`` until ``now + lease`` (see LeasedQueue)."""
        rows = await self._queue.claim_due(owner, now_ms, lease_ms, limit)
        return sorted((_action(row) for row in rows), key=lambda a: (a.created_ts, a.id))

    async def renew_claim(self, action: RoomAction, owner: str, new_until: int) -> bool:
        """Extend ``owner``'s claim before performing it; False if the claim was lost."""
        return await self._queue.renew_claim(action.id, owner, new_until)

    async def heartbeat(self, owner: str, new_until: int) -> int:
        """Extend the leases of everything ``owner`` holds."""
        return await self._queue.heartbeat(owner, new_until)

    async def release(self, owner: str) -> int:
        """Give back everything ``owner`` holds and has not finished."""
        return await self._queue.release(owner)

    async def claimed_count(self) -> int:
        """Actions claimed now, by any worker."""
        return await self._queue.claimed_count()

    async def mark_done(
        self, action_id: str, attempts: int, now_ms: int, *, claim: str | None = None
    ) -> bool:
        """The action was performed (or turned out to be unnecessary)."""
        return await self._queue.finish(action_id, attempts, now_ms, claim=claim)

    async def mark_retry(
        self,
        action_id: str,
        attempts: int,
        next_attempt_ts: int,
        error: str,
        *,
        claim: str | None = None,
    ) -> bool:
        """It failed for now; try again later."""
        return await self._queue.retry(action_id, attempts, next_attempt_ts, error, claim=claim)

    async def mark_failed(
        self, action_id: str, attempts: int, error: str, *, claim: str | None = None
    ) -> bool:
        """It cannot be done."""
        return await self._queue.fail(action_id, attempts, error, claim=claim)

    async def actions(self) -> list[RoomAction]:
        """Every action, oldest first."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM appservice_actions ORDER BY created_ts, id"
        )
        return [_action(row) for row in rows]

    async def has_open_action(self, room_id: str, kind: str) -> bool:
        """Whether an action of ``kind`` in the room is still to be done."""
        value = await self._db.fetchval(
            "SELECT 1 FROM appservice_actions WHERE room_id = $1 AND kind = $2 AND state = $3"
            " LIMIT 1",
            room_id,
            kind,
            PENDING,
        )
        return value is not None

    async def save_text(self, action_id: str, text: str) -> str | None:
        """Store what a pending action is to post (the bot's answer, computed once) in its
        ``reason``, unless it holds one already; returns the text it holds now (None: no such
        pending action)."""
        value = await self._db.fetchval(
            "UPDATE appservice_actions SET reason = CASE WHEN reason = '' THEN $2 ELSE reason END"
            " WHERE id = $1 AND state = $3 RETURNING reason",
            action_id,
            text,
            PENDING,
        )
        return str(value) if value is not None else None

    async def cancel_open_in_room(
        self, room_id: str, user_id: str, kinds: Sequence[str], up_to_ts: int, now_ms: int
    ) -> int:
        """Finish, undone, the open actions of ``kinds`` of ``user_id`` in the room recorded up
        to ``up_to_ts`` (the user was removed from the room); how many."""
        if not kinds:
            return 0
        placeholders = ", ".join(f"${i}" for i in range(7, 7 + len(kinds)))
        rows = await self._db.fetch(
            "UPDATE appservice_actions SET state = $1, done_ts = $2,"
            " last_error = 'cancelled: removed from the room',"
            " claimed_until = NULL, claimed_by = NULL"
            " WHERE room_id = $3 AND user_id = $4 AND created_ts <= $5"
            f" AND state = $6 AND kind IN ({placeholders}) RETURNING id",
            DONE,
            now_ms,
            room_id,
            user_id,
            up_to_ts,
            PENDING,
            *kinds,
        )
        return len(rows)

    async def purge_finished_actions(self, before_ms: int) -> int:
        """Forget actions done or failed before ``before_ms``."""
        rows = await self._db.fetch(
            "DELETE FROM appservice_actions WHERE state <> $1 AND created_ts < $2 RETURNING id",
            PENDING,
            before_ms,
        )
        return len(rows)

    async def purge_transactions(self, before_ms: int) -> int:
        """Forget transactions received before ``before_ms`` (the homeserver stopped retrying)."""
        rows = await self._db.fetch(
            "DELETE FROM appservice_transactions WHERE received_ts < $1 RETURNING txn_id",
            before_ms,
        )
        return len(rows)
