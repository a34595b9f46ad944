"""The durable outbox of onbind notifications, claimed by workers with a lease."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appservice.db.database import AppDatabase
from appservice.db.work_queue import FAILED, PENDING, LeasedQueue

DELIVERED = "delivered"
__all__ = ["DELIVERED", "FAILED", "PENDING", "OutboxEntry", "OutboxStore"]


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
    # The worker (process) holding it, while claimed.
    claimed_by: str | None = None


_COLUMNS = (
    "id, invite_id, destination, body, state, created_ts, next_attempt_ts, attempts,"
    " claimed_until, last_error, delivered_ts, claimed_by"
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
        claimed_by=row["claimed_by"],
    )


class OutboxStore:
    """SQL for the ``onbind_outbox`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db
        self._queue = LeasedQueue(db, "onbind_outbox", _COLUMNS, DELIVERED, "delivered_ts")

    @property
    def db(self) -> AppDatabase:
        """The database it lives in."""
        return self._db

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

    async def claim_due(
        self, owner: str, now_ms: int, lease_ms: int, limit: int
    ) -> list[OutboxEntry]:
        """Claim up to ``limit`` due entries for ``owner`` until ``now + lease``, leaving out
        those to homeservers that are backed off (see :meth:`claim_probe`)."""
        rows = await self._queue.claim_due(
            owner,
            now_ms,
            lease_ms,
            limit,
            where=" AND destination NOT IN"
            " (SELECT destination FROM onbind_destinations WHERE failures > 0)",
        )
        return sorted((_entry(row) for row in rows), key=lambda e: (e.next_attempt_ts, e.id))

    async def claim_probe(
        self, owner: str, destination: str, now_ms: int, lease_ms: int
    ) -> OutboxEntry | None:
        """Claim the next entry to a backed-off homeserver, due or not, to probe it with."""
        rows = await self._queue.claim_due(
            owner,
            now_ms,
            lease_ms,
            1,
            where=" AND destination = $6",
            values=(destination,),
            due_only=False,
        )
        return _entry(rows[0]) if rows else None

    async def renew_claim(self, entry_id: str, owner: str, new_until: int) -> bool:
        """Extend ``owner``'s claim right before an attempt; False if the claim was lost."""
        return await self._queue.renew_claim(entry_id, owner, new_until)

    async def heartbeat(self, owner: str, new_until: int) -> int:
        """Extend the leases of everything ``owner`` holds."""
        return await self._queue.heartbeat(owner, new_until)

    async def release(self, owner: str) -> int:
        """Give back everything ``owner`` holds and has not finished."""
        return await self._queue.release(owner)

    async def release_one(self, entry_id: str, owner: str) -> bool:
        """Give back one entry ``owner`` claimed and did not start."""
        return await self._queue.release_one(entry_id, owner)

    async def claimed_count(self) -> int:
        """Entries claimed now, by any worker."""
        return await self._queue.claimed_count()

    async def fail_unclaimed_before(self, destination: str, cutoff_ms: int, error: str) -> int:
        """Give up the unclaimed entries to ``destination`` queued before ``cutoff_ms`` (the
        homeserver was unreachable for longer than the give-up age); how many."""
        rows = await self._db.fetch(
            "UPDATE onbind_outbox SET state = $4, last_error = $5"
            " WHERE destination = $1 AND state = $2 AND created_ts < $3"
            " AND claimed_by IS NULL RETURNING id",
            destination,
            PENDING,
            cutoff_ms,
            FAILED,
            error,
        )
        return len(rows)

    async def mark_delivered(
        self, entry_id: str, attempts: int, now_ms: int, *, claim: str | None = None
    ) -> bool:
        """The homeserver accepted it (under ``claim``, the worker's ``claimed_until``)."""
        return await self._queue.finish(entry_id, attempts, now_ms, claim=claim)

    async def mark_retry(
        self,
        entry_id: str,
        attempts: int,
        next_attempt_ts: int,
        error: str,
        *,
        claim: str | None = None,
    ) -> bool:
        """It failed for now; try again at ``next_attempt_ts``."""
        return await self._queue.retry(entry_id, attempts, next_attempt_ts, error, claim=claim)

    async def mark_failed(
        self, entry_id: str, attempts: int, error: str, *, claim: str | None = None
    ) -> bool:
        """It will not be delivered: permanent refusal, or too old."""
        return await self._queue.fail(entry_id, attempts, error, claim=claim)

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

    async def pending_summary(self) -> tuple[int, int | None]:
        """(entries pending, queue time of the oldest in ms or None): read through the index on
        state, touching only the pending rows."""
        row = await self._db.fetchrow(
            "SELECT COUNT(*) AS n, MIN(created_ts) AS oldest FROM onbind_outbox WHERE state = $1",
            PENDING,
        )
        if row is None:
            return 0, None
        oldest = row["oldest"]
        return int(row["n"]), None if oldest is None else int(oldest)

    async def count_by_state(self) -> dict[str, int]:
        """How many entries are in each state."""
        rows = await self._db.fetch("SELECT state, COUNT(*) AS n FROM onbind_outbox GROUP BY state")
        return {row["state"]: int(row["n"]) for row in rows}
