"""Fixed-window rate-limit counters shared by all instances."""

from __future__ import annotations

from appservice.db.database import AppDatabase


class RateLimitStore:
    """SQL for the ``rate_limits`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def hit(self, bucket: str, window_start: int, expires_ts: int) -> int:
        """Count one event in a window; returns the events in that window including this one."""
        value = await self._db.fetchval(
            "INSERT INTO rate_limits (bucket, window_start, hits, expires_ts)"
            " VALUES ($1, $2, 1, $3) ON CONFLICT (bucket, window_start)"
            " DO UPDATE SET hits = rate_limits.hits + 1 RETURNING hits",
            bucket,
            window_start,
            expires_ts,
        )
        return int(value)

    async def purge_expired(self, now_ms: int) -> int:
        """Delete finished windows; returns how many."""
        rows = await self._db.fetch(
            "DELETE FROM rate_limits WHERE expires_ts < $1 RETURNING bucket", now_ms
        )
        return len(rows)
