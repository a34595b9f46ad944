"""Which policy URLs each user accepted."""

from __future__ import annotations

from collections.abc import Iterable

from appservice.db.database import AppDatabase


class TermsStore:
    """SQL for the ``terms_acceptances`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def accept(self, user_id: str, urls: Iterable[str], now_ms: int) -> None:
        """Append accepted URLs (already accepted ones are kept as they are)."""
        async with self._db.transaction() as conn:
            for url in dict.fromkeys(urls):
                await conn.execute(
                    "INSERT INTO terms_acceptances (user_id, url, accepted_ts) VALUES ($1, $2, $3)"
                    " ON CONFLICT (user_id, url) DO NOTHING",
                    user_id,
                    url,
                    now_ms,
                )

    async def accepted_urls(self, user_id: str) -> set[str]:
        """Every URL the user accepted."""
        rows = await self._db.fetch("SELECT url FROM terms_acceptances WHERE user_id = $1", user_id)
        return {row["url"] for row in rows}
