"""``python -m appservice import ma1sd`` on both of our databases, then the server answering for
ma1sd's keys and completing its pending invites.

The ma1sd store is SQLite when ours is, PostgreSQL when ours is (ma1sd ran on both).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import signedjson.key
import signedjson.sign
import yaml
from aiohttp.test_utils import TestClient, TestServer

from appservice import cli
from appservice.app import IdentityServer
from appservice.config import load_config
from appservice.db.database import AppDatabase
from appservice.db.invites import BOUND, PENDING, InviteStore
from tests.api.test_bind import BIND, validated_session
from tests.conftest import postgres_schema, run_sync
from tests.support.api_server import Api
from tests.support.homeserver import FakeHomeserver
from tests.support.ma1sd import Ma1sdInvite, Ma1sdKeys, create_store, make_invite, public_key
from tests.support.signing_homeserver import SigningHomeserver
from tests.support.smtp import SmtpSink
from tests.support.twilio import FakeTwilio

V1 = "/_matrix/identity/api/v1"
V2 = "/_matrix/identity/v2"


def _main(*args: str) -> int:
    """The command line, in process (its own thread: it runs its own event loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(cli.main, list(args)).result()


pytestmark = pytest.mark.usefixtures("restore_logging")


@dataclass
class Ma1sd:
    """An ma1sd deployment: its store, its key store, and what the test put in them."""

    db: str
    keys: Ma1sdKeys
    serial: str
    seed: bytes
    revoked_serial: str
    revoked_seed: bytes
    pending: list[tuple[Ma1sdInvite, bytes]]
    resolved_ephemeral: bytes


@dataclass
class World:
    """Our config file and ma1sd's deployment, nothing imported yet."""

    config: Path
    key_file: Path
    database_url: str
    ma1sd: Ma1sd

    def import_args(self, *extra: str) -> list[str]:
        """``import ma1sd`` of this deployment."""
        return [
            "import", "ma1sd", "-c", str(self.config),
            "--db", self.ma1sd.db, "--keys", str(self.ma1sd.keys.path), *extra,
        ]  # fmt: skip


@pytest.fixture
async def ma1sd_source(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> AsyncIterator[str]:
    """Where ma1sd's store goes: SQLite beside an SQLite database of ours, else PostgreSQL."""
    if database_url.startswith("sqlite:"):
        yield str(tmp_path / "ma1sd.db")
        return
    async with postgres_schema(request.getfixturevalue("postgres_database"), "ma1sd") as url:
        yield url


@pytest.fixture
async def world(
    tmp_path: Path,
    database_url: str,
    ma1sd_source: str,
    homeserver: FakeHomeserver,
    smtp_sink: SmtpSink,
) -> World:
    keys = Ma1sdKeys(tmp_path / "ma1sd-keys")
    revoked_serial, revoked_seed = keys.new_regular(current=False, valid=False)
    serial, seed = keys.new_regular()
    sender = f"@alice:{homeserver.server_name}"
    now = int(time.time() * 1000)
    pending = [
        make_invite(
            keys,
            serial,
            seed,
            address=f"{name}@example.org",
            room_id=f"!{name}:hs.test",
            sender=sender,
            created_at=now - 60_000 * (i + 1),
        )
        for i, name in enumerate(("bob", "carol"))
    ]
    resolved, resolved_ephemeral = make_invite(
        keys, serial, seed, address="dave@example.org", room_id="!dave:hs.test", sender=sender,
        created_at=now - 3_600_000,
    )  # fmt: skip
    await create_store(ma1sd_source, [invite for invite, _ in pending], [resolved])
    key_file = tmp_path / "data" / "signing.key"
    settings = {
        "server": {"name": "id.test", "public_base_url": "https://id.test"},
        "database": {"url": database_url},
        "keys": {"signing_key_path": str(key_file)},
        "federation": {
            "overrides": {homeserver.server_name: homeserver.base_url},
            "allowed_networks": ["127.0.0.0/8"],
        },
        "notifications": {
            "email": {
                "connector": "smtp",
                "sender": "Identity <id@id.test>",
                "smtp": {"host": "127.0.0.1", "port": smtp_sink.port},
            }
        },
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    ma1sd = Ma1sd(
        ma1sd_source,
        keys,
        serial,
        seed,
        revoked_serial,
        revoked_seed,
        pending,
        resolved_ephemeral,
    )
    return World(config, key_file, database_url, ma1sd)


@pytest.fixture
async def started(
    world: World,
    homeserver: FakeHomeserver,
    smtp_sink: SmtpSink,
    twilio: FakeTwilio,
    signing_homeserver: SigningHomeserver,
    capsys: pytest.CaptureFixture[str],
) -> AsyncIterator[tuple[Api, str]]:
    """ma1sd imported, then our server started on that database: (api, the import's output)."""
    capsys.readouterr()
    assert _main(*world.import_args()) == 0
    out = capsys.readouterr().out
    server = IdentityServer(load_config(world.config, environ={}))
    await server.start()
    client = TestClient(TestServer(server.public_app()))
    await client.start_server()
    try:
        yield Api(client, server, homeserver, smtp_sink, twilio, signing_homeserver), out
    finally:
        await client.close()
        await server.stop()


async def _is_valid(api: Api, path: str, key: str) -> bool:
    status, body = await api.request("GET", f"{path}?public_key={quote(key, safe='')}")
    assert status == 200, body
    valid: bool = body["valid"]
    return valid


async def test_import_reports_what_it_found(started: tuple[Api, str], world: World) -> None:
    _, out = started
    assert "signing keys: found 2, imported 2" in out
    assert "invites: found 2, imported 2" in out
    assert "1 resolved invites" in out
    assert "identity store" in out  # ma1sd kept no bindings: configure its store here


async def test_pending_invites_carry_on_with_ma1sds_tokens(
    started: tuple[Api, str], world: World
) -> None:
    api, _ = started
    store = InviteStore(api.server.db)
    for invite, _ in world.ma1sd.pending:
        ours = await store.by_token(invite.token)
        assert ours is not None, invite.address
        assert ours.state == PENDING
        assert (ours.medium, ours.address, ours.room_id, ours.sender) == (
            "email",
            invite.address,
            invite.room_id,
            invite.sender,
        )
        assert ours.created_ts == invite.created_at
    assert len(await store.pending_in_room("!bob:hs.test")) == 1


async def test_pubkey_answers_ma1sds_keys(started: tuple[Api, str], world: World) -> None:
    api, _ = started
    m = world.ma1sd
    for prefix in (V2, V1):
        status, body = await api.request("GET", f"{prefix}/pubkey/ed25519:{m.serial}")
        assert (status, body) == (200, {"public_key": public_key(m.seed)})
        assert await _is_valid(api, f"{prefix}/pubkey/isvalid", public_key(m.seed))
        # Revoked in ma1sd, revoked here.
        assert not await _is_valid(api, f"{prefix}/pubkey/isvalid", public_key(m.revoked_seed))
        for _, e_seed in m.pending:
            assert await _is_valid(api, f"{prefix}/pubkey/ephemeral/isvalid", public_key(e_seed))
        assert not await _is_valid(
            api, f"{prefix}/pubkey/ephemeral/isvalid", public_key(m.resolved_ephemeral)
        )
    # ma1sd's current key signs what we sign from now on.
    assert api.server.keyring.current.public_key == public_key(m.seed)


async def test_binding_the_address_delivers_the_invite_signed_with_its_ephemeral_key(
    started: tuple[Api, str], world: World
) -> None:
    api, _ = started
    invite, e_seed = world.ma1sd.pending[0]
    mxid, token = await api.register("bob")
    sid = await validated_session(api, token, invite.address, secret="bobs-secret")
    status, body = await api.request(
        "POST", BIND, token=token, json={"sid": sid, "client_secret": "bobs-secret", "mxid": mxid}
    )
    assert status == 200, body

    [onbind] = await api.homeserver.wait_for_onbind(1, within=10.0)
    [delivered] = onbind["invites"]
    assert (delivered["room_id"], delivered["sender"]) == (invite.room_id, invite.sender)
    signed = delivered["signed"]
    assert (signed["mxid"], signed["token"]) == (mxid, invite.token)
    # The homeserver checks it against the keys in the room's invite event: ma1sd's.
    verify = signedjson.key.decode_verify_key_base64("ed25519", "0", public_key(e_seed))
    signedjson.sign.verify_signed_json(signed, "id.test", verify)
    ours = await InviteStore(api.server.db).by_token(invite.token)
    assert ours is not None and ours.state == BOUND


async def _counts(database_url: str) -> tuple[int, int]:
    db = AppDatabase(database_url)
    await db.start()
    try:
        invites = await db.fetchval("SELECT count(*) FROM invites")
        keys = await db.fetchval("SELECT count(*) FROM signing_keys")
    finally:
        await db.stop()
    return int(invites), int(keys)


def test_a_second_import_changes_nothing(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(*world.import_args()) == 0
    key_file = world.key_file.read_bytes()
    counts = run_sync(_counts(world.database_url))
    capsys.readouterr()

    assert _main(*world.import_args()) == 0

    out = capsys.readouterr().out
    assert "invites: found 2, nothing to change (2 unchanged)" in out
    assert "signing keys: found 2, nothing to change (2 unchanged)" in out
    assert world.key_file.read_bytes() == key_file
    assert run_sync(_counts(world.database_url)) == counts
    assert counts == (2, 2)


def test_dry_run_writes_nothing(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()

    assert _main(*world.import_args("--dry-run")) == 0

    out = capsys.readouterr().out
    assert "would import 2" in out
    assert not world.key_file.exists()
    assert run_sync(_counts(world.database_url)) == (0, 0)


def test_a_foreign_store_fails_in_one_line_and_writes_nothing(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE accounts (name TEXT)")
    conn.commit()
    conn.close()
    capsys.readouterr()
    args = world.import_args()
    args[args.index("--db") + 1] = str(foreign)

    assert _main(*args) != 0

    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "no invite_3pid table" in err
    assert not world.key_file.exists()
    assert os.path.exists(foreign)
