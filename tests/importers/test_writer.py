"""The import writer (issue 18) on both databases: bindings found by hashed lookups through the
real API, pending invites kept with their tokens, the other server's keys served and used."""

from __future__ import annotations

import contextlib
import json
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nacl.signing
import pytest
import signedjson.key
import signedjson.sign
from aiohttp.test_utils import TestClient, TestServer
from unpaddedbase64 import encode_base64

from appservice.app import IdentityServer
from appservice.clock import Clock, FakeClock
from appservice.config import Config
from appservice.crypto.hashing import lookup_hash
from appservice.db.bindings import BindingStore, unbound_digest
from appservice.db.database import AppDatabase
from appservice.db.invites import PENDING, InviteStore
from appservice.db.lookup_peppers import PepperState
from appservice.importers import writer
from appservice.importers.model import (
    ImportedBinding,
    ImportedEphemeralKey,
    ImportedInvite,
    ImportedSigningKey,
    ImportFailed,
    ImportSource,
)
from appservice.importers.writer import (
    BINDINGS,
    EPHEMERAL_KEYS,
    INVITES,
    SIGNING_KEYS,
    ImportRefused,
    ImportReport,
    _signing_key,
    invite_id,
    run_import,
)
from tests.support.api_server import Api, make_config
from tests.support.homeserver import FakeHomeserver

SEED = bytes(range(32))
OLD_SEED = bytes(range(1, 33))
EPHEMERAL_SEED = bytes(range(2, 34))
FOREVER = 2**62
T0 = 1_600_000_000_000  # when the other server stored its rows (ms)


CURRENT_KEY = ImportedSigningKey("ed25519:0", SEED, True)


def public_of(seed: bytes) -> str:
    return encode_base64(bytes(nacl.signing.SigningKey(seed).verify_key))


EPHEMERAL_PUBLIC = public_of(bytes(range(3, 35)))


def isvalid(public_key: str, ephemeral: bool = False) -> str:
    """The pubkey/isvalid (or pubkey/ephemeral/isvalid) URL for ``public_key``."""
    path = "ephemeral/isvalid" if ephemeral else "isvalid"
    return f"/_matrix/identity/v2/pubkey/{path}?public_key={quote(public_key)}"


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
            invites=config.invites,
            **options,  # type: ignore[arg-type]
        )
    finally:
        await db.stop()


@contextlib.asynccontextmanager
async def serving(
    config: Config, homeserver: FakeHomeserver, clock: FakeClock | None = None
) -> AsyncIterator[Api]:
    """The server on the imported database (after the import, as an operator would), without
    its background jobs: the tests run what they need of them."""
    server = IdentityServer(config, clock=clock or FakeClock(T0 / 1000 + 3600))
    await server.open()
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


async def test_a_later_import_does_not_bring_back_what_was_unbound_here(config: Config) -> None:
    rows = [binding("a@example.com", "@a:hs.test"), binding("b@example.com", "@b:hs.test")]
    assert counts(await do_import(config, source(rows)), BINDINGS) == (2, 2, 0, 0)
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        # a@ is unbound here after the switch (what the unbind service calls).
        assert await BindingStore(db).delete("email", "a@example.com", "@a:hs.test")
        # What is kept of it is a digest, not the address.
        kept = [tuple(r) for r in await db.fetch("SELECT digest, imported_ts FROM unbound_imports")]
        assert kept == [(unbound_digest("email", "a@example.com"), T0)]
    finally:
        await db.stop()
    # The old server still has a@; it also has an association made after the first import.
    later = [*rows, binding("c@example.com", "@c:hs.test", T0 + 10)]
    report = await do_import(config, source(later))
    assert counts(report, BINDINGS) == (3, 1, 0, 1)
    assert report.tables[BINDINGS].skipped == {"unbound here since an earlier import": 1}
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        rows_now = await db.fetch("SELECT address, mxid FROM bindings ORDER BY address")
        assert [tuple(r) for r in rows_now] == [
            ("b@example.com", "@b:hs.test"),
            ("c@example.com", "@c:hs.test"),
        ]
    finally:
        await db.stop()
    # A newer association of the unbound address (made on the old server later) is imported.
    newer = [binding("a@example.com", "@a2:hs.test", T0 + 20)]
    assert counts(await do_import(config, source(newer)), BINDINGS) == (1, 1, 0, 0)


