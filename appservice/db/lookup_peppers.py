"""The lookup pepper shared by every instance (``lookup_pepper``) and the two hash slots of the
tables that are found by lookup hash (``bindings``, ``store_threepids``).

Generation ``g`` of the pepper has its hashes in slot ``g % 2`` of each row: ``lookup_hash``
(even) or ``lookup_hash_1`` (odd). ``hash_gen`` is the newest generation a row was hashed for; a
rotation to ``g + 1`` fills the other slot of every row below it, then switches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appservice.crypto.hashing import lookup_hash
from appservice.db.database import AppDatabase

# The hash column of each slot.
HASH_COLUMNS = ("lookup_hash", "lookup_hash_1")
# Tables whose rows carry lookup hashes, with their key columns (the last two: medium, address).
HASHED_TABLES: dict[str, tuple[str, ...]] = {
    "bindings": ("medium", "address"),
    "store_threepids": ("store", "medium", "address"),
}
_STATE_COLUMNS = (
    "generation, pepper, since_ts, previous_pepper, grace_until_ts, next_pepper,"
    " rotation_started_ts, claimed_by, claimed_until"
)


def hash_column(generation: int) -> str:
    """The column holding the hashes of pepper generation ``generation``."""
    return HASH_COLUMNS[generation % 2]


@dataclass(frozen=True)
class LookupHashes:
    """What a written row stores: its hash in each slot (None: leave the slot as it is) and the
    newest pepper generation they cover."""

    slots: tuple[str | None, str | None]
    generation: int


@dataclass(frozen=True)
class PepperState:
    """The pepper as all instances see it."""

    generation: int
    pepper: str
    since_ts: int
    previous_pepper: str | None
    grace_until_ts: int
    next_pepper: str | None
    rotation_started_ts: int
    claimed_by: str | None
    claimed_until: int

    @property
    def rotating(self) -> bool:
        """Whether a rotation to ``next_pepper`` is in progress."""
        return self.next_pepper is not None

    def previous_answered(self, now_ms: int) -> bool:
        """Whether lookups with the previous pepper are still answered (its grace)."""
        return self.previous_pepper is not None and now_ms < self.grace_until_ts

    def slot_peppers(self) -> tuple[tuple[str | None, str | None], int]:
        """The pepper of each hash slot for a row written now, and the generation it covers:
        the current pepper in its slot, and in the other one the next pepper during a rotation,
        else the previous one (so both slots are filled once there was a rotation)."""
        slots: list[str | None] = [None, None]
        slots[self.generation % 2] = self.pepper
        other = self.next_pepper or self.previous_pepper
        if other is not None:
            slots[(self.generation + 1) % 2] = other
        generation = self.generation + 1 if self.rotating else self.generation
        return (slots[0], slots[1]), generation

    def hashes(self, medium: str, address: str) -> LookupHashes:
        """A row's hashes under :meth:`slot_peppers`."""
        peppers, generation = self.slot_peppers()
        slots = tuple(
            lookup_hash(address, medium, pepper) if pepper is not None else None
            for pepper in peppers
        )
        return LookupHashes((slots[0], slots[1]), generation)


def _state(row: Any) -> PepperState:
    return PepperState(*(row[i] for i in range(9)))


