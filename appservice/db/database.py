"""Open the database (SQLite or PostgreSQL through mautrix's async_db) and apply migrations.

Migrations are the SQL files of the top-level ``migrations/`` directory (shipped inside the
package, see ``appservice.resources``; ``APPSERVICE_MIGRATIONS_DIR`` points elsewhere), named
``NNNN_description.sql``; a file ``NNNN_description.postgres.sql`` or ``.sqlite.sql`` replaces the
plain one for that dialect. Each is applied once, in a transaction, and recorded in
``schema_migrations``. On PostgreSQL an advisory lock serialises instances that start together.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import sqlite3
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import aiosqlite
import orjson
from mautrix.util.async_db import Database, Scheme
from mautrix.util.async_db.aiosqlite import in_transaction as sqlite_in_transaction
from mautrix.util.async_db.connection import LoggingConnection
from mautrix.util.async_db.database import conn_var

from appservice.private_files import make_private_dirs
from appservice.resources import MIGRATIONS

log = logging.getLogger(__name__)

_MIGRATIONS_OVERRIDE = os.environ.get("APPSERVICE_MIGRATIONS_DIR")
MIGRATIONS_DIR: Traversable = Path(_MIGRATIONS_OVERRIDE) if _MIGRATIONS_OVERRIDE else MIGRATIONS
# An arbitrary constant that identifies this application's migration lock.
_MIGRATION_LOCK_KEY = 0x1D5E_4A11
_POSITIONAL = re.compile(r"\$(\d+)")
# Longest list matched with IN (…) parameters on SQLite (whose limit is 32,766 since 3.32).
_SQLITE_MAX_IN_LIST = 16384
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(postgres|sqlite))?\.sql$")


def _transaction(conn: LoggingConnection) -> AbstractAsyncContextManager[None]:
    # mautrix's stub types transaction() as a coroutine; it is an async context manager.
    return cast(AbstractAsyncContextManager[None], conn.transaction())


class DatabaseError(Exception):
    """The database cannot be used (unreachable, or a schema this code does not know)."""


@dataclass(frozen=True)
class Migration:
    """One versioned schema change for one dialect."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: str, directory: Traversable = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations for ``dialect`` (``postgres`` or ``sqlite``), in version order."""
    if not directory.is_dir():
        raise DatabaseError(f"migrations: {directory} is not a directory")
    chosen: dict[int, tuple[str, Traversable, bool]] = {}
    files = (entry for entry in directory.iterdir() if entry.name.endswith(".sql"))
    for path in sorted(files, key=lambda entry: entry.name):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise DatabaseError(f"migrations: unexpected file name {path.name}")
        version, name, file_dialect = int(match.group(1)), match.group(2), match.group(3)
        if file_dialect not in (None, dialect):
            continue
        specific = file_dialect is not None
        if version in chosen and chosen[version][2] and not specific:
            continue
        chosen[version] = (name, path, specific)
    return [
        Migration(version, name, path.read_text(encoding="utf-8"))
        for version, (name, path, _specific) in sorted(chosen.items())
    ]


def split_statements(sql: str) -> list[str]:
    """Split a migration into statements (each ends with ``;`` at the end of a line)."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    statements = re.split(r";\s*$", "\n".join(lines), flags=re.MULTILINE)
    return [s.strip() for s in statements if s.strip()]


@functools.cache
def _sqlite_placeholders(count: int) -> str:
    return ", ".join("?" * count)


async def _reset_released_connection(conn: Any) -> None:
    """What a PostgreSQL connection needs when it goes back to the pool: only a transaction left
    open (a task cancelled inside one) is rolled back.

    asyncpg's default sends ``RESET ALL; CLOSE ALL; UNLISTEN *; SELECT
    pg_advisory_unlock_all()`` on every release, a round trip that made each pooled query cost
    0.42 ms instead of 0.24 ms here. This server keeps no session state on pooled connections: no
    ``SET``, ``LISTEN`` or cursors outside transactions, and its one advisory lock (migrations)
    is released where it is taken.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _check_sqlite_file(path: str) -> None:
    """Refuse an existing SQLite file that cannot be used (not a database, not writable).

    mautrix would find out while setting up its connection and leave that connection, with its
    worker thread, open: the process could not exit after the error. A missing file is left for
    mautrix to create.
    """
    if not os.path.exists(path):
        return
    try:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            # What mautrix sets first; writing needs the directory (the -wal and -shm files).
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise DatabaseError(f"database.url: cannot open {path}: {e}") from None


