"""Rate limits counted in the database (fixed windows), so they hold across instances."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

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
        await self.hit_all([(name, key, limit)])

    async def hit_all(self, events: Sequence[tuple[str, str, RateLimit]]) -> None:
        """Count one event under each (name, key, limit) in one database round trip; 429
        M_LIMIT_EXCEEDED (with the longest wait) when any is over its limit."""
        now = self._clock.now_ms()
        windows: list[tuple[str, int, int]] = []
        for name, key, limit in events:
            period_ms = max(1, int(limit.period * 1000))
            window_start = now - now % period_ms
            # Hashed, so the table holds no addresses or IPs in plain text.
            bucket = hashlib.sha256(f"{name}\0{key}".encode()).hexdigest()
            windows.append((bucket, window_start, window_start + period_ms))
        hits = await self._store.hit(windows)
        retry_after_ms = max(
            (
                end - now
                for (bucket, _start, end), (_name, _key, limit) in zip(windows, events, strict=True)
                if hits[bucket] > limit.limit
            ),
            default=None,
        )
        if retry_after_ms is not None:
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
