"""Rate limits counted in the database (fixed windows), so they hold across instances."""

from __future__ import annotations

import hashlib
import math

from appservice.clock import Clock
from appservice.config import RateLimit
from appservice.db.ratelimits import RateLimitStore
from appservice.errors import MatrixError


class RateLimiter:
    """Counts events per key and refuses the ones over the limit."""

    def __init__(self, store: RateLimitStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def hit(self, name: str, key: str, limit: RateLimit) -> None:
        """Count an event for ``key``; 429 M_LIMIT_EXCEEDED when over ``limit``."""
        now = self._clock.now_ms()
        period_ms = max(1, int(limit.period * 1000))
        window_start = now - now % period_ms
        window_end = window_start + period_ms
        # Hashed, so the table holds no addresses or IPs in plain text.
        bucket = hashlib.sha256(f"{name}\0{key}".encode()).hexdigest()
        hits = await self._store.hit(bucket, window_start, window_end)
        if hits > limit.limit:
            retry_after_ms = window_end - now
            raise MatrixError(
                429,
                "M_LIMIT_EXCEEDED",
                "Too many requests; try again later",
                headers={"Retry-After": str(math.ceil(retry_after_ms / 1000))},
                retry_after_ms=retry_after_ms,
            )

    async def purge(self) -> int:
        """Forget finished windows."""
        return await self._store.purge_expired(self._clock.now_ms())
