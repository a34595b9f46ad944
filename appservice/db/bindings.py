"""3PID → Matrix ID bindings, with the lookup hash of the current pepper."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appservice.db.coalesce import ReadCoalescer
from appservice.db.database import AppDatabase


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
        self._hash_reads = ReadCoalescer(self._read_mxids_by_hash) if db.is_postgres else None

    async def upsert(self, binding: Binding, lookup_hash: str) -> None:
        """Store a binding, replacing an older one of the same 3PID."""
        await self._db.execute(
            f"INSERT INTO bindings ({_COLUMNS}, lookup_hash) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (medium, address) DO UPDATE SET mxid = excluded.mxid,"
            " created_ts = excluded.created_ts, not_before = excluded.not_before,"
            " not_after = excluded.not_after, lookup_hash = excluded.lookup_hash",
            binding.medium,
            binding.address,
            binding.mxid,
            binding.created_ts,
            binding.not_before,
            binding.not_after,
            lookup_hash,
        )

    async def get(self, medium: str, address: str) -> Binding | None:
        """The binding of one 3PID."""
        row = await self._db.read_row(
            f"SELECT {_COLUMNS} FROM bindings WHERE medium = $1 AND address = $2", medium, address
        )
        return _binding(row) if row else None

    async def mxids_by_hash(self, hashes: Sequence[str]) -> dict[str, str]:
        """Map each known lookup hash among ``hashes`` to its Matrix ID."""
        if not hashes:
            return {}
        if self._hash_reads is not None:
            return await self._hash_reads.read(hashes)
        return await self._read_mxids_by_hash(hashes)

    async def _read_mxids_by_hash(self, hashes: Sequence[str]) -> dict[str, str]:
        query, params = self._db.select_by_keys(
            "bindings", ("lookup_hash", "mxid"), "lookup_hash", hashes
        )
        # The hot path of every lookup: one indexed read (see AppDatabase.read).
        rows = await self._db.read_tuples(query, *params)
        return dict(rows)  # (hash, mxid) pairs: SQLite tuples or asyncpg records

    async def delete(self, medium: str, address: str, mxid: str) -> bool:
        """Remove the binding of a 3PID to ``mxid``; False when there was none."""
        row = await self._db.fetchrow(
            "DELETE FROM bindings WHERE medium = $1 AND address = $2 AND mxid = $3 RETURNING mxid",
            medium,
            address,
            mxid,
        )
        return row is not None
