"""Concurrent small keyed reads merged into one statement (PostgreSQL's hot lookups).

Under load, many single-hash lookups are waiting at once, and on PostgreSQL each costs a pooled
connection, a socket write and a wake-up of a server backend, more than the index probe itself.
A ``ReadCoalescer`` collects the keys that requests ask for during one turn of the event loop and
reads them all with one ``= ANY($1)`` statement on the next; each caller gets the rows of its own
keys. With one request at a time nothing waits longer than that one turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

# Requests with more keys than this are read on their own: merging gains them nothing.
MAX_MERGED_REQUEST = 64


class ReadCoalescer:
    """Merges concurrent ``read(keys)`` calls into one ``fetch(all keys)`` per event-loop turn.

    ``fetch`` maps the keys that exist to their values; keys it does not return are absent.
    """

    def __init__(self, fetch: Callable[[list[str]], Awaitable[dict[str, str]]]) -> None:
        self._fetch = fetch
        self._waiting: list[tuple[Sequence[str], asyncio.Future[dict[str, str]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def read(self, keys: Sequence[str]) -> dict[str, str]:
        """The values of those of ``keys`` that exist."""
        if len(keys) > MAX_MERGED_REQUEST:
            return await self._fetch(list(keys))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, str]] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((keys, future))
        return await future

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)  # a reference until it ends
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Sequence[str], asyncio.Future[dict[str, str]]]]) -> None:
        keys = list(dict.fromkeys(key for request, _ in batch for key in request))
        try:
            found = await self._fetch(keys)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for request, future in batch:
            if not future.done():  # its caller may have been cancelled
                future.set_result({key: found[key] for key in request if key in found})
