"""The durable outbox of onbind notifications, claimed by workers with a lease."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appservice.db.database import AppDatabase

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"


@dataclass(frozen=True)
class OutboxEntry:
    """One onbind request to deliver to ``destination`` (a homeserver name)."""

    id: str
    invite_id: str
    destination: str
    body: str
    state: str
    created_ts: int
    next_attempt_ts: int
    attempts: int
    claimed_until: int | None
    last_error: str | None
    delivered_ts: int | None


_COLUMNS = (
    "id, invite_id, destination, body, state, created_ts, next_attempt_ts, attempts,"
    " claimed_until, last_error, delivered_ts"
)


def _entry(row: Any) -> OutboxEntry:
    return OutboxEntry(
        id=row["id"],
        invite_id=row["invite_id"],
        destination=row["destination"],
        body=row["body"],
        state=row["state"],
        created_ts=row["created_ts"],
        next_attempt_ts=row["next_attempt_ts"],
        attempts=row["attempts"],
        claimed_until=row["claimed_until"],
        last_error=row["last_error"],
        delivered_ts=row["delivered_ts"],
    )


class OutboxStore:
    """SQL for the ``onbind_outbox`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def enqueue(
        self, entry_id: str, invite_id: str, destination: str, body: str, now_ms: int
    ) -> None:
        """Queue a notification, due now."""
        await self._db.execute(
            "INSERT INTO onbind_outbox (id, invite_id, destination, body, state, created_ts,"
            " next_attempt_ts) VALUES ($1, $2, $3, $4, $5, $6, $6)",
            entry_id,
            invite_id,
            destination,
            body,
            PENDING,
            now_ms,
        )

    async def claim_due(self, now_ms: int, lease_ms: int, limit: int) -> list[OutboxEntry]:
        """Claim up to ``limit`` due entries for this worker until ``now + lease``.

        On PostgreSQL rows locked by another worker's claim are skipped (no double delivery);
        SQLite serialises writers, so the same statement is safe there too.
        """
        lock = " FOR UPDATE SKIP LOCKED" if self._db.is_postgres else ""
        rows = await self._db.fetch(
            f"UPDATE onbind_outbox SET claimed_until = $2 WHERE id IN ("
            f" SELECT id FROM onbind_outbox WHERE state = $3 AND next_attempt_ts <= $1"
            f" AND (claimed_until IS NULL OR claimed_until <= $1)"
            f" ORDER BY next_attempt_ts, id LIMIT $4{lock}) RETURNING {_COLUMNS}",
            now_ms,
            now_ms + lease_ms,
            PENDING,
            limit,
        )
        return sorted((_entry(row) for row in rows), key=lambda e: (e.next_attempt_ts, e.id))

    async def renew_claim(self, entry_id: str, claimed_until: int, new_until: int) -> bool:
        """Extend this worker's claim before an attempt; False if the claim was lost.

        ``claimed_until`` is the value this worker's claim set: a worker can claim a row only
        once its previous claim has run out, and then sets a later value, so the value
        identifies the current claim.
        """
        row = await self._db.fetchrow(
            "UPDATE onbind_outbox SET claimed_until = $3"
            " WHERE id = $1 AND claimed_until = $2 AND state = $4 RETURNING id",
            entry_id,
            claimed_until,
            new_until,
            PENDING,
        )
        return row is not None

    def _guarded(self, query: str, claim: int | None, n: int) -> tuple[str, list[int]]:
        """``query`` restricted to a pending entry, and to the claim ``claim`` when given
        (as parameter ``$n``)."""
        if claim is None:
            return query, []
        return f"{query} AND claimed_until = ${n}", [claim]

    async def mark_delivered(
        self, entry_id: str, attempts: int, now_ms: int, *, claim: int | None = None
    ) -> bool:
        """The homeserver accepted it. With ``claim`` (the worker's ``claimed_until``), only if
        that claim still holds; False when nothing changed."""
        query, extra = self._guarded(
            "UPDATE onbind_outbox SET state = $2, attempts = $3, delivered_ts = $4,"
            " claimed_until = NULL, last_error = NULL WHERE id = $1 AND state = $5",
            claim,
            6,
        )
        row = await self._db.fetchrow(
            f"{query} RETURNING id", entry_id, DELIVERED, attempts, now_ms, PENDING, *extra
        )
        return row is not None

    async def mark_retry(
        self,
        entry_id: str,
        attempts: int,
        next_attempt_ts: int,
        error: str,
        *,
        claim: int | None = None,
    ) -> bool:
        """It failed for now; try again at ``next_attempt_ts`` (see :meth:`mark_delivered`)."""
        query, extra = self._guarded(
            "UPDATE onbind_outbox SET attempts = $2, next_attempt_ts = $3, last_error = $4,"
            " claimed_until = NULL WHERE id = $1 AND state = $5",
            claim,
            6,
        )
        row = await self._db.fetchrow(
            f"{query} RETURNING id", entry_id, attempts, next_attempt_ts, error, PENDING, *extra
        )
        return row is not None

    async def mark_failed(
        self, entry_id: str, attempts: int, error: str, *, claim: int | None = None
    ) -> bool:
        """It will not be delivered: permanent refusal, or too old (see :meth:`mark_delivered`)."""
        query, extra = self._guarded(
            "UPDATE onbind_outbox SET state = $2, attempts = $3, last_error = $4,"
            " claimed_until = NULL WHERE id = $1 AND state = $5",
            claim,
            6,
        )
        row = await self._db.fetchrow(
            f"{query} RETURNING id", entry_id, FAILED, attempts, error, PENDING, *extra
        )
        return row is not None

    async def for_invite(self, invite_id: str) -> list[OutboxEntry]:
        """The notifications of one invite."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM onbind_outbox WHERE invite_id = $1 ORDER BY created_ts",
            invite_id,
        )
        return [_entry(row) for row in rows]

    async def requeue(self, invite_id: str, now_ms: int) -> int:
        """Make the failed or pending notifications of an invite due now (a fresh give-up age).

        A claim in progress is kept: the worker holding it finishes its attempt and records it.
        """
        rows = await self._db.fetch(
            "UPDATE onbind_outbox SET state = $2, next_attempt_ts = $3, created_ts = $3"
            " WHERE invite_id = $1 AND state <> $4 RETURNING id",
            invite_id,
            PENDING,
            now_ms,
            DELIVERED,
        )
        return len(rows)

    async def count_by_state(self) -> dict[str, int]:
        """How many entries are in each state."""
        rows = await self._db.fetch("SELECT state, COUNT(*) AS n FROM onbind_outbox GROUP BY state")
        return {row["state"]: int(row["n"]) for row in rows}
