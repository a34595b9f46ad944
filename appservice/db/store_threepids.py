"""The copy of listable identity stores (``store_threepids``) and their sync state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appservice.db.database import AppDatabase
from appservice.db.lookup_peppers import HASH_COLUMNS, LookupHashes

# Rows per executemany call when a sync writes its changes.
_WRITE_BATCH = 5000

# (medium, address) -> mxid, what a store holds.
Mapping3pid = dict[tuple[str, str], str]


@dataclass(frozen=True)
class StoreMatch:
    """A store entry found by lookup hash."""

    lookup_hash: str
    store: str
    mxid: str


@dataclass(frozen=True)
class SyncState:
    """Where a store's copy stands."""

    store: str
    synced_ts: int
    pepper: str
    entries: int
    last_error: str | None


class StoreThreepidStore:
    """SQL for ``store_threepids`` and ``store_sync``."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def matches_by_hash(self, hashes: Sequence[str], slot: int = 0) -> list[StoreMatch]:
        """Every store entry whose lookup hash (of the pepper in hash slot ``slot``) is among
        ``hashes`` (one indexed read)."""
        if not hashes:
            return []
        column = HASH_COLUMNS[slot]
        query, params = self._db.select_by_keys(
            "store_threepids", (column, "store", "mxid"), column, hashes
        )
        rows = await self._db.read_tuples(query, *params)
        return [StoreMatch(row[0], row[1], row[2]) for row in rows]

    async def snapshot(self, store: str) -> Mapping3pid:
        """Everything the copy holds for ``store``."""
        rows = await self._db.fetch(
            "SELECT medium, address, mxid FROM store_threepids WHERE store = $1", store
        )
        return {(row["medium"], row["address"]): row["mxid"] for row in rows}

    async def apply(
        self,
        store: str,
        upserts: Sequence[tuple[str, str, str, LookupHashes]],
        deletes: Sequence[tuple[str, str]],
        *,
        replace_all: bool = False,
    ) -> None:
        """Write a sync's changes in one transaction: ``upserts`` are (medium, address, mxid,
        hashes), ``deletes`` (medium, address); ``replace_all`` first drops the whole copy
        (copied under a pepper that is gone)."""
        async with self._db.transaction() as conn:
            if replace_all:
                await conn.execute("DELETE FROM store_threepids WHERE store = $1", store)
            for start in range(0, len(deletes), _WRITE_BATCH):
                await conn.executemany(
                    "DELETE FROM store_threepids WHERE store = $1 AND medium = $2 AND address = $3",
                    [(store, m, a) for m, a in deletes[start : start + _WRITE_BATCH]],
                )
            for start in range(0, len(upserts), _WRITE_BATCH):
                await conn.executemany(
                    "INSERT INTO store_threepids (store, medium, address, mxid, lookup_hash,"
                    " lookup_hash_1, hash_gen) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                    " ON CONFLICT (store, medium, address) DO UPDATE SET mxid = excluded.mxid,"
                    " lookup_hash = COALESCE(excluded.lookup_hash, store_threepids.lookup_hash),"
                    " lookup_hash_1 = COALESCE(excluded.lookup_hash_1,"
                    " store_threepids.lookup_hash_1), hash_gen = excluded.hash_gen",
                    [
                        (store, medium, address, mxid, *hashes.slots, hashes.generation)
                        for medium, address, mxid, hashes in upserts[start : start + _WRITE_BATCH]
                    ],
                )

    async def forget_except(self, stores: Sequence[str]) -> int:
        """Drop the copies of stores that are no longer configured; how many entries went."""
        clause, params = self._db.in_list("store", stores)
        async with self._db.transaction() as conn:
            rows = await conn.fetch(
                f"DELETE FROM store_threepids WHERE NOT ({clause}) RETURNING store", *params
            )
            await conn.execute(f"DELETE FROM store_sync WHERE NOT ({clause})", *params)
        return len(rows)

    async def claim(self, store: str, now_ms: int, due_before_ms: int, lease_ms: int) -> bool:
        """Take the lease to sync ``store`` when its last sync started before ``due_before_ms``
        and nobody else holds the lease; False when it is not due or another instance has it."""
        await self._db.execute(
            "INSERT INTO store_sync (store) VALUES ($1) ON CONFLICT (store) DO NOTHING", store
        )
        row = await self._db.fetchrow(
            "UPDATE store_sync SET claimed_until = $2 WHERE store = $1 AND claimed_until < $3"
            " AND synced_ts < $4 RETURNING store",
            store,
            now_ms + lease_ms,
            now_ms,
            due_before_ms,
        )
        return row is not None

    async def finish(
        self, store: str, now_ms: int, pepper: str | None, entries: int | None, error: str | None
    ) -> None:
        """Record a finished sync and release the lease; a failed one keeps pepper and count."""
        await self._db.execute(
            "INSERT INTO store_sync (store) VALUES ($1) ON CONFLICT (store) DO NOTHING", store
        )
        if error is None:
            await self._db.execute(
                "UPDATE store_sync SET synced_ts = $2, pepper = $3, entries = $4,"
                " claimed_until = 0, last_error = NULL WHERE store = $1",
                store,
                now_ms,
                pepper,
                entries,
            )
        else:
            await self._db.execute(
                "UPDATE store_sync SET synced_ts = $2, claimed_until = 0, last_error = $3"
                " WHERE store = $1",
                store,
                now_ms,
                error,
            )

    async def state(self, store: str) -> SyncState | None:
        """The sync state of ``store``."""
        row = await self._db.fetchrow(
            "SELECT store, synced_ts, pepper, entries, last_error FROM store_sync WHERE store = $1",
            store,
        )
        return _state(row) if row else None


def _state(row: Any) -> SyncState:
    return SyncState(
        row["store"], row["synced_ts"], row["pepper"], row["entries"], row["last_error"]
    )
