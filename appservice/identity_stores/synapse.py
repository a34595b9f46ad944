"""The ``synapse`` store: the 3PIDs and admin flags of local users, read from Synapse's database.

Synapse keeps running and writing its database while we read it, so this store only ever reads:
PostgreSQL sessions default to read-only transactions and SQLite files are opened with
``mode=ro``. The tables used are ``user_threepids``, ``user_threepid_id_server`` and ``users``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import urllib.parse
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from appservice.config.model import SynapseStoreConfig
from appservice.identity_stores.base import StoreEntry, StoreError, Threepid
from appservice.threepid import canonical_address, user_id_server

log = logging.getLogger(__name__)

# Rows fetched per round trip while listing every 3PID.
BATCH_SIZE = 1000
# Seconds a connection attempt or a single query may take.
TIMEOUT = 30.0

_TABLES = ("users", "user_threepids", "user_threepid_id_server")

# One 3PID row as read: (user_id, medium, address).
_Row = tuple[str, str, str]


def _threepid_query(bound: bool, id_server: bool, param: list[str], where: str) -> str:
    """The SELECT of live users' 3PIDs; ``param`` lists placeholders for the bound check's
    id_server and ``where`` is an extra condition on ``t`` (the 3PID row)."""
    conditions = ["u.deactivated = 0"]
    if where:
        conditions.append(where)
    if bound:
        match_server = f" AND b.id_server = {param[0]}" if id_server else ""
        conditions.append(
            "EXISTS (SELECT 1 FROM user_threepid_id_server b WHERE b.user_id = t.user_id"
            f" AND b.medium = t.medium AND b.address = t.address{match_server})"
        )
    return (
        "SELECT t.user_id, t.medium, t.address FROM user_threepids t"
        " JOIN users u ON u.name = t.user_id WHERE " + " AND ".join(conditions)
    )


class _Backend(Protocol):
    async def check(self) -> None: ...

    async def close(self) -> None: ...

    async def find(self, medium: str, addresses: list[str]) -> list[_Row]: ...

    def rows(self) -> AsyncIterator[_Row]: ...

    async def is_admin(self, user_id: str) -> bool: ...


def _describe_pg(url: str) -> str:
    """``host:port/database`` of a PostgreSQL URL, without user or password."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "localhost"
    return f"{host}:{port or 5432}{parts.path or '/'}"


def _pg_error(target: str, e: BaseException) -> StoreError:
    if isinstance(e, asyncpg.UndefinedTableError):
        return StoreError(f"Synapse database {target} is not a Synapse database ({e})")
    if isinstance(e, asyncpg.PostgresError):
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        return StoreError(f"Synapse database {target}: {first_line}")
    if isinstance(e, TimeoutError):
        return StoreError(f"Synapse database {target} did not answer within {TIMEOUT:g}s")
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return StoreError(f"Synapse database {target} is unreachable: {reason}")


_PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class _Postgres:
    """Synapse on PostgreSQL, through a small asyncpg pool of read-only sessions."""

    def __init__(self, url: str, bound: bool, id_server: str) -> None:
        self._url = url
        self._target = _describe_pg(url)
        self._pool: asyncpg.Pool | None = None
        self._id_server = id_server
        extra = ["$3"] if id_server else []
        self._find_sql = _threepid_query(
            bound, bool(id_server), extra, "t.medium = $1 AND t.address = ANY($2::text[])"
        )
        self._list_args: list[Any] = [id_server] if id_server else []
        self._list_sql = _threepid_query(bound, bool(id_server), ["$1"], "")

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(
                    self._url,
                    min_size=0,
                    max_size=2,
                    timeout=TIMEOUT,
                    command_timeout=TIMEOUT,
                    server_settings={
                        "default_transaction_read_only": "on",
                        "application_name": "matrix-identity-appservice",
                    },
                )
            except (*_PG_ERRORS, ValueError) as e:
                raise _pg_error(self._target, e) from None
        return self._pool

    async def check(self) -> None:
        pool = await self._connect()
        try:
            async with pool.acquire() as conn:
                for table in _TABLES:
                    await conn.execute(f"SELECT 1 FROM {table} LIMIT 0")
        except _PG_ERRORS as e:
            await self.close()
            raise _pg_error(self._target, e) from None

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def find(self, medium: str, addresses: list[str]) -> list[_Row]:
        pool = await self._connect()
        args: list[Any] = [medium, addresses]
        if self._id_server:
            args.append(self._id_server)
        try:
            records = await pool.fetch(self._find_sql, *args)
        except _PG_ERRORS as e:
            raise _pg_error(self._target, e) from None
        return [(r[0], r[1], r[2]) for r in records]

    async def rows(self) -> AsyncIterator[_Row]:
        pool = await self._connect()
        try:
            async with pool.acquire() as conn, conn.transaction(readonly=True):
                # A server-side cursor: rows arrive BATCH_SIZE at a time, never all at once.
                async for r in conn.cursor(self._list_sql, *self._list_args, prefetch=BATCH_SIZE):
                    yield (r[0], r[1], r[2])
        except _PG_ERRORS as e:
            raise _pg_error(self._target, e) from None

    async def is_admin(self, user_id: str) -> bool:
        pool = await self._connect()
        try:
            admin = await pool.fetchval(
                "SELECT admin FROM users WHERE name = $1 AND deactivated = 0", user_id
            )
        except _PG_ERRORS as e:
            raise _pg_error(self._target, e) from None
        return bool(admin)


