"""``import sydent`` of a real sydent 2.6.1 deployment (tests/importers/conftest.py), through the
command line, then our server answering for it, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from appservice.app import IdentityServer
from appservice.config import load_config
from appservice.crypto.hashing import lookup_hash
from appservice.db.database import AppDatabase
from tests.importers.conftest import RealSydent
from tests.support.api_server import Api
from tests.support.homeserver import FakeHomeserver
from tests.support.signing_homeserver import SigningHomeserver
from tests.support.smtp import SmtpSink
from tests.support.sydent import import_sydent, run_our_cli
from tests.support.twilio import FakeTwilio

V2 = "/_matrix/identity/v2"


class Deployment:
    """Our server's config file and a snapshot of the sydent deployment to import."""

    def __init__(self, tmp_path: Path, database_url: str, homeserver: FakeHomeserver) -> None:
        self.config = tmp_path / "config.yaml"
        self.key_file = tmp_path / "signing.key"
        self.database_url = database_url
        settings = {
            "server": {"name": "id.test", "public_base_url": "https://id.test"},
            "database": {"url": database_url},
            "keys": {"signing_key_path": str(self.key_file)},
            "federation": {
                "overrides": {homeserver.server_name: homeserver.base_url},
                "allowed_networks": ["127.0.0.0/8"],
            },
        }
        self.config.write_text(yaml.safe_dump(settings))
        self.tmp_path = tmp_path

    def import_sydent(
        self, db: Path, conf: Path | None, *flags: str
    ) -> subprocess.CompletedProcess[str]:
        """``import sydent`` of these files into our database."""
        return import_sydent(self.config, db, conf, *flags)

    def pending_invites(self) -> list[dict[str, Any]]:
        """``invites list --pending``, each in full (``invites show``: the token is there)."""
        listed = run_our_cli("invites", "list", "--pending", "--json", "-c", self.config)
        assert listed.returncode == 0, listed.stderr
        shown = []
        for row in json.loads(listed.stdout):
            one = run_our_cli("invites", "show", row["id"], "--json", "-c", self.config)
            assert one.returncode == 0, one.stderr
            shown.append(json.loads(one.stdout))
        return shown

    async def row_counts(self) -> dict[str, int]:
        """Rows in our bindings and invites tables (none when the schema was never made)."""
        db = AppDatabase(self.database_url)
        await db.start()
        try:
            counts = {}
            for table in ("bindings", "invites"):
                if await db.has_table(table):
                    counts[table] = int(await db.fetchval(f"SELECT COUNT(*) FROM {table}"))
                else:
                    counts[table] = 0
            return counts
        finally:
            await db.stop()

    @asynccontextmanager
    async def serving(
        self,
        homeserver: FakeHomeserver,
        smtp: SmtpSink,
        twilio: FakeTwilio,
        signing_homeserver: SigningHomeserver,
    ) -> AsyncIterator[Api]:
        """Our server started on the config (after the import, as an operator does)."""
        server = IdentityServer(load_config(self.config))
        await server.start()
        client = TestClient(TestServer(server.public_app()))
        await client.start_server()
        try:
            yield Api(client, server, homeserver, smtp, twilio, signing_homeserver)
        finally:
            await client.close()
            await server.stop()


@pytest.fixture
def deployment(tmp_path: Path, database_url: str, homeserver: FakeHomeserver) -> Deployment:
    """Our config on a fresh database (both backends)."""
    return Deployment(tmp_path, database_url, homeserver)


@pytest.fixture
def serve(
    deployment: Deployment,
    homeserver: FakeHomeserver,
    smtp_sink: SmtpSink,
    twilio: FakeTwilio,
    signing_homeserver: SigningHomeserver,
) -> Any:
    """``async with serve() as api``: our server on the deployment's config."""
    return lambda: deployment.serving(homeserver, smtp_sink, twilio, signing_homeserver)


async def lookup(api: Api, token: str, addresses: list[str]) -> dict[str, str]:
    """Hashed v2 lookups of email addresses: address -> mxid for those found."""
    status, details = await api.request("GET", f"{V2}/hash_details", token=token)
    assert status == 200, details
    pepper = details["lookup_pepper"]
    hashes = {lookup_hash(a, "email", pepper): a for a in addresses}
    status, body = await api.request(
        "POST",
        f"{V2}/lookup",
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": list(hashes)},
    )
    assert status == 200, body
    return {hashes[h]: mxid for h, mxid in body["mappings"].items()}


