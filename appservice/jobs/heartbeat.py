"""Keeping leases alive while a worker holds claimed rows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def heartbeat(
    name: str, renew: Callable[[], Awaitable[object]], interval_s: float
) -> AsyncIterator[None]:
    """Call ``renew`` every ``interval_s`` seconds while the block runs.

    A failed renewal is logged and tried again at the next beat: the leases are a few beats
    long, so one missed beat loses nothing.
    """

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await renew()
            except Exception as e:  # the database hiccupped: the next beat tries again
                log.warning("%s: could not renew leases: %s", name, e)

    task = asyncio.create_task(beat(), name=f"heartbeat:{name}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