async def test_pending_invites_are_kept_with_the_source_tokens_and_times(config: Config) -> None:
    invites = [
        pending_invite(1, "Invitee@Example.com"),
        pending_invite(2, "other@example.com", display_name="o…@e…", details={"room_name": "R"}),
        pending_invite(3, "bad@example.com", room_id="not a room"),
        pending_invite(4, "dup@example.com", token="sydentToken1"),
        pending_invite(5, "x@example.com", medium="msisdn"),
    ]
    report = await do_import(config, source(invites=invites))
    assert counts(report, INVITES) == (5, 2, 0, 0)
    assert report.tables[INVITES].skipped == {
        "not a room ID": 1,
        "token given twice": 1,
        "medium msisdn not supported": 1,
    }
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        listed = {i.token: i for i in await InviteStore(db).list(PENDING, 10)}
        sources = await db.fetch("SELECT DISTINCT imported_from FROM invites")
    finally:
        await db.stop()
    assert set(listed) == {"sydentToken1", "sydentToken2"}
    first = listed["sydentToken1"]
    assert first.id == invite_id("sydent", "1")
    assert (first.address, first.room_id, first.created_ts) == (
        "invitee@example.com",
        "!room1:hs.test",
        T0 + 1,
    )
    assert first.display_name == "i…@e…"  # redacted as our store-invite does
    assert first.signing_key_id == "ed25519:0"
    assert listed["sydentToken2"].details == {"room_name": "R"}
    assert [tuple(r) for r in sources] == [("sydent",)]


async def test_the_source_key_is_served_and_valid_and_a_revoked_one_invalid(
    config: Config, homeserver: FakeHomeserver
) -> None:
    keys = [
        ImportedSigningKey("ed25519:0", SEED, True),
        ImportedSigningKey("ed25519:old", OLD_SEED, False, valid=False),
    ]
    report = await do_import(config, source(keys=keys))
    assert counts(report, SIGNING_KEYS) == (2, 2, 0, 0)
    mode = stat.S_IMODE(key_path(config).stat().st_mode)
    assert mode == 0o600
    async with serving(config, homeserver) as api:
        status, body = await api.request("GET", "/_matrix/identity/v2/pubkey/ed25519:0")
        assert (status, body) == (200, {"public_key": public_of(SEED)})
        for seed, valid in ((SEED, True), (OLD_SEED, False)):
            assert await api.request("GET", isvalid(public_of(seed))) == (200, {"valid": valid})
        assert api.server.keyring.current.key_id == "ed25519:0"


async def test_an_imported_ephemeral_key_is_valid_until_its_invites_are_resolved_and_purged(
    config: Config, homeserver: FakeHomeserver
) -> None:
    await do_import(
        config,
        source(
            invites=[pending_invite(1, "invitee@example.com")],
            ephemeral=[ImportedEphemeralKey(EPHEMERAL_PUBLIC, T0)],
        ),
    )
    url = isvalid(EPHEMERAL_PUBLIC, ephemeral=True)
    async with serving(config, homeserver) as api:
        assert await api.request("GET", url) == (200, {"valid": True})
        assert await api.server.invites.expire(invite_id("sydent", "1"))
        assert await api.request("GET", url) == (200, {"valid": False})
        await api.server.purge_job.run_once()  # the server's purge job
        assert await api.server.db.fetchval("SELECT COUNT(*) FROM imported_ephemeral_keys") == 0


async def test_purge_keeps_imported_keys_while_a_pending_invite_remains(config: Config) -> None:
    await do_import(
        config,
        source(
            invites=[pending_invite(1, "invitee@example.com")],
            ephemeral=[ImportedEphemeralKey(EPHEMERAL_PUBLIC, T0)],
        ),
    )
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        assert await InviteStore(db).purge_imported_keys() == 0
        assert await InviteStore(db).has_imported_key(EPHEMERAL_PUBLIC)
    finally:
        await db.stop()


