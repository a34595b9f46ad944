"""Fixtures shared by the whole suite: databases (SQLite and PostgreSQL) and a running server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from tests.support.homeserver import FakeHomeserver

# The running identity server (``api`` and its doubles) for every test folder.
pytest_plugins = ["tests.support.api_server"]

T = TypeVar("T")

POSTGRES_ADMIN_URL = os.environ.get(
    "APPSERVICE_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres"
)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a private loop in a worker thread (for synchronous fixtures)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A PostgreSQL database created for this test run and dropped after it."""
    name = f"appservice_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        run_sync(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as e:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({e}); "
            "scripts/test.sh starts or installs it"
        )
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        run_sync(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests of commands, which configure the root logger: leave it as the test found it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a fresh SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'identity.db'}"
        return
    async with postgres_schema(request.getfixturevalue("postgres_database")) as url:
        yield url


@contextlib.asynccontextmanager
async def postgres_schema(base_url: str, prefix: str = "test") -> AsyncIterator[str]:
    """A fresh schema in the test database, dropped afterwards: the URL that uses it."""
    schema = f"{prefix}_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(base_url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        # asyncpg turns unknown query parameters into server settings.
        yield f"{base_url}?search_path={schema}"
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


@pytest.fixture
async def homeserver() -> AsyncIterator[FakeHomeserver]:
    """A loopback homeserver answering OpenID userinfo for the tokens it is told about."""
    server = FakeHomeserver()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def artifacts_dir() -> Iterator[Path]:
    """Where tests leave files for people to look at (screenshots, mails)."""
    path = Path(os.environ.get("TEST_ARTIFACTS", "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    yield path