async def test_a_real_sydent_deployment_is_served_by_us_after_the_import(
    real_sydent: RealSydent, deployment: Deployment, serve: Any
) -> None:
    sydent = real_sydent
    db, conf = sydent.snapshot(deployment.tmp_path / "sydent")

    result = deployment.import_sydent(db, conf)

    assert result.returncode == 0, result.stderr
    assert "bindings: found 3, imported 3" in result.stdout
    assert "invites: found 2, imported 2" in result.stdout
    assert "1 delivered invites" in result.stdout

    # Pending invites are ours now, with sydent's tokens; the delivered one is not.
    listed = deployment.pending_invites()
    assert sorted((i["token"], i["address"], i["room_id"], i["sender"]) for i in listed) == sorted(
        (i.token, i.address, i.room_id, i.sender) for i in sydent.pending
    )
    assert sydent.delivered[0].token not in {i["token"] for i in listed}
    assert {i["imported_from"] for i in listed} == {"sydent"}  # `invites show` says where from

    async with serve() as api:
        _, token = await api.register()
        everyone = [*sydent.bindings, *(i.address for i in sydent.pending)]
        # dave@ was bound twice in sydent: the newer mxid wins, as in sydent's own lookups.
        assert await lookup(api, token, everyone) == sydent.bindings

        status, body = await api.request("GET", f"{V2}/pubkey/ed25519:0")
        assert (status, body) == (200, {"public_key": sydent.public_key})
        # The invite events in rooms name sydent's key and validity URLs (v1 paths).
        for path in (f"{V2}/pubkey/isvalid", "/_matrix/identity/api/v1/pubkey/isvalid"):
            status, body = await api.request("GET", f"{path}?public_key={quote(sydent.public_key)}")
            assert (status, body) == (200, {"valid": True})
        for invite in sydent.pending:
            query = f"pubkey/ephemeral/isvalid?public_key={quote(invite.ephemeral_public_key)}"
            theirs = await sydent.ask(f"{V2}/{query}")
            status, ours = await api.request("GET", f"/_matrix/identity/api/v1/{query}")
            assert (status, ours) == (200, theirs) == (200, {"valid": True})


async def test_a_second_import_changes_nothing(
    real_sydent: RealSydent, deployment: Deployment
) -> None:
    db, conf = real_sydent.snapshot(deployment.tmp_path / "sydent")
    first = deployment.import_sydent(db, conf)
    assert first.returncode == 0, first.stderr
    before = await deployment.row_counts()
    key_before = deployment.key_file.read_text()

    second = deployment.import_sydent(db, conf)

    assert second.returncode == 0, second.stderr
    assert "nothing to change: the database already holds this import" in second.stdout
    assert "bindings: found 3, nothing to change (3 unchanged)" in second.stdout
    assert await deployment.row_counts() == before == {"bindings": 3, "invites": 2}
    assert deployment.key_file.read_text() == key_before


async def test_a_dry_run_reports_and_writes_nothing(
    real_sydent: RealSydent, deployment: Deployment
) -> None:
    db, conf = real_sydent.snapshot(deployment.tmp_path / "sydent")

    dry = deployment.import_sydent(db, conf, "--dry-run")

    assert dry.returncode == 0, dry.stderr
    assert "import from sydent (dry run):" in dry.stdout
    assert "dry run: nothing was written" in dry.stdout
    assert await deployment.row_counts() == {"bindings": 0, "invites": 0}
    assert not deployment.key_file.exists()
    # What the dry run announced is what the import then does.
    real = deployment.import_sydent(db, conf)
    assert real.returncode == 0, real.stderr
    announced = [
        line.replace("would import", "imported").replace("would update", "updated")
        for line in dry.stdout.splitlines()
        if "found" in line
    ]
    assert announced == [line for line in real.stdout.splitlines() if "found" in line]
    assert "bindings: found 3, imported 3" in real.stdout


async def test_a_database_with_bindings_of_its_own_needs_merge(
    real_sydent: RealSydent, deployment: Deployment, serve: Any
) -> None:
    async with serve() as api:
        await api.add_binding("email", "zoe@example.org", "@zoe:hs.test")
    db, conf = real_sydent.snapshot(deployment.tmp_path / "sydent")

    refused = deployment.import_sydent(db, conf)

    assert refused.returncode != 0
    [line] = refused.stderr.strip().splitlines()
    assert "--merge" in line and "1 bindings" in line, line
    assert await deployment.row_counts() == {"bindings": 1, "invites": 0}

    merged = deployment.import_sydent(db, conf, "--merge")
    assert merged.returncode == 0, merged.stderr
    async with serve() as api:
        _, token = await api.register()
        found = await lookup(api, token, ["zoe@example.org", *real_sydent.bindings])
    assert found == {"zoe@example.org": "@zoe:hs.test", **real_sydent.bindings}


def _foreign_sqlite(path: Path) -> Path:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO notes (text) VALUES ('not sydent')")
    conn.close()
    return path


@pytest.mark.parametrize("broken", ["garbage database", "foreign database", "bad signing key"])
async def test_a_corrupt_or_foreign_file_gives_one_line_and_writes_nothing(
    real_sydent: RealSydent, deployment: Deployment, broken: str
) -> None:
    db, conf = real_sydent.snapshot(deployment.tmp_path / "sydent")
    if broken == "garbage database":
        db.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    elif broken == "foreign database":
        db = _foreign_sqlite(deployment.tmp_path / "other.db")
    else:
        conf.write_text(conf.read_text().replace("ed25519 0 ", "ed25519 0 !!"))

    result = deployment.import_sydent(db, conf)

    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert await deployment.row_counts() == {"bindings": 0, "invites": 0}
    assert not deployment.key_file.exists()