async def _onbind(api: Api) -> Any:
    """The one onbind notification queued."""
    rows = await api.server.db.fetch("SELECT body FROM onbind_outbox")
    assert len(rows) == 1
    return json.loads(rows[0]["body"])


def verify_key_of(seed: bytes) -> Any:
    """The signedjson verify key (``ed25519:0``) of a seed."""
    return signedjson.key.get_verify_key(
        signedjson.key.decode_signing_key_base64("ed25519", "0", encode_base64(seed))
    )


async def test_an_imported_invite_completes_with_an_onbind_signed_by_the_imported_key(
    config: Config, homeserver: FakeHomeserver
) -> None:
    await do_import(config, source(invites=[pending_invite(1, "invitee@example.com")]))
    async with serving(config, homeserver) as api:
        await api.add_binding("email", "invitee@example.com", "@invitee:hs.test")
        assert await api.server.invites.resolve_bound() == 1
        body = await _onbind(api)
    verify_key = verify_key_of(SEED)
    invite = body["invites"][0]
    assert invite["signed"]["token"] == "sydentToken1"
    assert invite["room_id"] == "!room1:hs.test"
    signedjson.sign.verify_signed_json(invite["signed"], "id.test", verify_key)
    signedjson.sign.verify_signed_json(body, "id.test", verify_key)


async def test_imported_invites_expire_counted_from_their_original_creation(
    config: Config, homeserver: FakeHomeserver
) -> None:
    """Expiry (7 days by default) counts from when the other server stored the invite, not
    from the import: one stored 8 days before expires at once, one stored 6 days before not."""
    day_ms = 86_400_000
    old = pending_invite(1, "old@example.com", created_ts=T0 - 8 * day_ms)
    recent = pending_invite(2, "recent@example.com", created_ts=T0 - 6 * day_ms)
    await do_import(config, source(invites=[old, recent]))
    async with serving(config, homeserver, FakeClock(T0 / 1000)) as api:
        assert await api.server.invites.expire_due() == 1
        expired = await InviteStore(api.server.db).by_token("sydentToken1")
        kept = await InviteStore(api.server.db).by_token("sydentToken2")
        assert expired is not None and kept is not None
        assert (expired.state, kept.state) == ("expired", PENDING)
        # Withdrawn like any of ours: resolved to the inviteExpired user, its onbind queued.
        body = await _onbind(api)
        assert body["mxid"] == expired.resolved_mxid
        assert body["invites"][0]["signed"]["token"] == "sydentToken1"
        signedjson.sign.verify_signed_json(
            body["invites"][0]["signed"], "id.test", verify_key_of(SEED)
        )


async def test_an_imported_ephemeral_private_key_signs_the_onbind(
    config: Config, homeserver: FakeHomeserver
) -> None:
    private = encode_base64(EPHEMERAL_SEED)
    invite = pending_invite(1, "invitee@example.com", ephemeral_private_key=private)
    await do_import(config, source(invites=[invite]))
    async with serving(config, homeserver) as api:
        url = isvalid(public_of(EPHEMERAL_SEED), ephemeral=True)
        assert await api.request("GET", url) == (200, {"valid": True})
        await api.add_binding("email", "invitee@example.com", "@invitee:hs.test")
        assert await api.server.invites.resolve_bound() == 1
        body = await _onbind(api)
    ephemeral = verify_key_of(EPHEMERAL_SEED)
    signedjson.sign.verify_signed_json(body["invites"][0]["signed"], "id.test", ephemeral)


def _full_source() -> ImportSource:
    return source(
        [binding("a@example.com", "@a:hs.test"), binding("b@example.com", "@b:hs.test")],
        [pending_invite(1, "c@example.com")],
        [ImportedSigningKey("ed25519:0", SEED, True)],
        [ImportedEphemeralKey(EPHEMERAL_PUBLIC, T0)],
    )


async def _table_counts(config: Config) -> dict[str, int]:
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        await db.migrate()
        tables = ("bindings", "invites", "signing_keys", "imported_ephemeral_keys", "import_runs")
        return {t: int(await db.fetchval(f"SELECT COUNT(*) FROM {t}")) for t in tables}
    finally:
        await db.stop()


