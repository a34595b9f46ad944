"""Keeps the database copy of listable identity stores current, with lookup hashes.

Hashed lookups cannot ask a store ("who has this hash?"), so each listable store is copied into
``store_threepids`` with the lookup hash of every entry. A sync reads the store's entries, compares
them with the copy and writes only what changed, so the hash of an unchanged entry is computed
once (and again only when the pepper changes). One instance of several syncs a store at a time
(a lease in ``store_sync``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from appservice.clock import Clock
from appservice.db.lookup_peppers import PepperState
from appservice.db.store_threepids import StoreThreepidStore
from appservice.identity_stores import IdentityStores, StoreError
from appservice.identity_stores.base import IdentityStore
from appservice.metrics import Metrics
from appservice.threepid import MEDIUMS, canonical_address

log = logging.getLogger(__name__)

# How long a sync may take before another instance may start one.
_LEASE_MS = 30 * 60 * 1000


@dataclass(frozen=True)
class SyncResult:
    """What one sync of one store changed."""

    store: str
    entries: int
    added: int
    changed: int
    removed: int


class StoreSyncService:
    """Copies the listable stores into the database, one lease-holding instance at a time."""

    def __init__(
        self,
        stores: IdentityStores,
        copies: StoreThreepidStore,
        pepper_state: Callable[[], Awaitable[PepperState]],
        interval_s: float,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        self._stores = stores
        self._metrics = metrics if metrics is not None else Metrics()
        self._copies = copies
        self._pepper_state = pepper_state
        self._interval_ms = int(interval_s * 1000)
        self._clock = clock
        # Called after a sync added or changed entries (to resolve pending invites at once).
        self.on_changed: Callable[[], None] = lambda: None

    async def sync_due(self) -> list[SyncResult]:
        """Sync every listable store whose last sync is older than the interval."""
        removed = await self._copies.forget_except([s.name for s in self._stores.listable])
        if removed:
            log.info("dropped %d copied entries of stores no longer configured", removed)
        results = []
        for store in self._stores.listable:
            now = self._clock.now_ms()
            if not await self._copies.claim(store.name, now, now - self._interval_ms, _LEASE_MS):
                continue
            result = await self.sync(store)
            if result is not None:
                results.append(result)
        if any(r.added or r.changed for r in results):
            self.on_changed()
        return results

    async def sync(self, store: IdentityStore) -> SyncResult | None:
        """Sync one store now (the caller holds its lease); None when the store failed."""
        peppers = await self._pepper_state()
        pepper = peppers.pepper
        try:
            current: dict[tuple[str, str], str] = {}
            async for entry in store.entries():
                address = (
                    canonical_address(entry.medium, entry.address)
                    if entry.medium in MEDIUMS
                    else None
                )
                if address is not None:
                    current.setdefault((entry.medium, address), entry.mxid)
        except StoreError as e:
            self._metrics.store_sync_errors.labels(store.name).inc()
            log.warning("syncing the %s store failed: %s", store.name, e)
            await self._copies.finish(store.name, self._clock.now_ms(), None, None, str(e))
            return None
        state = await self._copies.state(store.name)
        rehash = state is None or state.pepper != pepper
        copied = {} if rehash else await self._copies.snapshot(store.name)
        upserts = [
            (medium, address, mxid, peppers.hashes(medium, address))
            for (medium, address), mxid in current.items()
            if copied.get((medium, address)) != mxid
        ]
        deletes = [key for key in copied if key not in current]
        await self._copies.apply(store.name, upserts, deletes, replace_all=rehash)
        await self._copies.finish(store.name, self._clock.now_ms(), pepper, len(current), None)
        self._metrics.store_syncs.labels(store.name).inc()
        changed = sum(1 for m, a, _, _ in upserts if (m, a) in copied)
        result = SyncResult(store.name, len(current), len(upserts) - changed, changed, len(deletes))
        if upserts or deletes:
            log.info(
                "synced the %s store: %d entries (%d new, %d changed, %d removed)",
                store.name,
                result.entries,
                result.added,
                result.changed,
                result.removed,
            )
        return result
