"""Rows that workers on any instance claim with a short lease, then finish, retry or fail.

A table used as a queue has the columns ``id``, ``state``, ``next_attempt_ts``, ``attempts``,
``claimed_by``, ``claimed_until``, ``last_error`` and a column for when it finished. A worker
claims due rows by writing its owner id (one per process and queue) and a lease end (on
PostgreSQL with ``FOR UPDATE SKIP LOCKED``, so two instances never claim the same row; SQLite
serialises writers). While it works, the worker renews the leases of all its rows in one
statement (:meth:`LeasedQueue.heartbeat`), so leases can be short: a killed worker's rows are
due again seconds after its last heartbeat. Every later update names the owner, so a worker
whose lease ran out and whose rows another worker took cannot overwrite what that one did. A
worker that stops releases the rows it claimed but did not start (:meth:`LeasedQueue.release`).
"""

from __future__ import annotations

from collections.abc import Sequence
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

    async def claim_due(
        self,
        owner: str,
        now_ms: int,
        lease_ms: int,
        limit: int,
        *,
        where: str = "",
        values: Sequence[Any] = (),
        due_only: bool = True,
    ) -> list[Any]:
        """Claim up to ``limit`` due, unclaimed rows for ``owner`` until ``now + lease``; the
        rows (``columns``). ``where`` narrows the rows with SQL whose parameters ``values``
        are ``$6``, ``$7``... (e.g. ``" AND destination = $6"``); ``due_only=False`` also
        claims rows whose ``next_attempt_ts`` is still ahead (to probe with one)."""
        lock = " FOR UPDATE SKIP LOCKED" if self._db.is_postgres else ""
        due = " AND next_attempt_ts <= $1" if due_only else ""
        return await self._db.fetch(
            f"UPDATE {self._table} SET claimed_until = $2, claimed_by = $5 WHERE id IN ("
            f" SELECT id FROM {self._table} WHERE state = $3{due}"
            f" AND (claimed_until IS NULL OR claimed_until <= $1){where}"
            f" ORDER BY next_attempt_ts, id LIMIT $4{lock}) RETURNING {self._columns}",
            now_ms,
            now_ms + lease_ms,
            PENDING,
            limit,
            owner,
            *values,
        )

    async def renew_claim(self, row_id: str, owner: str, new_until: int) -> bool:
        """Extend ``owner``'s claim on one row right before working on it; False if the row is
        no longer ``owner``'s (its lease ran out and another worker took it) or no longer
        pending."""
        row = await self._db.fetchrow(
            f"UPDATE {self._table} SET claimed_until = $3"
            f" WHERE id = $1 AND claimed_by = $2 AND state = $4 RETURNING id",
            row_id,
            owner,
            new_until,
            PENDING,
        )
        return row is not None

    async def heartbeat(self, owner: str, new_until: int) -> int:
        """Extend the lease of every pending row ``owner`` holds; how many there were."""
        rows = await self._db.fetch(
            f"UPDATE {self._table} SET claimed_until = $2"
            f" WHERE claimed_by = $1 AND state = $3 AND claimed_until IS NOT NULL RETURNING id",
            owner,
            new_until,
            PENDING,
        )
        return len(rows)

    async def release(self, owner: str) -> int:
        """Give back every pending row ``owner`` holds (due again at once for any worker);
        how many there were."""
        rows = await self._db.fetch(
            f"UPDATE {self._table} SET claimed_until = NULL, claimed_by = NULL"
            f" WHERE claimed_by = $1 AND state = $2 RETURNING id",
            owner,
            PENDING,
        )
        return len(rows)

    async def release_one(self, row_id: str, owner: str) -> bool:
        """Give back one row ``owner`` holds and did not start."""
        row = await self._db.fetchrow(
            f"UPDATE {self._table} SET claimed_until = NULL, claimed_by = NULL"
            f" WHERE id = $1 AND claimed_by = $2 AND state = $3 RETURNING id",
            row_id,
            owner,
            PENDING,
        )
        return row is not None

    async def claimed_count(self) -> int:
        """Rows claimed now, by anyone (after a clean stop of every worker: 0)."""
        value = await self._db.fetchval(
            f"SELECT COUNT(*) FROM {self._table} WHERE state = $1 AND claimed_by IS NOT NULL",
            PENDING,
        )
        return int(value or 0)

    async def _update(self, sets: str, row_id: str, claim: str | None, *values: Any) -> bool:
        """``UPDATE … SET sets`` on a pending row (and, with ``claim``, only if that owner holds
        it); ``values`` are ``$3``, ``$4``…"""
        guard = "" if claim is None else f" AND claimed_by = ${len(values) + 3}"
        row = await self._db.fetchrow(
            f"UPDATE {self._table} SET {sets}, claimed_until = NULL, claimed_by = NULL"
            f" WHERE id = $1 AND state = $2{guard} RETURNING id",
            row_id,
            PENDING,
            *values,
            *([] if claim is None else [claim]),
        )
        return row is not None

    async def finish(
        self, row_id: str, attempts: int, now_ms: int, *, claim: str | None = None
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
        claim: str | None = None,
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
        self, row_id: str, attempts: int, error: str, *, claim: str | None = None
    ) -> bool:
        """Will not be done (permanent refusal, or too old)."""
        return await self._update(
            "state = $3, attempts = $4, last_error = $5", row_id, claim, FAILED, attempts, error
        )
