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
        self._stopping = False

    def start(self) -> None:
        """Start the loop in the running event loop."""
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._loop(), name=f"job:{self.name}")

    def wake(self) -> None:
        """Run the work now instead of waiting for the interval."""
        self._wake.set()

    async def run_once(self) -> object:
        """Do the work once (for tests and commands)."""
        return await self._work()

    @property
    def running(self) -> bool:
        """Whether the loop is started (and not stopped)."""
        return self._task is not None

    async def stop(self, grace_s: float = 10.0) -> bool:
        """Stop the loop: a run in progress may finish (within ``grace_s``), then it is cancelled.

        Letting the current run finish matters: work claimed with a lease (outbox rows, room
        actions) would otherwise stay claimed until the lease ends. Returns False when a run had
        to be cancelled.
        """
        if self._task is None:
            return True
        self._stopping = True
        self._wake.set()
        finished = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s)
        except TimeoutError:
            log.warning("background job %s did not finish in %.0fs; cancelling", self.name, grace_s)
            finished = False
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        return finished

    async def _loop(self) -> None:
        while not self._stopping:
            # Cleared before the run, so a wake() during the run triggers the next one at once.
            self._wake.clear()
            try:
                await self._work()
            except Exception:  # a failed run must not end the job; it is retried next interval
                log.exception("background job %s failed", self.name)
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
