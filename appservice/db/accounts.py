"""Identity-server accounts: access tokens (stored as SHA-256 hashes) and their users."""

from __future__ import annotations

from dataclasses import dataclass

from appservice.db.database import AppDatabase


@dataclass(frozen=True)
class Account:
    """An access token's owner."""

    user_id: str
    created_ts: int


class AccountStore:
    """SQL for the ``accounts`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def add(self, token_hash: str, user_id: str, now_ms: int) -> None:
        """Record a new token."""
        await self._db.execute(
            "INSERT INTO accounts (token_hash, user_id, created_ts) VALUES ($1, $2, $3)",
            token_hash,
            user_id,
            now_ms,
        )

    async def get(self, token_hash: str) -> Account | None:
        """The account owning a token, if any."""
        row = await self._db.read_row(
            "SELECT user_id, created_ts FROM accounts WHERE token_hash = $1", token_hash
        )
        return Account(row["user_id"], row["created_ts"]) if row else None

    async def delete(self, token_hash: str) -> bool:
        """Forget a token; False when it was unknown."""
        row = await self._db.fetchrow(
            "DELETE FROM accounts WHERE token_hash = $1 RETURNING user_id", token_hash
        )
        return row is not None
