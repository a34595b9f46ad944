"""Small named values shared by every instance (the lookup pepper, ...)."""

from __future__ import annotations

from appservice.db.database import AppDatabase


class ServerStateStore:
    """SQL for the ``server_state`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def get_or_create(self, name: str, candidate: str) -> str:
        """The stored value of ``name``; ``candidate`` is stored first if there is none.

        Instances starting together all end up with the one value that was stored first.
        """
        await self._db.execute(
            "INSERT INTO server_state (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            name,
            candidate,
        )
        value = await self._db.fetchval("SELECT value FROM server_state WHERE name = $1", name)
        return str(value)
