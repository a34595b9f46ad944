"""Rows that workers on any instance claim with a lease, then finish, retry or fail.

A table used as a queue has the columns ``id``, ``state``, ``next_attempt_ts``, ``attempts``,
``claimed_until``, ``last_error`` and a column for when it finished. A worker claims due rows
by setting ``claimed_until`` (on PostgreSQL with ``FOR UPDATE SKIP LOCKED``, so two instances
never claim the same row; SQLite serialises writers). Every later update names the claim (the
``claimed_until`` value the worker set), so a worker whose lease ran out cannot overwrite what
another worker did since. A crashed worker's rows become due again when its lease ends.
"""

from __future__ import annotations

from typing import Any

from appservice.db.database import AppDatabase

PENDING = "pending"
FAILED = "failed"


class LeasedQueue:
    """Claim/renew/finish/retry/fail for one queue table."""

    def __init__(
        self, db: AppDatabase, table: str, columns: str, done_state: str, finished_column: str
    ) -> None:
        self._db = db
        self._table = table
        self._columns = columns
        self._done_state = done_state
        self._finished_column = finished_column

    async def claim_due(self, now_ms: int, lease_ms: int, limit: int) -> list[Any]:
        """Claim up to ``limit`` due rows until ``now + lease``; the rows (``columns``)."""
        lock = " FOR UPDATE SKIP LOCKED" if self._db.is_postgres else ""
        return await self._db.fetch(
            f"UPDATE {self._table} SET claimed_until = $2 WHERE id IN ("
            f" SELECT id FROM {self._table} WHERE state = $3 AND next_attempt_ts <= $1"
            f" AND (claimed_until IS NULL OR claimed_until <= $1)"
            f" ORDER BY next_attempt_ts, id LIMIT $4{lock}) RETURNING {self._columns}",
            now_ms,
            now_ms + lease_ms,
            PENDING,
            limit,
        )

    async def renew_claim(self, row_id: str, claim: int, new_until: int) -> bool:
        """Extend this worker's claim before an attempt; False if the claim was lost."""
        row = await self._db.fetchrow(
            f"UPDATE {self._table} SET claimed_until = $3"
            f" WHERE id = $1 AND claimed_until = $2 AND state = $4 RETURNING id",
            row_id,
            claim,
            new_until,
            PENDING,
        )
        return row is not None

    async def _update(self, sets: str, row_id: str, claim: int | None, *values: Any) -> bool:
        """``UPDATE … SET sets`` on a pending row (and, with ``claim``, only under that claim);
        ``values`` are ``$3``, ``$4``…"""
        guard = "" if claim is None else f" AND claimed_until = ${len(values) + 3}"
        row = await self._db.fetchrow(
            f"UPDATE {self._table} SET {sets}, claimed_until = NULL"
            f" WHERE id = $1 AND state = $2{guard} RETURNING id",
            row_id,
            PENDING,
            *values,
            *([] if claim is None else [claim]),
        )
        return row is not None

    async def finish(
        self, row_id: str, attempts: int, now_ms: int, *, claim: int | None = None
    ) -> bool:
        """Done; False when the row was no longer ours to change."""
        return await self._update(
            f"state = $3, attempts = $4, {self._finished_column} = $5, last_error = NULL",
            row_id,
            claim,
            self._done_state,
            attempts,
            now_ms,
        )

    async def retry(
        self,
        row_id: str,
        attempts: int,
        next_attempt_ts: int,
        error: str,
        *,
        claim: int | None = None,
    ) -> bool:
        """Failed for now; due again at ``next_attempt_ts``."""
        return await self._update(
            "attempts = $3, next_attempt_ts = $4, last_error = $5",
            row_id,
            claim,
            attempts,
            next_attempt_ts,
            error,
        )

    async def fail(
        self, row_id: str, attempts: int, error: str, *, claim: int | None = None
    ) -> bool:
        """Will not be done (permanent refusal, or too old)."""
        return await self._update(
            "state = $3, attempts = $4, last_error = $5", row_id, claim, FAILED, attempts, error
        )
