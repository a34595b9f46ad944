"""Migrations: applied once, in order, refused when the database is newer, safe when racing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appservice.db.database import AppDatabase, DatabaseError, load_migrations, split_statements


async def _open(url: str) -> AppDatabase:
    db = AppDatabase(url)
    await db.start()
    return db


async def test_migrations_apply_once_then_are_a_no_op(database_url: str) -> None:
    db = await _open(database_url)
    try:
        applied = await db.migrate()
        assert applied == [m.version for m in load_migrations(db.dialect)]
        assert await db.migrate() == []
        assert await db.schema_version() == applied[-1]
        tables = ("accounts", "terms_acceptances", "bindings", "server_state", "signing_keys")
        for table in (*tables, "imported_ephemeral_keys", "import_runs"):
            assert await db.db.table_exists(table), table
        # 0017: where a row was imported from (NULL: made here).
        for table in ("bindings", "invites"):
            assert await db.fetch(f"SELECT imported_from FROM {table}") == []
    finally:
        await db.stop()


async def test_database_newer_than_code_is_refused(database_url: str) -> None:
    db = await _open(database_url)
    try:
        await db.migrate()
        await db.execute(
            "INSERT INTO schema_migrations (version, name, applied_ts) VALUES (9999, 'future', 0)"
        )
        with pytest.raises(DatabaseError, match="newer than this code"):
            await db.migrate()
    finally:
        await db.stop()


async def test_three_instances_migrating_at_once_do_not_race(database_url: str) -> None:
    dbs = [await _open(database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(db.migrate() for db in dbs))
        versions = [m.version for m in load_migrations(dbs[0].dialect)]
        assert sorted(results, key=len) == [[], [], versions]
        rows = await dbs[0].fetch("SELECT version FROM schema_migrations")
        assert sorted(row["version"] for row in rows) == versions
    finally:
        for db in dbs:
            await db.stop()


async def test_failed_migration_leaves_nothing_half_applied(
    database_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_good.sql").write_text("CREATE TABLE good (id INTEGER PRIMARY KEY);\n")
    (tmp_path / "0002_bad.sql").write_text(
        "CREATE TABLE half (id INTEGER);\nINSERT INTO missing_table VALUES (1);\n"
    )
    db = await _open(database_url)
    try:
        with pytest.raises(Exception, match="missing_table"):
            await db.migrate(tmp_path)
        assert not await db.db.table_exists("half")
        assert await db.schema_version() <= 1
    finally:
        await db.stop()


def test_dialect_specific_file_replaces_the_plain_one(tmp_path: Path) -> None:
    (tmp_path / "0001_init.sql").write_text("SELECT 1;")
    (tmp_path / "0001_init.postgres.sql").write_text("SELECT 2;")
    (tmp_path / "0002_more.sqlite.sql").write_text("SELECT 3;")
    assert [(m.version, m.sql) for m in load_migrations("postgres", tmp_path)] == [(1, "SELECT 2;")]
    assert [(m.version, m.sql) for m in load_migrations("sqlite", tmp_path)] == [
        (1, "SELECT 1;"),
        (2, "SELECT 3;"),
    ]


def test_unexpected_file_name_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "init.sql").write_text("SELECT 1;")
    with pytest.raises(DatabaseError, match=r"init\.sql"):
        load_migrations("sqlite", tmp_path)


def test_statements_are_split_at_line_ends_and_comments_dropped() -> None:
    sql = "-- a comment; with a semicolon\nCREATE TABLE a (x TEXT);\nCREATE INDEX b ON a (x);\n"
    assert split_statements(sql) == ["CREATE TABLE a (x TEXT)", "CREATE INDEX b ON a (x)"]
