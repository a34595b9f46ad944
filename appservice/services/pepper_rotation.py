"""Rotating the lookup pepper while lookups go on (`pepper rotate`, `lookup.pepper_rotation`).

A rotation, by the one instance (or command) holding the lease in ``lookup_pepper``:

1. ``begin``: a new pepper becomes the *next* one. Every instance reads the state within
   :data:`~appservice.services.lookup.PEPPER_STATE_TTL_S` and from then on writes new bindings and
   store copies with both the current and the next hash.
2. Every row of ``bindings`` and ``store_threepids`` gets the next pepper's hash in its other
   slot, in batches of :data:`BATCH` rows, each its own short transaction; lookups keep reading
   the current slot meanwhile (and nothing they read changes).
3. ``switch``, in one statement that also checks no row lacks its new hash: the next pepper is
   advertised; the previous one is answered from its slot until ``lookup.pepper_grace`` ends.

A rotation interrupted (the process stopped) keeps its next pepper; the next ``pepper rotate`` or
a server's rotation job (every :data:`CHECK_INTERVAL_S`) resumes it once the lease ran out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appservice.clock import Clock
from appservice.config import LookupConfig
from appservice.crypto.hashing import new_pepper
from appservice.db.lookup_peppers import HASHED_TABLES, LookupHashes, PepperState, PepperStore
from appservice.services.lookup import PEPPER_STATE_TTL_S

log = logging.getLogger(__name__)

# Rows rehashed per transaction: short enough that a bind waits at most a few milliseconds.
BATCH = 1000
# How long the lease lasts without being renewed (it is renewed every batch).
LEASE_MS = 60_000
# How often each instance checks whether a scheduled rotation is due (or one was abandoned).
CHECK_INTERVAL_S = 60.0
# After the next pepper is set, the switch waits this long (monotonic seconds), so that every
# instance writes both hashes before the last check that no row lacks its new hash.
SETTLE_S = PEPPER_STATE_TTL_S * 1.5
# Passes over rows written meanwhile, before the rotation gives up (and leaves it to be resumed).
_MAX_SWITCH_ATTEMPTS = 20


class RotationRefused(Exception):
    """A rotation cannot start now; ``str()`` says why."""


@dataclass(frozen=True)
class RotationResult:
    """One finished rotation."""

    generation: int
    rows: int
    seconds: float
    resumed: bool


def instance_id() -> str:
    """Who holds the lease: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class PepperRotation:
    """Rotates the lookup pepper: by hand (:meth:`rotate`) or on schedule (:meth:`rotate_due`)."""

    def __init__(
        self,
        peppers: PepperStore,
        config: LookupConfig,
        clock: Clock,
        *,
        owner: str | None = None,
        on_switched: Callable[[], Awaitable[object]] | None = None,
        batch: int = BATCH,
    ) -> None:
        self._peppers = peppers
        self._config = config
        self._clock = clock
        self._owner = owner or instance_id()
        self._on_switched = on_switched
        self._batch = batch

    async def rotate(self) -> RotationResult:
        """Rotate now, or finish a rotation whose holder went away; :class:`RotationRefused`
        while the previous pepper is in its grace or another instance is rotating."""
        now = self._clock.now_ms()
        state = await self._peppers.load()
        if not state.rotating and now < state.grace_until_ts:
            raise RotationRefused(
                f"the previous pepper is answered until {_iso(state.grace_until_ts)} "
                "(lookup.pepper_grace); rotate again after that"
            )
        claimed = await self._peppers.claim(self._owner, now, LEASE_MS)
        if claimed is None:
            raise RotationRefused(
                f"a rotation is running ({state.claimed_by}, lease until "
                f"{_iso(state.claimed_until)})"
            )
        try:
            return await self._run(claimed)
        finally:
            await self._peppers.release(self._owner)

    async def rotate_due(self) -> RotationResult | None:
        """The scheduled check: resume an abandoned rotation, or rotate when the pepper is older
        than ``lookup.pepper_rotation``; None when there is nothing to do."""
        state = await self._peppers.load()
        now = self._clock.now_ms()
        if state.claimed_until >= now:
            return None
        interval = self._config.pepper_rotation
        due = (
            interval is not None
            and now - state.since_ts >= interval * 1000
            and now >= state.grace_until_ts
        )
        if not state.rotating and not due:
            return None
        try:
            result = await self.rotate()
        except RotationRefused as e:  # another instance was quicker
            log.info("scheduled pepper rotation skipped: %s", e)
            return None
        return result

    async def _run(self, state: PepperState) -> RotationResult:
        started = time.monotonic()
        resumed = state.rotating
        if not resumed:
            begun = await self._peppers.begin(self._owner, new_pepper(), self._clock.now_ms())
            if begun is None:
                raise RotationRefused("the rotation state changed; try again")
            state = begun
            log.info("pepper rotation to generation %d started", state.generation + 1)
        else:
            log.info("resuming the pepper rotation to generation %d", state.generation + 1)
        settled = started + SETTLE_S
        rows = 0
        for table in HASHED_TABLES:
            rows += await self._rehash(state, table, ("",) * len(HASHED_TABLES[table]))
        for _ in range(_MAX_SWITCH_ATTEMPTS):
            await asyncio.sleep(max(0.0, settled - time.monotonic()))
            for table in HASHED_TABLES:  # rows written by instances that did not know yet
                rows += await self._rehash(state, table, None)
            switched = await self._peppers.switch(
                self._owner, self._clock.now_ms(), int(self._config.pepper_grace * 1000)
            )
            if switched is not None:
                break
        else:
            raise RotationRefused("rows kept arriving without their new hash; resumed later")
        # Rows a writer committed between the last pass and the switch: both peppers are known.
        for table in HASHED_TABLES:
            rows += await self._rehash(switched, table, None)
        await self._peppers.rebase_store_sync(state.pepper, switched.pepper)
        if self._on_switched is not None:
            await self._on_switched()
        seconds = time.monotonic() - started
        log.info(
            "pepper rotated to generation %d: %d rows rehashed in %.1f s; the previous pepper is "
            "answered until %s",
            switched.generation,
            rows,
            seconds,
            _iso(switched.grace_until_ts),
        )
        return RotationResult(switched.generation, rows, seconds, resumed)

    async def _rehash(self, state: PepperState, table: str, after: tuple[Any, ...] | None) -> int:
        """Give every row of ``table`` below the state's newest generation its hashes: one pass
        in key order from ``after``, or (None) until no such row is left. Renews the lease."""
        target = state.generation + 1 if state.rotating else state.generation
        done = 0
        while True:
            rows = await self._peppers.rows_below(table, target, self._batch, after)
            if not rows:
                return done
            updates = []
            for row in rows:
                key = tuple(row[i] for i in range(len(row) - 1))
                hashes = state.hashes(key[-2], key[-1])
                if row[-1] == state.generation:  # the current slot is right: keep it
                    slots = list(hashes.slots)
                    slots[state.generation % 2] = None
                    hashes = LookupHashes((slots[0], slots[1]), hashes.generation)
                updates.append((key, hashes))
            await self._peppers.write_hashes(table, updates)
            done += len(rows)
            if after is not None:
                after = updates[-1][0]
            if await self._peppers.claim(self._owner, self._clock.now_ms(), LEASE_MS) is None:
                raise RotationRefused("the rotation lease was lost (another instance took over)")


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