class _Sqlite:
    """Synapse on SQLite: the file opened read-only, each query in a worker thread."""

    def __init__(self, path: str, bound: bool, id_server: str) -> None:
        self._path = path
        self._uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
        self._id_server = id_server
        self._find_sql = _threepid_query(
            bound,
            bool(id_server),
            ["?"],
            "t.medium = ? AND t.address IN (SELECT value FROM json_each(?))",
        )
        self._list_sql = _threepid_query(bound, bool(id_server), ["?"], "")

    def _error(self, e: sqlite3.Error) -> StoreError:
        if "no such table" in str(e):
            return StoreError(f"Synapse database {self._path} is not a Synapse database ({e})")
        return StoreError(f"Synapse database {self._path}: {e}")

    def _open(self) -> sqlite3.Connection:
        if not Path(self._path).is_file():
            raise StoreError(f"Synapse database {self._path} does not exist")
        try:
            conn = sqlite3.connect(self._uri, uri=True, timeout=TIMEOUT, check_same_thread=False)
            conn.execute("PRAGMA query_only = 1")
        except sqlite3.Error as e:
            raise self._error(e) from None
        return conn

    def _query(self, sql: str, args: Sequence[Any]) -> list[Any]:
        conn = self._open()
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from None
        finally:
            conn.close()

    def _check(self) -> None:
        for table in _TABLES:
            self._query(f"SELECT 1 FROM {table} LIMIT 0", ())

    async def check(self) -> None:
        await asyncio.to_thread(self._check)

    async def close(self) -> None:
        """Nothing stays open between queries."""

    async def find(self, medium: str, addresses: list[str]) -> list[_Row]:
        # The placeholders appear in text order: bound's id_server comes after the address list.
        args: list[Any] = [medium, json.dumps(addresses)]
        if self._id_server:
            args.append(self._id_server)
        rows = await asyncio.to_thread(self._query, self._find_sql, args)
        return [(r[0], r[1], r[2]) for r in rows]

    async def rows(self) -> AsyncIterator[_Row]:
        args = [self._id_server] if self._id_server else []

        def start() -> tuple[sqlite3.Connection, sqlite3.Cursor]:
            conn = self._open()
            try:
                return conn, conn.execute(self._list_sql, args)
            except sqlite3.Error as e:
                conn.close()
                raise self._error(e) from None

        def fetch(cursor: sqlite3.Cursor) -> list[Any]:
            try:
                return cursor.fetchmany(BATCH_SIZE)
            except sqlite3.Error as e:
                raise self._error(e) from None

        conn, cursor = await asyncio.to_thread(start)
        try:
            while batch := await asyncio.to_thread(fetch, cursor):
                for r in batch:
                    yield (r[0], r[1], r[2])
        finally:
            await asyncio.to_thread(conn.close)

    async def is_admin(self, user_id: str) -> bool:
        rows = await asyncio.to_thread(
            self._query, "SELECT admin FROM users WHERE name = ? AND deactivated = 0", [user_id]
        )
        return bool(rows and rows[0][0])


class SynapseStore:
    """3PIDs Synapse's users added to their accounts (or, with ``threepids: bound``, bound to an
    identity server), and the admin role of Synapse server admins; listable."""

    name = "synapse"
    listable = True

    def __init__(self, config: SynapseStoreConfig, server_name: str) -> None:
        self._server_name = config.server_name or server_name
        self._admin_role = config.admin_role
        bound = config.threepids == "bound"
        id_server = config.id_server if bound else ""
        url = config.database_url
        self._backend: _Backend
        if url.startswith("sqlite:"):
            path = url.removeprefix("sqlite:").removeprefix("//")
            self._backend = _Sqlite(path, bound, id_server)
        else:
            self._backend = _Postgres(url, bound, id_server)

    async def start(self) -> None:
        """Connect and check that the database has Synapse's tables."""
        await self._backend.check()

    async def close(self) -> None:
        """Close the connection pool."""
        await self._backend.close()

    def _local(self, user_id: str) -> bool:
        return user_id_server(user_id) == self._server_name

    async def find(self, threepids: Sequence[Threepid]) -> dict[Threepid, str]:
        """The local, active user of each 3PID Synapse knows (one query per medium)."""
        by_medium: dict[str, list[str]] = defaultdict(list)
        for medium, address in dict.fromkeys(threepids):
            by_medium[medium].append(address)
        found: dict[Threepid, str] = {}
        for medium, addresses in by_medium.items():
            for user_id, row_medium, address in await self._backend.find(medium, addresses):
                if self._local(user_id):
                    found[(row_medium, address)] = user_id
        return found

    async def entries(self) -> AsyncIterator[StoreEntry]:
        """Every 3PID of a local, active user, streamed; addresses that are not valid in their
        canonical form are skipped."""
        skipped = 0
        async for user_id, medium, address in self._backend.rows():
            canonical = canonical_address(medium, address)
            if canonical is None or not self._local(user_id):
                skipped += 1
                continue
            yield StoreEntry(medium, canonical, user_id)
        if skipped:
            log.info("synapse store: skipped %d 3PIDs (invalid address or remote user)", skipped)

    async def roles(self, mxid: str) -> frozenset[str]:
        """``{admin_role}`` for an active Synapse server admin of our server, else nothing."""
        if not self._admin_role or not self._local(mxid):
            return frozenset()
        if await self._backend.is_admin(mxid):
            return frozenset({self._admin_role})
        return frozenset()
