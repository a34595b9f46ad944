"""Public halves of the long-term signing keys, shared by all instances."""

from __future__ import annotations

from dataclasses import dataclass

from appservice.db.database import AppDatabase


@dataclass(frozen=True)
class StoredSigningKey:
    """A long-term public key and whether it was revoked."""

    key_id: str
    public_key: str
    created_ts: int
    revoked_ts: int | None


class SigningKeyStore:
    """SQL for the ``signing_keys`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def register(self, key_id: str, public_key: str, now_ms: int) -> StoredSigningKey | None:
        """Record a key unless its id (or its public key) is recorded already; then the key
        recorded under ``key_id``, which the caller compares with its own: of instances
        recording different keys for one id at once, exactly one gets its key recorded.
        None when ``key_id`` is not recorded (its public key is, under another id)."""
        await self._db.execute(
            "INSERT INTO signing_keys (key_id, public_key, created_ts) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING",
            key_id,
            public_key,
            now_ms,
        )
        return await self.by_id(key_id)

    async def revoke(self, key_id: str, now_ms: int) -> bool:
        """Revoke one key; False when there is no such key still valid."""
        rows = await self._db.fetch(
            "UPDATE signing_keys SET revoked_ts = $2 WHERE key_id = $1 AND revoked_ts IS NULL"
            " RETURNING key_id",
            key_id,
            now_ms,
        )
        return bool(rows)

    async def by_id(self, key_id: str) -> StoredSigningKey | None:
        """A key by id."""
        row = await self._db.fetchrow(
            "SELECT key_id, public_key, created_ts, revoked_ts FROM signing_keys WHERE key_id = $1",
            key_id,
        )
        return _key(row) if row else None

    async def by_public_key(self, public_key: str) -> StoredSigningKey | None:
        """A key by its unpadded base64 public key."""
        row = await self._db.fetchrow(
            "SELECT key_id, public_key, created_ts, revoked_ts FROM signing_keys"
            " WHERE public_key = $1",
            public_key,
        )
        return _key(row) if row else None

    async def all(self) -> list[StoredSigningKey]:
        """Every key, oldest first."""
        rows = await self._db.fetch(
            "SELECT key_id, public_key, created_ts, revoked_ts FROM signing_keys"
            " ORDER BY created_ts, key_id"
        )
        return [_key(row) for row in rows]


def _key(row: object) -> StoredSigningKey:
    r = row  # sqlite3.Row and asyncpg.Record both index by name
    return StoredSigningKey(r["key_id"], r["public_key"], r["created_ts"], r["revoked_ts"])  # type: ignore[index]
