"""Run a coroutine function every so often until stopped; failures are logged, not fatal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class PeriodicJob:
    """Calls ``work`` every ``interval_s`` seconds (first call right after start)."""

    def __init__(self, name: str, interval_s: float, work: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self._interval = interval_s
        self._work = work
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        """Start the loop in the running event loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"job:{self.name}")

    def wake(self) -> None:
        """Run the work now instead of waiting for the interval."""
        self._wake.set()

    async def run_once(self) -> object:
        """Do the work once (for tests and commands)."""
        return await self._work()

    async def stop(self) -> None:
        """Stop the loop and wait for it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed run must not end the job; it is retried next interval
                log.exception("background job %s failed", self.name)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