async def test_a_second_run_changes_nothing(config: Config) -> None:
    first = await do_import(config, _full_source())
    assert first.changed
    key_file = key_path(config).read_bytes()
    before = await _table_counts(config)
    second = await do_import(config, _full_source())
    assert not second.changed
    for table in (BINDINGS, INVITES, SIGNING_KEYS, EPHEMERAL_KEYS):
        assert "nothing to change" in second.tables[table].line(table, False)
    assert "nothing to change" in second.lines()[-2]
    assert counts(second, BINDINGS) == (2, 0, 0, 2)
    assert key_path(config).read_bytes() == key_file
    assert await _table_counts(config) == before  # no second import_runs row either
    assert before["import_runs"] == 1


async def test_a_dry_run_writes_nothing(config: Config) -> None:
    empty = await _table_counts(config)
    report = await do_import(config, _full_source(), dry_run=True)
    assert counts(report, BINDINGS) == (2, 2, 0, 0)
    assert counts(report, INVITES) == (1, 1, 0, 0)
    assert counts(report, SIGNING_KEYS) == (1, 1, 0, 0)
    assert "would import 2" in "\n".join(report.lines())
    assert await _table_counts(config) == empty
    assert not key_path(config).exists()
    # The same on top of an import: a dry run of newer data leaves it as it was.
    await do_import(config, _full_source())
    after = await _table_counts(config)
    key_file = key_path(config).read_bytes()
    newer = source([binding("a@example.com", "@new:hs.test", T0 + 1)])
    report = await do_import(config, newer, dry_run=True)
    assert counts(report, BINDINGS) == (1, 0, 1, 0)
    assert await _table_counts(config) == after
    assert key_path(config).read_bytes() == key_file


async def _bind_here(config: Config, homeserver: FakeHomeserver) -> None:
    async with serving(config, homeserver) as api:
        await api.add_binding("email", "here@example.com", "@here:hs.test")


async def test_a_database_with_bindings_of_its_own_is_refused_without_merge(
    config: Config, homeserver: FakeHomeserver
) -> None:
    await _bind_here(config, homeserver)  # also makes our key ed25519:0
    before = await _table_counts(config)
    key_file = key_path(config).read_bytes()
    with pytest.raises(ImportRefused, match="--merge"):
        await do_import(config, _full_source())
    assert await _table_counts(config) == before
    assert key_path(config).read_bytes() == key_file

    report = await do_import(config, _full_source(), merge=True)
    assert counts(report, BINDINGS) == (2, 2, 0, 0)
    # Our ed25519:0 stays current; sydent's is kept under another id, and its invite uses it.
    assert any("imported as ed25519:sydent_0" in note for note in report.notes)
    async with serving(config, homeserver) as api:
        assert api.server.keyring.current.key_id == "ed25519:0"
        assert api.server.keyring.current.public_key != public_of(SEED)
        status, body = await api.request("GET", "/_matrix/identity/v2/pubkey/ed25519:sydent_0")
        assert (status, body) == (200, {"public_key": public_of(SEED)})
        assert await api.request("GET", isvalid(public_of(SEED))) == (200, {"valid": True})
        invite = await InviteStore(api.server.db).by_id(invite_id("sydent", "1"))
        assert invite is not None and invite.signing_key_id == "ed25519:sydent_0"
        found = await hashed_lookup(
            api, [("email", "a@example.com"), ("email", "here@example.com")]
        )
    assert found == {"a@example.com": "@a:hs.test", "here@example.com": "@here:hs.test"}
    # The merge is idempotent too.
    again = await do_import(config, _full_source(), merge=True)
    assert not again.changed


async def test_a_binding_made_here_is_no_longer_an_imported_one(
    config: Config, homeserver: FakeHomeserver
) -> None:
    await do_import(config, source([binding("a@example.com", "@a:hs.test")]))
    async with serving(config, homeserver) as api:
        await api.add_binding("email", "a@example.com", "@a:hs.test")
        value = await api.server.db.fetchval("SELECT imported_from FROM bindings")
    assert value is None
    with pytest.raises(ImportRefused):
        await do_import(config, source([binding("a@example.com", "@a:hs.test")]))


