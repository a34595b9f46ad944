"""A second real Synapse, on PostgreSQL, for tests that read Synapse's database.

Import the fixture into a test module (``from tests.e2e.synapse_postgres import
synapse_postgres``); it lives as long as that module's tests.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from tests.support.synapse import (
    SynapseServer,
    ensure_synapse_postgres_driver,
    ensure_synapse_venv,
)
from tests.support.tls import TestCertificates

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class PostgresSynapse:
    """A running Synapse and the URL of its PostgreSQL database."""

    server: SynapseServer
    database_url: str


@pytest.fixture(scope="module")
async def synapse_postgres(
    tmp_path_factory: pytest.TempPathFactory,
    test_certificates: TestCertificates,
) -> AsyncIterator[PostgresSynapse]:
    """Synapse on a fresh PostgreSQL database ``synapse_test_<random>`` (dropped afterwards)."""
    venv = ensure_synapse_venv()
    ensure_synapse_postgres_driver(venv)
    name = f"synapse_test_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        # Synapse refuses a database whose collation is not C.
        await admin.execute(
            f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
        server = SynapseServer(
            tmp_path_factory.mktemp("synapse-postgres"),
            test_certificates,
            venv=venv,
            extra_config={
                "database": {
                    "name": "psycopg2",
                    "args": {
                        "user": "postgres",
                        "host": "127.0.0.1",
                        "port": 5432,
                        "database": name,
                        "cp_min": 1,
                        "cp_max": 5,
                    },
                }
            },
        )
        server.start()
        try:
            yield PostgresSynapse(server, f"postgresql://postgres@127.0.0.1:5432/{name}")
        finally:
            server.stop()
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()
