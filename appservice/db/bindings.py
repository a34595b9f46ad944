"""3PID → Matrix ID bindings, with their lookup hashes (two pepper slots, see lookup_peppers)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appservice.db.coalesce import ReadCoalescer
from appservice.db.database import AppDatabase
from appservice.db.lookup_peppers import HASH_COLUMNS, LookupHashes


@dataclass(frozen=True)
class Binding:
    """One association of a 3PID with a Matrix user."""

    medium: str
    address: str
    mxid: str
    created_ts: int
    not_before: int
    not_after: int


_COLUMNS = "medium, address, mxid, created_ts, not_before, not_after"


def _binding(row: Any) -> Binding:
    return Binding(
        row["medium"],
        row["address"],
        row["mxid"],
        row["created_ts"],
        row["not_before"],
        row["not_after"],
    )


class BindingStore:
    """SQL for the ``bindings`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db
        # On SQLite a hash read runs in place and costs microseconds: nothing to merge.
        self._hash_reads = (
            tuple(
                ReadCoalescer(functools.partial(self._read_mxids_by_hash, slot)) for slot in (0, 1)
            )
            if db.is_postgres
            else None
        )

    async def upsert(self, binding: Binding, hashes: LookupHashes) -> None:
        """Store a binding, replacing an older one of the same 3PID (a hash slot given as None
        keeps its value); a binding made here is no longer an imported one."""
        await self._db.execute(
            f"INSERT INTO bindings ({_COLUMNS}, lookup_hash, lookup_hash_1, hash_gen)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            " ON CONFLICT (medium, address) DO UPDATE SET mxid = excluded.mxid,"
            " created_ts = excluded.created_ts, not_before = excluded.not_before,"
            " not_after = excluded.not_after,"
            " lookup_hash = COALESCE(excluded.lookup_hash, bindings.lookup_hash),"
            " lookup_hash_1 = COALESCE(excluded.lookup_hash_1, bindings.lookup_hash_1),"
            " hash_gen = excluded.hash_gen, imported_from = NULL",
            binding.medium,
            binding.address,
            binding.mxid,
            binding.created_ts,
            binding.not_before,
            binding.not_after,
            *hashes.slots,
            hashes.generation,
        )

    async def get(self, medium: str, address: str) -> Binding | None:
        """The binding of one 3PID."""
        row = await self._db.read_row(
            f"SELECT {_COLUMNS} FROM bindings WHERE medium = $1 AND address = $2", medium, address
        )
        return _binding(row) if row else None

    async def mxids_by_hash(self, hashes: Sequence[str], slot: int = 0) -> dict[str, str]:
        """Map each known lookup hash among ``hashes`` (of the pepper in hash slot ``slot``) to
        its Matrix ID."""
        if not hashes:
            return {}
        if self._hash_reads is not None:
            return await self._hash_reads[slot].read(hashes)
        return await self._read_mxids_by_hash(slot, hashes)

    async def _read_mxids_by_hash(self, slot: int, hashes: Sequence[str]) -> dict[str, str]:
        column = HASH_COLUMNS[slot]
        query, params = self._db.select_by_keys("bindings", (column, "mxid"), column, hashes)
        # The hot path of every lookup: one indexed read (see AppDatabase.read).
        rows = await self._db.read_tuples(query, *params)
        return dict(rows)  # (hash, mxid) pairs: SQLite tuples or asyncpg records

    async def delete(self, medium: str, address: str, mxid: str) -> bool:
        """Remove the binding of a 3PID to ``mxid``; False when there was none. An imported
        binding leaves a digest in ``unbound_imports``, so that importing the same data again
        does not bring it back."""
        async with self._db.transaction():
            row = await self._db.fetchrow(
                "DELETE FROM bindings WHERE medium = $1 AND address = $2 AND mxid = $3"
                " RETURNING imported_from, created_ts",
                medium,
                address,
                mxid,
            )
            if row is not None and row["imported_from"] is not None:
                await self._db.execute(
                    "INSERT INTO unbound_imports (digest, imported_ts) VALUES ($1, $2)"
                    " ON CONFLICT (digest) DO UPDATE SET imported_ts = excluded.imported_ts",
                    unbound_digest(medium, address),
                    row["created_ts"],
                )
        return row is not None


def unbound_digest(medium: str, address: str) -> str:
    """What ``unbound_imports`` keeps of an unbound 3PID: sha256 of ``"<medium> <address>"``,
    hex (the import computes the same in SQL)."""
    return hashlib.sha256(f"{medium} {address}".encode()).hexdigest()
