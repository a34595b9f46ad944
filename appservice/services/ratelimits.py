"""Rate limits counted in the database (fixed windows), so they hold across instances."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from appservice.clock import Clock
from appservice.config import RateLimit
from appservice.db.ratelimits import RateLimitStore
from appservice.errors import MatrixError
from appservice.metrics import Metrics

# Buckets remembered as over their limit; the memory is cleared when it grows past this.
_EXHAUSTED_MAX = 10_000

# (name, key, limit): one event to count.
Event = tuple[str, str, RateLimit]


class RateLimiter:
    """Counts events per key and refuses the ones over the limit.

    A bucket found over its limit is also remembered in this process until its window ends:
    further events for it are refused at once, without counting them (they could not change the
    answer) and before the caller starts any work, such as an SMTP transaction for a mail the
    refusal would drop.
    """

    def __init__(self, store: RateLimitStore, clock: Clock, metrics: Metrics | None = None) -> None:
        self._store = store
        self._clock = clock
        self._refusals = (metrics if metrics is not None else Metrics()).ratelimit_refusals
        # bucket -> end of the window (ms) in which it went over its limit
        self._exhausted: dict[str, int] = {}

    async def hit(self, name: str, key: str, limit: RateLimit, count: int = 1) -> None:
        """Count ``count`` events for ``key``; 429 M_LIMIT_EXCEEDED when over ``limit``."""
        await self.hit_all([(name, key, limit)], count)

    def refuse_if_exhausted(self, events: Sequence[Event]) -> None:
        """429 M_LIMIT_EXCEEDED at once, without the database, when one of the buckets is known
        to be over its limit in the current window."""
        if self._exhausted:
            now = self._clock.now_ms()
            self._refuse_known(events, self._windows(events, now), now)

    async def hit_all(self, events: Sequence[Event], count: int = 1) -> None:
        """Count ``count`` events (one request; a bulk request may weigh more) under each
        (name, key, limit) in one database round trip; 429 M_LIMIT_EXCEEDED (with the longest
        wait) when any is over its limit. A refused request counts too."""
        now = self._clock.now_ms()
        windows = self._windows(events, now)
        self._refuse_known(events, windows, now)
        hits = await self._store.hit(windows, count)
        over = [
            (window, name)
            for window, (name, _key, limit) in zip(windows, events, strict=True)
            if hits[window[0]] > limit.limit
        ]
        if over:
            if len(self._exhausted) >= _EXHAUSTED_MAX:
                self._exhausted.clear()
            self._exhausted.update((bucket, end) for (bucket, _start, end), _name in over)
        self._refuse(over, now)

    def _refuse_known(
        self, events: Sequence[Event], windows: Sequence[tuple[str, int, int]], now: int
    ) -> None:
        """429 when one of ``windows`` is remembered as over its limit."""
        if self._exhausted:
            self._refuse(
                [
                    (window, name)
                    for window, (name, _key, _limit) in zip(windows, events, strict=True)
                    if self._exhausted.get(window[0], 0) > now
                ],
                now,
            )

    def _refuse(self, over: Sequence[tuple[tuple[str, int, int], str]], now: int) -> None:
        """Count the refusal under each limit it broke, then raise it (if any)."""
        if over:
            for name in {name for _window, name in over}:
                self._refusals.labels(name).inc()
            self._raise_after([window for window, _name in over], now)

    @staticmethod
    def _windows(events: Sequence[Event], now: int) -> list[tuple[str, int, int]]:
        """(bucket, window start, window end) of each event at ``now``."""
        windows = []
        for name, key, limit in events:
            period_ms = max(1, int(limit.period * 1000))
            window_start = now - now % period_ms
            # Hashed, so the table holds no addresses or IPs in plain text.
            bucket = hashlib.sha256(f"{name}\0{key}".encode()).hexdigest()
            windows.append((bucket, window_start, window_start + period_ms))
        return windows

    @staticmethod
    def _raise_after(over: Sequence[tuple[str, int, int]], now: int) -> None:
        """429 with the longest wait among the ``over`` windows, if any."""
        retry_after_ms = max((end - now for _bucket, _start, end in over), default=None)
        if retry_after_ms is not None and retry_after_ms > 0:
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
