"""Identity stores: where lookups, invite resolution and the invite policy find people besides
our own bindings (Synapse's database, LDAP, a REST backend, a static list)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Iterable, Sequence
from typing import TypeVar

from appservice.identity_stores.base import IdentityStore, StoreEntry, StoreError, Threepid

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

__all__ = ["IdentityStore", "IdentityStores", "StoreEntry", "StoreError", "Threepid"]


class IdentityStores:
    """The configured stores, in priority order."""

    def __init__(self, stores: Sequence[IdentityStore]) -> None:
        self.all: tuple[IdentityStore, ...] = tuple(stores)

    def first_by_order(self, found: Iterable[tuple[K, str, V]]) -> dict[K, V]:
        """From (key, store name, value) triples, for each key the value of the store that comes
        first in ``stores.order``; stores no longer configured are ignored."""
        rank = {store.name: i for i, store in enumerate(self.all)}
        best: dict[K, tuple[int, V]] = {}
        for key, store, value in found:
            r = rank.get(store)
            if r is not None and (key not in best or r < best[key][0]):
                best[key] = (r, value)
        return {key: value for key, (_, value) in best.items()}

    @property
    def listable(self) -> tuple[IdentityStore, ...]:
        """The stores mirrored into the database for hashed lookups."""
        return tuple(s for s in self.all if s.listable)

    @property
    def live(self) -> tuple[IdentityStore, ...]:
        """The stores that can only be asked (plain lookups and invite resolution)."""
        return tuple(s for s in self.all if not s.listable)

    async def start(self) -> None:
        """Open every store's connections; a store that cannot be used stops start-up (a
        ``StoreError`` naming it), so a wrong password or address shows at once."""
        for store in self.all:
            try:
                await store.start()
            except StoreError as e:
                raise StoreError(f"stores.{store.name}: {e}") from e

    async def close(self) -> None:
        """Close every store, even when one fails to."""
        for store in self.all:
            try:
                await store.close()
            except Exception:
                log.exception("closing the %s store failed", store.name)

    async def find_live(self, threepids: Sequence[Threepid]) -> dict[Threepid, str]:
        """Ask the non-listable stores, in order, for 3PIDs; a failing store is skipped
        (logged), so one broken backend does not fail lookups the others can answer."""
        found: dict[Threepid, str] = {}
        remaining = list(dict.fromkeys(threepids))
        for store in self.live:
            if not remaining:
                break
            try:
                answer = await store.find(remaining)
            except StoreError as e:
                log.warning("%s store lookup failed: %s", store.name, e)
                continue
            found.update(answer)
            remaining = [t for t in remaining if t not in answer]
        return found

    async def roles(self, mxid: str) -> frozenset[str]:
        """The union of ``mxid``'s roles in every store; raises ``StoreError`` when one fails
        (a policy must not decide on half the facts)."""
        if not self.all:
            return frozenset()
        answers = await asyncio.gather(*(store.roles(mxid) for store in self.all))
        return frozenset().union(*answers)