class PepperStore:
    """SQL for ``lookup_pepper`` and for rehashing the hashed tables."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def ensure(self, pepper: str, now_ms: int) -> None:
        """Create the state with ``pepper`` as generation 0 unless there is one."""
        await self._db.execute(
            "INSERT INTO lookup_pepper (id, generation, pepper, since_ts) VALUES (1, 0, $1, $2)"
            " ON CONFLICT (id) DO NOTHING",
            pepper,
            now_ms,
        )

    async def find(self) -> PepperState | None:
        """The current state, None before the first start: one primary-key read (on SQLite in
        place, see AppDatabase.read)."""
        row = await self._db.read_row(f"SELECT {_STATE_COLUMNS} FROM lookup_pepper WHERE id = 1")
        return _state(row) if row is not None else None

    async def load(self) -> PepperState:
        """The current state (made by :meth:`ensure`)."""
        state = await self.find()
        if state is None:
            raise RuntimeError("lookup_pepper has no row (LookupService.start() creates it)")
        return state

    async def _update(self, assignments: str, where: str, *args: Any) -> PepperState | None:
        row = await self._db.fetchrow(
            f"UPDATE lookup_pepper SET {assignments} WHERE id = 1 AND {where}"
            f" RETURNING {_STATE_COLUMNS}",
            *args,
        )
        return _state(row) if row is not None else None

    async def claim(self, owner: str, now_ms: int, lease_ms: int) -> PepperState | None:
        """Take (or renew) the rotation lease; None when another owner holds it."""
        return await self._update(
            "claimed_by = $1, claimed_until = $2",
            "(claimed_until < $3 OR claimed_by = $1)",
            owner,
            now_ms + lease_ms,
            now_ms,
        )

    async def release(self, owner: str) -> None:
        """Give the lease back."""
        await self._update("claimed_by = NULL, claimed_until = 0", "claimed_by = $1", owner)

    async def begin(self, owner: str, next_pepper: str, now_ms: int) -> PepperState | None:
        """Start a rotation to ``next_pepper`` (the lease holder, none in progress). The previous
        pepper stops being answered: its slot is about to be overwritten."""
        return await self._update(
            "next_pepper = $2, rotation_started_ts = $3, previous_pepper = NULL,"
            " grace_until_ts = 0",
            "claimed_by = $1 AND next_pepper IS NULL",
            owner,
            next_pepper,
            now_ms,
        )

    async def switch(self, owner: str, now_ms: int, grace_ms: int) -> PepperState | None:
        """Make the next pepper the current one, if every hashed row has its hash; None when
        some row is still missing it (or the lease or the rotation is gone)."""
        missing = " AND ".join(
            f"NOT EXISTS (SELECT 1 FROM {table} WHERE hash_gen <= generation)"
            for table in HASHED_TABLES
        )
        return await self._update(
            "generation = generation + 1, previous_pepper = pepper, pepper = next_pepper,"
            " next_pepper = NULL, since_ts = $2, grace_until_ts = $3",
            f"claimed_by = $1 AND next_pepper IS NOT NULL AND {missing}",
            owner,
            now_ms,
            now_ms + grace_ms,
        )

    async def rows_below(
        self, table: str, generation: int, limit: int, after: Sequence[Any] | None
    ) -> list[Any]:
        """Up to ``limit`` rows of ``table`` hashed for a generation below ``generation``: their
        key columns and ``hash_gen``. ``after``: a key to continue after (in key order), None:
        any such rows (through the ``hash_gen`` index)."""
        key = HASHED_TABLES[table]
        columns = ", ".join(key)
        if after is None:
            return await self._db.fetch(
                f"SELECT {columns}, hash_gen FROM {table} WHERE hash_gen < $1 LIMIT $2",
                generation,
                limit,
            )
        placeholders = ", ".join(f"${i + 3}" for i in range(len(key)))
        return await self._db.fetch(
            f"SELECT {columns}, hash_gen FROM {table} WHERE ({columns}) > ({placeholders})"
            f" AND hash_gen < $1 ORDER BY {columns} LIMIT $2",
            generation,
            limit,
            *after,
        )

    async def write_hashes(
        self, table: str, rows: Sequence[tuple[Sequence[Any], LookupHashes]]
    ) -> None:
        """Store the hashes of rows given by key (a slot given as None keeps its value)."""
        key = HASHED_TABLES[table]
        where = " AND ".join(f"{column} = ${i + 4}" for i, column in enumerate(key))
        async with self._db.transaction() as conn:
            await conn.executemany(
                f"UPDATE {table} SET lookup_hash = COALESCE($1, lookup_hash),"
                f" lookup_hash_1 = COALESCE($2, lookup_hash_1), hash_gen = $3 WHERE {where}",
                [(*hashes.slots, hashes.generation, *key_values) for key_values, hashes in rows],
            )

    async def rebase_store_sync(self, old_pepper: str, new_pepper: str) -> None:
        """Copies synced under ``old_pepper`` were rehashed: record them under ``new_pepper`` so
        the next sync does not rewrite them."""
        await self._db.execute(
            "UPDATE store_sync SET pepper = $2 WHERE pepper = $1", old_pepper, new_pepper
        )