async def test_on_a_fresh_server_the_source_key_replaces_our_unused_one(
    config: Config, homeserver: FakeHomeserver
) -> None:
    async with serving(config, homeserver) as api:  # the first start made our ed25519:0
        ours = api.server.keyring.current.public_key
    old_file = key_path(config).read_bytes()
    report = await do_import(config, _full_source())
    assert any("replaces this server's unused ed25519:0" in note for note in report.notes)
    assert f"current signing key is now ed25519:0 {public_of(SEED)}" in report.notes
    backups = list(key_path(config).parent.glob(f"{key_path(config).name}.before-sydent-import-*"))
    assert len(backups) == 1
    assert backups[0].read_bytes() == old_file
    assert stat.S_IMODE(backups[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path(config).stat().st_mode) == 0o600
    async with serving(config, homeserver) as api:  # starts: the file and the table agree
        assert api.server.keyring.current.public_key == public_of(SEED)
        served = await api.request("GET", "/_matrix/identity/v2/pubkey/ed25519:0")
        assert served == (200, {"public_key": public_of(SEED)})
        assert await api.request("GET", isvalid(ours)) == (200, {"valid": False})


async def test_a_failure_in_the_middle_of_the_bindings_leaves_none(config: Config) -> None:
    def failing() -> Iterator[list[ImportedBinding]]:
        yield [binding("a@example.com", "@a:hs.test")]
        raise ImportFailed("sydent: the database is corrupt at row 2")

    src = source()
    src.bindings = failing
    with pytest.raises(ImportFailed, match="corrupt"):
        await do_import(config, src)
    counted = await _table_counts(config)
    assert (counted["bindings"], counted["invites"]) == (0, 0)


async def test_an_import_is_refused_while_a_server_holds_a_lease(config: Config) -> None:
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        await db.migrate()
        await db.execute("INSERT INTO store_sync (store, claimed_until) VALUES ('ldap', $1)", 2**62)
    finally:
        await db.stop()
    with pytest.raises(ImportRefused, match="stop every instance"):
        await do_import(config, _full_source())
    assert (await _table_counts(config))["bindings"] == 0


def test_slot_peppers_are_those_pepper_state_hashes_with() -> None:
    for generation, previous, following in ((0, None, None), (1, "p0", None), (3, "p2", "p4")):
        state = PepperState(generation, "pc", 0, previous, 0, following, 0, None, 0)
        (p0, p1), covered = state.slot_peppers()
        hashes = state.hashes("email", "a@example.com")
        expected = tuple(
            lookup_hash("a@example.com", "email", p) if p is not None else None for p in (p0, p1)
        )
        assert hashes.slots == expected
        assert hashes.generation == covered


def test_an_unknown_source_name_or_key_id_is_refused() -> None:
    with pytest.raises(ImportFailed, match="not ed25519"):
        _signing_key("ed25519:bad id", SEED)
    with pytest.raises(ImportFailed, match="32-byte"):
        _signing_key("ed25519:0", b"short")


async def test_a_source_without_a_valid_key_gets_a_new_current_key(
    config: Config, homeserver: FakeHomeserver
) -> None:
    revoked = ImportedSigningKey("ed25519:0", SEED, True, valid=False)
    report = await do_import(config, source(keys=[revoked]))
    assert any("a new key ed25519:1 signs here" in note for note in report.notes)
    async with serving(config, homeserver) as api:
        assert api.server.keyring.current.key_id == "ed25519:1"
        assert await api.request("GET", isvalid(public_of(SEED))) == (200, {"valid": False})
        current = api.server.keyring.current.public_key
        assert await api.request("GET", isvalid(current)) == (200, {"valid": True})


async def test_key_ids_keep_the_serials_ma1sd_gives_them(
    config: Config, homeserver: FakeHomeserver
) -> None:
    key = ImportedSigningKey("ed25519:AAGZ-x_3", SEED, True)
    await do_import(config, source(keys=[key], name="ma1sd"))
    async with serving(config, homeserver) as api:
        served = await api.request("GET", "/_matrix/identity/v2/pubkey/ed25519:AAGZ-x_3")
    assert served == (200, {"public_key": public_of(SEED)})


async def test_the_report_counts_invites_past_their_expiry(config: Config) -> None:
    old = pending_invite(1, "a@example.com")  # T0: years ago
    new = pending_invite(2, "b@example.com", created_ts=Clock().now_ms())
    report = await do_import(config, source(invites=[old, new]))
    assert counts(report, INVITES) == (2, 2, 0, 0)
    assert any(note.startswith("1 imported invites are older than") for note in report.notes)


async def test_an_invite_under_a_key_that_was_not_imported_is_signed_with_ours(
    config: Config,
) -> None:
    invite = pending_invite(1, "a@example.com", signing_key_id="ed25519:0")
    report = await do_import(config, source(invites=[invite], keys=[]))
    assert any("signed with this server's key" in note for note in report.notes)
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        stored = await InviteStore(db).by_id(invite_id("sydent", "1"))
    finally:
        await db.stop()
    assert stored is not None and stored.signing_key_id is None


async def _index_names(config: Config) -> list[str]:
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        await db.migrate()
        if db.is_postgres:
            query = (
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
                " AND tablename = 'bindings'"
            )
        else:
            query = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'bindings'"
        return sorted(str(row[0]) for row in await db.fetch(query))
    finally:
        await db.stop()


async def test_a_large_write_rebuilds_the_indexes_it_dropped(
    config: Config, homeserver: FakeHomeserver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "_REBUILD_INDEXES_FROM", 1)
    before = await _index_names(config)
    assert len(before) >= 5  # the primary key's and four more
    await do_import(config, source([binding("a@example.com", "@a:hs.test")]))
    newer = [binding("a@example.com", "@b:hs.test", T0 + 1), binding("c@example.com", "@c:hs.test")]
    report = await do_import(config, source(newer))  # the plan and the update, too
    assert counts(report, BINDINGS) == (2, 1, 1, 0)
    assert await _index_names(config) == before
    async with serving(config, homeserver) as api:
        found = await hashed_lookup(api, [("email", "a@example.com"), ("email", "c@example.com")])
    assert found == {"a@example.com": "@b:hs.test", "c@example.com": "@c:hs.test"}


async def test_a_database_error_is_one_line_naming_the_table_left_unwritten(
    config: Config,
) -> None:
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        await db.migrate()
        await db.execute("DROP TABLE imported_ephemeral_keys")  # the invites step fails
    finally:
        await db.stop()
    with pytest.raises(ImportFailed) as failed:
        await do_import(config, _full_source())
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("import: the database failed while importing invites")
    assert message.endswith("; signing keys, bindings were imported before it")
    counted = await _table_counts_without_ephemeral(config)
    assert (counted["bindings"], counted["invites"]) == (2, 0)


async def _table_counts_without_ephemeral(config: Config) -> dict[str, int]:
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        return {t: int(await db.fetchval(f"SELECT COUNT(*) FROM {t}")) for t in (BINDINGS, INVITES)}
    finally:
        await db.stop()


async def test_bindings_are_hashed_in_both_slots_after_a_pepper_rotation(
    config: Config, homeserver: FakeHomeserver
) -> None:
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        await db.migrate()
        # Generation 1 is current (slot 1); generation 0's pepper is still in slot 0.
        await db.execute(
            "INSERT INTO lookup_pepper (id, generation, pepper, since_ts, previous_pepper)"
            " VALUES (1, 1, 'pepperOne', 0, 'pepperZero')"
        )
    finally:
        await db.stop()
    await do_import(config, source([binding("a@example.com", "@a:hs.test")]))
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        row = await db.fetchrow("SELECT lookup_hash, lookup_hash_1, hash_gen FROM bindings")
    finally:
        await db.stop()
    assert tuple(row) == (
        lookup_hash("a@example.com", "email", "pepperZero"),
        lookup_hash("a@example.com", "email", "pepperOne"),
        1,
    )
    async with serving(config, homeserver) as api:
        assert await hashed_lookup(api, [("email", "a@example.com")]) == {
            "a@example.com": "@a:hs.test"
        }
