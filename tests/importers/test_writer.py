"""The import writer (issue 18) on both databases: bindings found by hashed lookups through the
real API, pending invites kept with their tokens, the other server's keys served and used."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nacl.signing
import pytest
from aiohttp.test_utils import TestClient, TestServer
from unpaddedbase64 import encode_base64

from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.config import Config
from appservice.crypto.hashing import lookup_hash
from appservice.db.database import AppDatabase
from appservice.importers.model import (
    ImportedBinding,
    ImportedEphemeralKey,
    ImportedInvite,
    ImportedSigningKey,
    ImportSource,
)
from appservice.importers.writer import (
    BINDINGS,
    ImportReport,
    run_import,
)
from tests.support.api_server import Api, make_config
from tests.support.homeserver import FakeHomeserver

SEED = bytes(range(32))
OLD_SEED = bytes(range(1, 33))
EPHEMERAL_SEED = bytes(range(2, 34))
FOREVER = 2**62
T0 = 1_600_000_000_000  # when the other server stored its rows (ms)


def public_of(seed: bytes) -> str:
    return encode_base64(bytes(nacl.signing.SigningKey(seed).verify_key))


EPHEMERAL_PUBLIC = public_of(bytes(range(3, 35)))


def binding(address: str, mxid: str, ts: int = T0, medium: str = "email") -> ImportedBinding:
    return ImportedBinding(medium, address, mxid, ts, ts, FOREVER)


def pending_invite(n: int, address: str, **fields: object) -> ImportedInvite:
    values: dict[str, object] = {
        "source_id": str(n),
        "token": f"sydentToken{n}",
        "medium": "email",
        "address": address,
        "room_id": f"!room{n}:hs.test",
        "sender": "@inviter:hs.test",
        "created_ts": T0 + n,
        "signing_key_id": "ed25519:0",
    }
    values.update(fields)
    return ImportedInvite(**values)  # type: ignore[arg-type]


def source(
    bindings: list[ImportedBinding] | None = None,
    invites: list[ImportedInvite] | None = None,
    keys: list[ImportedSigningKey] | None = None,
    ephemeral: list[ImportedEphemeralKey] | None = None,
    *,
    name: str = "sydent",
    batch: int = 2,
) -> ImportSource:
    rows = list(bindings or [])

    def batches() -> Iterator[list[ImportedBinding]]:
        for i in range(0, len(rows), batch):
            yield rows[i : i + batch]

    return ImportSource(
        name=name,
        binding_count=len(rows),
        bindings=batches,
        invites=list(invites or []),
        signing_keys=list(
            keys if keys is not None else [ImportedSigningKey("ed25519:0", SEED, True)]
        ),
        ephemeral_keys=list(ephemeral or []),
        skipped={"delivered invites": 1},
        notes=["a note from the reader"],
    )


@pytest.fixture
def config(tmp_path: Path, database_url: str, homeserver: FakeHomeserver) -> Config:
    return make_config(tmp_path, database_url, {homeserver.server_name: homeserver.base_url})


def key_path(config: Config) -> Path:
    return Path(config.keys.signing_key_path)


async def do_import(config: Config, src: ImportSource, **options: object) -> ImportReport:
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        await db.migrate()
        return await run_import(
            db,
            key_path(config),
            src,
            redaction=config.invites.redaction,
            **options,  # type: ignore[arg-type]
        )
    finally:
        await db.stop()


@contextlib.asynccontextmanager
async def serving(
    config: Config, homeserver: FakeHomeserver, clock: FakeClock | None = None
) -> AsyncIterator[Api]:
    """The server started on the imported database (after the import, as an operator would)."""
    server = IdentityServer(config, clock=clock or FakeClock(T0 / 1000 + 3600))
    await server.start()
    client = TestClient(TestServer(server.public_app()))
    await client.start_server()
    try:
        yield Api(client, server, homeserver, None, None, None)  # type: ignore[arg-type]
    finally:
        await client.close()
        await server.stop()


async def hashed_lookup(api: Api, addresses: list[tuple[str, str]]) -> dict[str, str]:
    """address -> mxid, through hash_details and a sha256 lookup."""
    _, token = await api.register()
    status, body = await api.request("GET", "/_matrix/identity/v2/hash_details", token=token)
    assert status == 200
    pepper = body["lookup_pepper"]
    by_hash = {lookup_hash(address, medium, pepper): address for medium, address in addresses}
    status, body = await api.request(
        "POST",
        "/_matrix/identity/v2/lookup",
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": list(by_hash)},
    )
    assert status == 200, body
    return {by_hash[h]: mxid for h, mxid in body["mappings"].items()}


def counts(report: ImportReport, table: str) -> tuple[int, int, int, int]:
    t = report.tables[table]
    return t.found, t.imported, t.updated, t.unchanged


async def test_imported_bindings_are_found_by_hashed_lookup(
    config: Config, homeserver: FakeHomeserver
) -> None:
    report = await do_import(
        config,
        source(
            [
                binding("Alice@Example.COM", "@alice:hs.test"),
                binding("+1 800 555 2067".replace(" ", ""), "@bob:hs.test", medium="msisdn"),
                binding("not an address", "@x:hs.test"),
                binding("carol@example.com", "not-an-mxid"),
            ]
        ),
    )
    t = report.tables[BINDINGS]
    assert counts(report, BINDINGS) == (4, 2, 0, 0)
    assert t.skipped == {"address not canonical": 1, "not a Matrix user ID": 1}
    async with serving(config, homeserver) as api:
        found = await hashed_lookup(
            api, [("email", "alice@example.com"), ("msisdn", "18005552067")]
        )
    assert found == {"alice@example.com": "@alice:hs.test", "18005552067": "@bob:hs.test"}


async def test_newest_association_of_an_address_wins(config: Config) -> None:
    rows = [
        binding("a@example.com", "@old:hs.test", T0),
        binding("A@example.com", "@new:hs.test", T0 + 5),
        binding("a@EXAMPLE.com", "@older:hs.test", T0 - 5),
    ]
    report = await do_import(config, source(rows))
    assert counts(report, BINDINGS) == (3, 1, 0, 0)
    assert report.tables[BINDINGS].skipped == {"older association of the same address": 2}
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        row = await db.fetchrow("SELECT mxid, created_ts, imported_from FROM bindings")
        assert tuple(row) == ("@new:hs.test", T0 + 5, "sydent")
    finally:
        await db.stop()
    # A newer association in a later import replaces it; an older one does not.
    later = [binding("a@example.com", "@newest:hs.test", T0 + 9)]
    report = await do_import(config, source(later))
    assert counts(report, BINDINGS) == (1, 0, 1, 0)
    report = await do_import(config, source([binding("a@example.com", "@x:hs.test", T0)]))
    assert counts(report, BINDINGS) == (1, 0, 0, 1)
