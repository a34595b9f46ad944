"""The application service's durable state: handled transactions and pending room actions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appservice.db.database import AppDatabase

PENDING = "pending"
DONE = "done"
FAILED = "failed"

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


_COLUMNS = "id, kind, room_id, user_id, reason, event_id, state, created_ts, attempts, last_error"


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
    )


class AppserviceStore:
    """SQL for ``appservice_transactions`` and ``appservice_actions``."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def record_transaction(self, txn_id: str, now_ms: int) -> bool:
        """Remember a transaction; False when it was handled before."""
        row = await self._db.fetchrow(
            "INSERT INTO appservice_transactions (txn_id, received_ts) VALUES ($1, $2)"
            " ON CONFLICT (txn_id) DO NOTHING RETURNING txn_id",
            txn_id,
            now_ms,
        )
        return row is not None

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

    async def claim_due(self, now_ms: int, lease_ms: int, limit: int) -> list[RoomAction]:
        """Claim due actions for this worker (see OutboxStore.claim_due)."""
        lock = " FOR UPDATE SKIP LOCKED" if self._db.is_postgres else ""
        rows = await self._db.fetch(
            f"UPDATE appservice_actions SET claimed_until = $2 WHERE id IN ("
            f" SELECT id FROM appservice_actions WHERE state = $3 AND next_attempt_ts <= $1"
            f" AND (claimed_until IS NULL OR claimed_until <= $1)"
            f" ORDER BY next_attempt_ts, id LIMIT $4{lock}) RETURNING {_COLUMNS}",
            now_ms,
            now_ms + lease_ms,
            PENDING,
            limit,
        )
        return sorted((_action(row) for row in rows), key=lambda a: (a.created_ts, a.id))

    async def mark_done(self, action_id: str, attempts: int, now_ms: int) -> None:
        """The action was performed (or turned out to be unnecessary)."""
        await self._db.execute(
            "UPDATE appservice_actions SET state = $2, attempts = $3, done_ts = $4,"
            " claimed_until = NULL WHERE id = $1",
            action_id,
            DONE,
            attempts,
            now_ms,
        )

    async def mark_retry(
        self, action_id: str, attempts: int, next_attempt_ts: int, error: str
    ) -> None:
        """It failed for now; try again later."""
        await self._db.execute(
            "UPDATE appservice_actions SET attempts = $2, next_attempt_ts = $3, last_error = $4,"
            " claimed_until = NULL WHERE id = $1",
            action_id,
            attempts,
            next_attempt_ts,
            error,
        )

    async def mark_failed(self, action_id: str, attempts: int, error: str) -> None:
        """It cannot be done."""
        await self._db.execute(
            "UPDATE appservice_actions SET state = $2, attempts = $3, last_error = $4,"
            " claimed_until = NULL WHERE id = $1",
            action_id,
            FAILED,
            attempts,
            error,
        )

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

    async def purge_finished_actions(self, before_ms: int) -> int:
        """Forget actions done or failed before ``before_ms``."""
        rows = await self._db.fetch(
            "DELETE FROM appservice_actions WHERE state <> $1 AND created_ts < $2 RETURNING id",
            PENDING,
            before_ms,
        )
        return len(rows)

    async def purge_transactions(self, before_ms: int) -> int:
        """Forget transaction ids older than ``before_ms`` (the homeserver stopped retrying)."""
        rows = await self._db.fetch(
            "DELETE FROM appservice_transactions WHERE received_ts < $1 RETURNING txn_id",
            before_ms,
        )
        return len(rows)