def _prepare_sqlite_file(path: Path) -> None:
    """Create the SQLite database file 0600 (and the directories it needs 0700) before SQLite
    opens it; tighten an existing one that other users can read.

    The database holds client secrets, invite tokens and every address. SQLite would create the
    file 0644 under the usual umask, and it gives the ``-wal`` and ``-shm`` files the mode of the
    database file: so a database file that is 0600 keeps all three private. A file readable by
    other users (what earlier releases made) is made 0600, with its ``-wal`` and ``-shm``; a
    group-only mode such as 0640 is the operator's choice and is left alone.
    """
    try:
        make_private_dirs(path.parent)
    except OSError as e:
        raise DatabaseError(
            f"database.url: cannot create the directory of {path}: {e.strerror}"
        ) from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if not path.is_file():
            raise DatabaseError(f"database.url: {path} is not a file") from None
        for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            _tighten(file)
    except OSError as e:
        raise DatabaseError(f"database.url: cannot create {path}: {e.strerror}") from None
    else:
        os.fchmod(fd, 0o600)
        os.close(fd)


def _tighten(path: Path) -> None:
    """Make ``path`` 0600 when other users may access it (it may not exist)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o007:
            os.chmod(path, 0o600)
            log.warning("%s was readable by other users (mode %04o); it is now 0600", path, mode)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot make %s 0600: %s", path, e.strerror)


class AppDatabase:
    """The application's database: a mautrix ``Database`` plus dialect helpers."""

    def __init__(self, url: str, min_connections: int = 1, max_connections: int = 10) -> None:
        self.url = url
        self._sqlite_path: str | None = None
        self._reader: sqlite3.Connection | None = None
        self._postgres_pool: Any = None
        if url.startswith("sqlite:"):
            path = url.removeprefix("sqlite:").removeprefix("//")
            if path != ":memory:":
                self._sqlite_path = path  # created by start(), not here (see exists())
            db_args: dict[str, Any] = {"min_size": 1}
        else:
            db_args = {
                "min_size": min_connections,
                "max_size": max_connections,
                "reset": _reset_released_connection,
            }
        self.db = Database.create(
            url,
            db_args=db_args,
            log=logging.getLogger("appservice.db.sql"),
        )

    def sqlite_reader(self) -> sqlite3.Connection | None:
        """On SQLite, a read-only connection used synchronously for short indexed reads on hot
        paths (None on PostgreSQL).

        An indexed read takes microseconds, less than handing it to aiosqlite's worker thread
        and back; in WAL mode readers never wait for writers, so the event loop is not held up.
        """
        if self.is_postgres or self._sqlite_path is None:
            return None
        if self._reader is None:
            reader = sqlite3.connect(self._sqlite_path, check_same_thread=False)
            reader.row_factory = sqlite3.Row
            reader.execute("PRAGMA query_only = 1")
            reader.execute("PRAGMA busy_timeout = 1000")
            self._reader = reader
        return self._reader

    @property
    def is_postgres(self) -> bool:
        """Whether this is PostgreSQL (else SQLite)."""
        return self.db.scheme in (Scheme.POSTGRES, Scheme.COCKROACH)

    @property
    def dialect(self) -> str:
        """``postgres`` or ``sqlite``."""
        return "postgres" if self.is_postgres else "sqlite"

    def exists(self) -> bool:
        """Whether the database exists (on SQLite the file; a PostgreSQL database is made by
        its operator), for commands that must not create it."""
        return self._sqlite_path is None or os.path.exists(self._sqlite_path)

    async def has_table(self, name: str) -> bool:
        """Whether ``name`` is a table of this database (on PostgreSQL in the search path)."""
        if self.is_postgres:
            return bool(await self.fetchval("SELECT to_regclass($1) IS NOT NULL", name))
        return bool(
            await self.fetchval(
                "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1)",
                name,
            )
        )

    async def start(self) -> None:
        """Connect (no migrations); on SQLite, create the database file first (see
        :func:`_prepare_sqlite_file`)."""
        if self._sqlite_path is not None:
            _prepare_sqlite_file(Path(self._sqlite_path))
            _check_sqlite_file(self._sqlite_path)
        try:
            await self.db.start()
            if self.is_postgres:
                self._postgres_pool = getattr(self.db, "pool", None)
        except (OSError, ConnectionError) as e:
            raise DatabaseError(f"database.url: cannot connect: {e}") from e
        except sqlite3.Error as e:  # e.g. a directory where the file cannot be created
            raise DatabaseError(f"database.url: cannot open {self._sqlite_path}: {e}") from None
        except Exception as e:
            if type(e).__module__.startswith("asyncpg"):
                raise DatabaseError(f"database.url: cannot connect: {e}") from e
            raise

    def pool_usage(self) -> tuple[int, int] | None:
        """(connections open, connections in use) of the PostgreSQL pool; None on SQLite (one
        connection, no pool) and before start."""
        pool = self._postgres_pool
        if pool is None:
            return None
        size = int(pool.get_size())
        return size, size - int(pool.get_idle_size())

    async def stop(self) -> None:
        """Close every connection."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._postgres_pool = None
        await self.db.stop()

    def connection(self) -> AbstractAsyncContextManager[LoggingConnection]:
        """A pooled connection (re-entrant within one task)."""
        # mautrix annotates acquire() as returning the connection; it is a context manager.
        return cast(AbstractAsyncContextManager[LoggingConnection], self.db.acquire())

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[LoggingConnection]:
        """A connection inside a transaction; nested use joins the outer transaction."""
        async with self.connection() as conn:
            if self.is_postgres:
                async with _transaction(conn):
                    yield conn
                return
            outermost = not sqlite_in_transaction.get()
            try:
                async with _transaction(conn):
                    yield conn
            except BaseException:
                # mautrix rolls back on Exception only: a task cancelled inside the transaction
                # would leave SQLite's one connection in it, and later writes never committed.
                sqlite_conn = cast(aiosqlite.Connection, conn.wrapped)
                if outermost and sqlite_conn.in_transaction:
                    await asyncio.shield(sqlite_conn.rollback())
                raise

    def _free_pool(self) -> Any:
        """On PostgreSQL, asyncpg's pool when this task holds no connection (so there is no
        transaction for a statement to join); else None.

        A statement straight through the pool skips mautrix's per-connection wrapping and
        logging: 0.36 ms against 0.43 ms per indexed read here.
        """
        if self._postgres_pool is None or conn_var.get() is not None:
            return None
        return self._postgres_pool

    async def execute(self, query: str, *args: Any) -> None:
        """Run a statement."""
        if (pool := self._free_pool()) is not None:
            await pool.execute(query, *args)
        elif self.is_postgres:
            await self.db.execute(query, *args)
        else:
            await self._sqlite_fetch(query, args)

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        """Rows of a query."""
        if (pool := self._free_pool()) is not None:
            return cast(list[Any], await pool.fetch(query, *args))
        if self.is_postgres:
            return await self.db.fetch(query, *args)
        return await self._sqlite_fetch(query, args)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        """The first row of a query, or None."""
        if (pool := self._free_pool()) is not None:
            return await pool.fetchrow(query, *args)
        if self.is_postgres:
            return await self.db.fetchrow(query, *args)
        rows = await self._sqlite_fetch(query, args)
        return rows[0] if rows else None

    async def fetchval(self, query: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        if (pool := self._free_pool()) is not None:
            return await pool.fetchval(query, *args)
        if self.is_postgres:
            return await self.db.fetchval(query, *args)
        rows = await self._sqlite_fetch(query, args)
        return rows[0][0] if rows else None

    async def _sqlite_fetch(self, query: str, args: tuple[Any, ...]) -> list[Any]:
        """A statement and its rows in one trip to aiosqlite's worker thread.

        mautrix's own fetch takes three (execute, fetch, close the cursor), each a thread handoff
        that costs more than the statement itself: 0.47 ms against 0.15 ms for a rate-limit hit.
        """
        async with self.connection() as conn:
            sqlite_conn = cast(aiosqlite.Connection, conn.wrapped)
            return list(await sqlite_conn.execute_fetchall(_POSITIONAL.sub(r"?\1", query), args))

    async def run_locked(self, work: Callable[[Database], Awaitable[object]]) -> None:
        """Run ``work(database)`` under the migration lock (PostgreSQL), e.g. a library's own
        schema upgrade, so instances starting together do not race."""
        if not self.is_postgres:
            await work(self.db)
            return
        async with self.connection() as conn:
            # Queries of ``work`` in this task reuse this connection, which holds the lock.
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
            try:
                await work(self.db)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)

    async def read(self, query: str, *args: Any) -> list[Any]:
        """Rows of a short indexed read: on SQLite through :meth:`sqlite_reader` (in place), on
        PostgreSQL through the pool. Only for reads that need no transaction."""
        reader = self.sqlite_reader()
        if reader is None:
            return await self.fetch(query, *args)
        return reader.execute(_POSITIONAL.sub(r"?\1", query), args).fetchall()

    async def read_tuples(self, query: str, *args: Any) -> list[Any]:
        """:meth:`read` for wide results: rows are indexed by position only (on SQLite plain
        tuples, which cost less to build than named rows)."""
        reader = self.sqlite_reader()
        if reader is None:
            return await self.fetch(query, *args)
        cursor = reader.cursor()
        cursor.row_factory = None
        if "$" in query:
            query = _POSITIONAL.sub(r"?\1", query)
        return cursor.execute(query, args).fetchall()

    def in_list(self, column: str, values: Sequence[str]) -> tuple[str, list[Any]]:
        """A WHERE clause matching ``column`` against ``values`` through its index, and its
        parameters; it must be the statement's only parameters. ``= ANY($1)`` on PostgreSQL; on
        SQLite ``IN (?, …)``, the list padded (with its last value) to a power of two so a few
        cached statements serve every length, or ``json_each($1)`` for an empty list or one
        longer than SQLite's parameter limit allows."""
        if self.is_postgres:
            return f"{column} = ANY($1::text[])", [list(values)]
        if not values or len(values) > _SQLITE_MAX_IN_LIST:
            return f"{column} IN (SELECT value FROM json_each($1))", [json.dumps(list(values))]
        size = 1 << (len(values) - 1).bit_length()
        padded = [*values, *([values[-1]] * (size - len(values)))]
        # "?" rather than "$n": the $-to-? rewrite of 1,024 placeholders per query cost more than
        # the query; so on SQLite this clause must be the query's only parameters.
        return f"{column} IN ({_sqlite_placeholders(size)})", padded

    def select_by_keys(
        self, table: str, columns: Sequence[str], key: str, values: Sequence[str]
    ) -> tuple[str, list[Any]]:
        """``SELECT columns FROM table`` for the rows whose ``key`` is among ``values``, one
        probe of ``key``'s index per value, and its parameters.

        PostgreSQL: ``= ANY($1)``. SQLite: the values go as one JSON text, expanded by
        ``json_each`` and joined to the index. At every list length this costs less than
        ``IN (?, …)``, which binds each value separately and first sorts them into a temporary
        index: for 1,000 hashes, 0.63 ms against 0.97 ms here. On SQLite a value given twice
        yields its rows twice.
        """
        selected = ", ".join(f"{table}.{column}" for column in columns)
        if self.is_postgres:
            return f"SELECT {selected} FROM {table} WHERE {key} = ANY($1::text[])", [list(values)]
        # CROSS JOIN: SQLite keeps the written order, so the values are the outer loop.
        return (
            f"SELECT {selected} FROM json_each($1) AS wanted CROSS JOIN {table}"
            f" ON {table}.{key} = wanted.value",
            [orjson.dumps(values if isinstance(values, list) else list(values)).decode()],
        )

    async def read_row(self, query: str, *args: Any) -> Any:
        """The first row of :meth:`read`, or None."""
        rows = await self.read(query, *args)
        return rows[0] if rows else None

    async def schema_version(self) -> int:
        """The newest applied migration, 0 for an empty database."""
        if not await self.db.table_exists("schema_migrations"):
            return 0
        return int(
            await self.db.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        )

    async def applied_migrations(self) -> set[int]:
        """The versions recorded in ``schema_migrations`` (none for an empty database)."""
        if not await self.has_table("schema_migrations"):
            return set()
        rows = await self.fetch("SELECT version FROM schema_migrations")
        return {int(row[0]) for row in rows}

    async def migrate(self, directory: Traversable = MIGRATIONS_DIR) -> list[int]:
        """Apply pending migrations; returns the versions applied (none when up to date)."""
        migrations = load_migrations(self.dialect, directory)
        known = migrations[-1].version if migrations else 0
        async with self.connection() as conn:
            if self.is_postgres:
                await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
                try:
                    return await self._migrate_locked(conn, migrations, known)
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
            # SQLite: one IMMEDIATE transaction takes the write lock before the version is read, so
            # processes starting together apply each migration once (DDL is transactional there).
            await conn.execute("BEGIN IMMEDIATE")
            try:
                applied = await self._migrate_locked(conn, migrations, known)
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")
            return applied

    @asynccontextmanager
    async def _step(self, conn: LoggingConnection) -> AsyncIterator[None]:
        """One migration: its own transaction on PostgreSQL, part of the outer one on SQLite."""
        if self.is_postgres:
            async with _transaction(conn):
                yield
        else:
            yield

    async def _migrate_locked(
        self, conn: LoggingConnection, migrations: list[Migration], known: int
    ) -> list[int]:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ts BIGINT NOT NULL)"
        )
        current = int(
            await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        )
        if current > known:
            raise DatabaseError(
                f"database: schema version {current} is newer than this code knows ({known}); "
                "run the newer release or restore a backup"
            )
        applied: list[int] = []
        for migration in migrations:
            if migration.version <= current:
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            async with self._step(conn):
                for statement in split_statements(migration.sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_ts) "
                    "VALUES ($1, $2, CAST(strftime('%s','now') AS BIGINT) * 1000)"
                    if not self.is_postgres
                    else "INSERT INTO schema_migrations (version, name, applied_ts) "
                    "VALUES ($1, $2, (extract(epoch from now()) * 1000)::bigint)",
                    migration.version,
                    migration.name,
                )
            applied.append(migration.version)
        return applied
