"""Pooled connections: nothing of an abandoned transaction stays on a connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

from appservice.db.database import AppDatabase


async def _value(db: AppDatabase, name: str) -> str | None:
    value: str | None = await db.fetchval("SELECT value FROM server_state WHERE name = $1", name)
    return value


async def test_a_transaction_cancelled_midway_is_rolled_back(database_url: str) -> None:
    db = AppDatabase(database_url, min_connections=1, max_connections=1)
    await db.start()
    try:
        await db.migrate()
        inside = asyncio.Event()

        async def write_then_hang() -> None:
            async with db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO server_state (name, value) VALUES ($1, $2)", "abandoned", "x"
                )
                inside.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(write_then_hang())
        await asyncio.wait_for(inside.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # The one connection is usable, outside any transaction, and kept nothing.
        assert await _value(db, "abandoned") is None
        await db.execute("INSERT INTO server_state (name, value) VALUES ($1, $2)", "later", "y")
        assert await _value(db, "later") == "y"
        async with db.connection() as conn:
            wrapped = conn.wrapped
            in_txn = wrapped.is_in_transaction() if db.is_postgres else wrapped.in_transaction
            assert not in_txn
    finally:
        await db.stop()


async def test_sqlite_runs_in_wal_mode_with_normal_synchronous(tmp_path: Path) -> None:
    # What docs/configuration.md (Storage) promises operators about durability on SQLite.
    db = AppDatabase(f"sqlite:{tmp_path / 'identity.db'}")
    await db.start()
    try:
        assert await db.fetchval("PRAGMA journal_mode") == "wal"
        assert await db.fetchval("PRAGMA synchronous") == 1  # NORMAL
    finally:
        await db.stop()
