"""Gauges read from the database at scrape time: invites by state, the onbind outbox, the pool.

A scrape never waits for more than one small indexed query per gauge group, and not even that
when the last reading is younger than ``max_age_s``: Prometheus scrapes every 15 to 60 s, and
several scrapers (or a dashboard refreshing) must not multiply the load. Every instance reads
the same shared tables, so each exports the same invite and outbox figures; the pool figures are
its own.
"""

from __future__ import annotations

import asyncio
import logging

from appservice.clock import Clock
from appservice.db.database import AppDatabase
from appservice.db.destinations import DestinationStore
from appservice.db.invites import BOUND, EXPIRED, PENDING, InviteStore
from appservice.db.outbox import OutboxStore
from appservice.metrics import Metrics

log = logging.getLogger(__name__)

INVITE_STATES = (PENDING, BOUND, EXPIRED)
# A scrape that cannot get its figures in time keeps the last ones rather than hanging.
QUERY_TIMEOUT_S = 5.0


class DatabaseGauges:
    """Fills the database-derived gauges of ``metrics``, at most once per ``max_age_s``."""

    def __init__(
        self,
        db: AppDatabase,
        invites: InviteStore,
        outbox: OutboxStore,
        metrics: Metrics,
        clock: Clock,
        *,
        max_age_s: float = 15.0,
    ) -> None:
        self._db = db
        self._invites = invites
        self._outbox = outbox
        self._metrics = metrics
        self._clock = clock
        self._max_age_s = max_age_s
        self._read_at_ms: int | None = None
        self._lock = asyncio.Lock()
        self._failing = False
        # Kept between readings: the age is worked out at each scrape.
        self._oldest_pending_ms: int | None = None

    async def refresh(self) -> None:
        """Read the figures again if the last reading is too old (concurrent scrapes share one
        reading); a failure is logged once and the previous figures stay."""
        self._pool()
        async with self._lock:
            now_ms = self._clock.now_ms()
            if self._read_at_ms is not None and now_ms - self._read_at_ms < self._max_age_s * 1000:
                return
            try:
                await asyncio.wait_for(self._read(), QUERY_TIMEOUT_S)
            except Exception as e:  # the database is down: /health/ready says so
                if not self._failing:
                    log.warning("metrics: cannot read the database gauges: %s", e)
                self._failing = True
                return
            self._failing = False
            self._read_at_ms = now_ms
        oldest = self._oldest_pending_ms
        age_s = 0.0 if oldest is None else max(0, self._clock.now_ms() - oldest) / 1000
        self._metrics.onbind_oldest_pending_age.set(age_s)

    async def _read(self) -> None:
        counts = await self._invites.count_by_state()
        for state in {*INVITE_STATES, *counts}:
            self._metrics.invites.labels(state).set(counts.get(state, 0))
        pending, self._oldest_pending_ms = await self._outbox.pending_summary()
        self._metrics.onbind_pending.set(pending)
        backed_off = await DestinationStore(self._db).backed_off_count()
        self._metrics.onbind_homeservers_backed_off.set(backed_off)

    def _pool(self) -> None:
        """The pool's figures are in memory: always current."""
        usage = self._db.pool_usage()
        if usage is not None:
            size, in_use = usage
            self._metrics.db_pool_size.set(size)
            self._metrics.db_pool_in_use.set(in_use)
