"""Time, injected so that tests can move it instead of sleeping."""

from __future__ import annotations

import time


class Clock:
    """Wall-clock time."""

    def time(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    def now_ms(self) -> int:
        """Milliseconds since the epoch, as Matrix timestamps are."""
        return int(self.time() * 1000)


class FakeClock(Clock):
    """A clock that only moves when told to (for tests)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self._now += seconds
