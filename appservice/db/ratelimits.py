"""Fixed-window rate-limit counters shared by all instances."""

from __future__ import annotations

from collections.abc import Sequence

from appservice.db.database import AppDatabase


class RateLimitStore:
    """SQL for the ``rate_limits`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def hit(self, windows: Sequence[tuple[str, int, int]], count: int = 1) -> dict[str, int]:
        """Count ``count`` events in each (bucket, window_start, expires_ts), in one statement;
        the events in each bucket's window including these. Buckets must be distinct."""
        values = ", ".join(
            f"(${3 * i + 2}, ${3 * i + 3}, $1, ${3 * i + 4})" for i in range(len(windows))
        )
        rows = await self._db.fetch(
            "INSERT INTO rate_limits (bucket, window_start, hits, expires_ts)"
            f" VALUES {values} ON CONFLICT (bucket, window_start)"
            " DO UPDATE SET hits = rate_limits.hits + excluded.hits RETURNING bucket, hits",
            count,
            *(value for window in windows for value in window),
        )
        return {row["bucket"]: int(row["hits"]) for row in rows}

    async def purge_expired(self, now_ms: int) -> int:
        """Delete finished windows; returns how many."""
        rows = await self._db.fetch(
            "DELETE FROM rate_limits WHERE expires_ts < $1 RETURNING bucket", now_ms
        )
        return len(rows)
