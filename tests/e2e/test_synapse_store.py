"""The ``synapse`` identity store reading a real Synapse's database (SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest
import yaml

from appservice.config import ConfigError, load_config_text
from appservice.config.model import SynapseStoreConfig
from appservice.identity_stores import StoreEntry, StoreError
from appservice.identity_stores.synapse import BATCH_SIZE, SynapseStore
from tests.e2e.conftest import RunningIdentityServer
from tests.e2e.flows import (
    bind_through_synapse,
    register_admin,
    register_everywhere,
    set_threepids,
    validate_email,
)
from tests.e2e.synapse_postgres import POSTGRES_ADMIN_URL, PostgresSynapse, synapse_postgres
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e

__all__ = ["synapse_postgres"]  # the fixture, imported for this module's tests

PASSWORD = "a long test password"


def _localpart(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _admin_token(server: SynapseServer) -> str:
    return await register_admin(server, _localpart("admin"))


async def _user_with(
    server: SynapseServer, admin_token: str, prefix: str, threepids: list[tuple[str, str]]
) -> str:
    user_id, _ = await server.register_user(_localpart(prefix), PASSWORD)
    await set_threepids(server, admin_token, user_id, threepids)
    return user_id


async def _deactivate(server: SynapseServer, admin_token: str, user_id: str) -> None:
    status, body = await server.client_request(
        "POST", f"/_synapse/admin/v1/deactivate/{quote(user_id, safe='')}", admin_token, json={}
    )
    assert status == 200, body


async def _started(url: str, default_server: str, **settings: str) -> SynapseStore:
    """A started store; ``threepids: all`` unless given (these tests add 3PIDs through the
    admin API, which binds none; the default is ``bound``)."""
    settings.setdefault("threepids", "all")
    store = SynapseStore(SynapseStoreConfig(database_url=url, **settings), default_server)
    await store.start()
    return store


async def _entries(store: SynapseStore) -> list[StoreEntry]:
    return [entry async for entry in store.entries()]


def _sqlite_url(synapse: SynapseServer) -> str:
    return f"sqlite:{synapse.workdir / 'homeserver.db'}"


def _copy_of_synapse_db(synapse: SynapseServer, target: Path) -> sqlite3.Connection:
    """A consistent copy of the running Synapse's database (SQLite's backup API), open for
    writing test rows; the copy is in rollback-journal mode, as a file handed over would be."""
    source = sqlite3.connect(f"file:{synapse.workdir / 'homeserver.db'}?mode=ro", uri=True)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        source.close()
    copy.execute("PRAGMA journal_mode=DELETE")
    return copy


@pytest.fixture(scope="module")
async def admin_token(synapse: SynapseServer) -> str:
    """An access token of a server admin of the session Synapse."""
    return await _admin_token(synapse)


@pytest.fixture
async def store(synapse: SynapseServer) -> AsyncIterator[SynapseStore]:
    """The store on the session Synapse's live SQLite database, all 3PIDs."""
    store = await _started(_sqlite_url(synapse), synapse.server_name)
    try:
        yield store
    finally:
        await store.close()


async def test_email_synapse_knows_is_found_and_listed(
    synapse: SynapseServer, admin_token: str, store: SynapseStore
) -> None:
    address = f"{_localpart('dora')}@example.org"
    user_id = await _user_with(synapse, admin_token, "dora", [("email", address)])

    assert await store.find([("email", address)]) == {("email", address): user_id}
    assert StoreEntry("email", address, user_id) in await _entries(store)


async def test_bulk_find_answers_known_threepids_and_skips_misses(
    synapse: SynapseServer, admin_token: str, store: SynapseStore
) -> None:
    email = f"{_localpart('ed')}@example.org"
    phone = "4915" + str(uuid.uuid4().int)[:9]
    ed = await _user_with(synapse, admin_token, "ed", [("email", email), ("msisdn", phone)])
    other_email = f"{_localpart('fay')}@example.org"
    fay = await _user_with(synapse, admin_token, "fay", [("email", other_email)])

    found = await store.find(
        [
            ("email", email),
            ("email", "nobody-" + email),
            ("msisdn", phone),
            ("msisdn", "4930123456789"),
            ("email", other_email),
            ("email", email),
        ]
    )
    assert found == {("email", email): ed, ("msisdn", phone): ed, ("email", other_email): fay}


async def test_other_server_name_sees_nobody(
    synapse: SynapseServer, admin_token: str, store: SynapseStore
) -> None:
    address = f"{_localpart('gus')}@example.org"
    await _user_with(synapse, admin_token, "gus", [("email", address)])
    elsewhere = await _started(_sqlite_url(synapse), "other.example")
    try:
        assert await elsewhere.find([("email", address)]) == {}
        assert await _entries(elsewhere) == []
    finally:
        await elsewhere.close()
    # The server name in the config wins over the default given to the store.
    configured = await _started(
        _sqlite_url(synapse), "other.example", server_name=synapse.server_name
    )
    try:
        assert len(await configured.find([("email", address)])) == 1
    finally:
        await configured.close()


async def test_deactivated_user_is_not_found(
    synapse: SynapseServer, admin_token: str, store: SynapseStore
) -> None:
    address = f"{_localpart('hal')}@example.org"
    user_id = await _user_with(synapse, admin_token, "hal", [("email", address)])
    assert await store.find([("email", address)]) == {("email", address): user_id}

    await _deactivate(synapse, admin_token, user_id)
    assert await store.find([("email", address)]) == {}
    assert all(entry.mxid != user_id for entry in await _entries(store))


async def test_deactivated_flag_alone_hides_threepids_and_roles(
    synapse: SynapseServer, admin_token: str, tmp_path: Path
) -> None:
    # Synapse also deletes the 3PIDs of a user it deactivates; the store must not depend on it
    # (a deactivation half done, an older Synapse), so only the flag changes in this copy.
    address = f"{_localpart('ivy')}@example.org"
    user_id, _ = await synapse.register_user(_localpart("ivy"), PASSWORD, admin=True)
    await set_threepids(synapse, admin_token, user_id, [("email", address)])
    db = _copy_of_synapse_db(synapse, tmp_path / "copy.db")
    with db:
        db.execute("UPDATE users SET deactivated = 1 WHERE name = ?", (user_id,))
    db.close()

    store = await _started(f"sqlite:{tmp_path / 'copy.db'}", synapse.server_name)
    try:
        assert await store.find([("email", address)]) == {}
        assert all(entry.mxid != user_id for entry in await _entries(store))
        assert await store.roles(user_id) == frozenset()
    finally:
        await store.close()


async def test_admin_role_follows_synapse_admin_flag(
    synapse: SynapseServer, store: SynapseStore
) -> None:
    admin, _ = await synapse.register_user(_localpart("jo"), PASSWORD, admin=True)
    plain, _ = await synapse.register_user(_localpart("kim"), PASSWORD)

    assert await store.roles(admin) == frozenset({"admin"})
    assert await store.roles(plain) == frozenset()
    assert await store.roles(f"@nobody-{uuid.uuid4().hex}:{synapse.server_name}") == frozenset()
    # A user ID of another server is not Synapse's user, even with the same localpart.
    assert await store.roles(admin.rsplit(":", 2)[0] + ":other.example") == frozenset()

    named = await _started(_sqlite_url(synapse), synapse.server_name, admin_role="inviters")
    no_role = await _started(_sqlite_url(synapse), synapse.server_name, admin_role="")
    try:
        assert await named.roles(admin) == frozenset({"inviters"})
        assert await no_role.roles(admin) == frozenset()
    finally:
        await named.close()
        await no_role.close()


async def test_bound_mode_returns_only_threepids_bound_through_synapse(
    synapse: SynapseServer, identity_server: RunningIdentityServer, admin_token: str
) -> None:
    ids = identity_server
    bound_address = f"{_localpart('lea')}@example.org"
    user_id, hs_token, is_token = await register_everywhere(synapse, ids, _localpart("lea"))
    sid = await validate_email(ids, is_token, bound_address, "leas-secret")
    # Synapse records the bind in user_threepid_id_server (id_server = our name).
    await bind_through_synapse(synapse, ids, hs_token, is_token, sid, "leas-secret")
    await set_threepids(synapse, admin_token, user_id, [("email", bound_address)])
    unbound_address = f"{_localpart('max')}@example.org"
    unbound_user = await _user_with(synapse, admin_token, "max", [("email", unbound_address)])
    asked = [("email", bound_address), ("email", unbound_address)]

    url = _sqlite_url(synapse)
    everything = await _started(url, synapse.server_name)
    any_server = await _started(url, synapse.server_name, threepids="bound")
    ours = await _started(url, synapse.server_name, threepids="bound", id_server=ids.name)
    other = await _started(url, synapse.server_name, threepids="bound", id_server="is.example")
    try:
        assert await everything.find(asked) == {
            ("email", bound_address): user_id,
            ("email", unbound_address): unbound_user,
        }
        assert await any_server.find(asked) == {("email", bound_address): user_id}
        assert await ours.find(asked) == {("email", bound_address): user_id}
        assert await other.find(asked) == {}

        listed = {e.address for e in await _entries(any_server)}
        assert bound_address in listed
        assert unbound_address not in listed
        assert bound_address in {e.address for e in await _entries(ours)}
        assert await _entries(other) == []
    finally:
        for store in (everything, any_server, ours, other):
            await store.close()


async def test_entries_stream_every_row_canonical_and_skip_invalid(
    synapse: SynapseServer, tmp_path: Path
) -> None:
    count = 2 * BATCH_SIZE + 7
    path = tmp_path / "copy.db"
    db = _copy_of_synapse_db(synapse, path)
    local = f"@bulk:{synapse.server_name}"
    with db:
        db.execute("INSERT INTO users (name, creation_ts) VALUES (?, 0)", (local,))
        db.execute("INSERT INTO users (name, creation_ts) VALUES ('@far:other.example', 0)")
        db.executemany(
            "INSERT INTO user_threepids (user_id, medium, address, validated_at, added_at)"
            " VALUES (?, ?, ?, 0, 0)",
            [(local, "email", f"Bulk.{i}@Example.ORG") for i in range(count)]
            + [
                (local, "email", "not an address"),
                (local, "msisdn", "+4915112345678"),
                (local, "msisdn", "12"),
                ("@far:other.example", "email", "far@example.org"),
            ],
        )
    db.close()
    # Opened read-only, the store works on a file nobody may write.
    path.chmod(0o444)

    store = await _started(f"sqlite:{path}", synapse.server_name)
    try:
        mine = [e for e in await _entries(store) if e.mxid == local]
    finally:
        await store.close()
    expected = {StoreEntry("email", f"bulk.{i}@example.org", local) for i in range(count)}
    expected.add(StoreEntry("msisdn", "4915112345678", local))
    assert len(mine) == len(expected)
    assert set(mine) == expected


async def test_abandoned_listing_releases_its_connection(
    synapse: SynapseServer, admin_token: str, store: SynapseStore
) -> None:
    address = f"{_localpart('ned')}@example.org"
    await _user_with(synapse, admin_token, "ned", [("email", address)])
    listing = store.entries()
    first = await anext(listing)
    assert first.medium in ("email", "msisdn")
    await listing.aclose()
    assert len(await store.find([("email", address)])) == 1


async def test_database_that_is_not_synapse_raises_store_error(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    db.close()
    store = SynapseStore(SynapseStoreConfig(database_url=f"sqlite:{other}"), "hs.example")
    with pytest.raises(StoreError, match="not a Synapse database"):
        await store.start()

    missing = SynapseStore(
        SynapseStoreConfig(database_url=f"sqlite:{tmp_path / 'missing.db'}"), "hs.example"
    )
    with pytest.raises(StoreError, match="does not exist"):
        await missing.start()
    with pytest.raises(StoreError, match="does not exist"):
        await missing.find([("email", "a@example.org")])


async def test_postgres_that_is_not_synapse_or_unreachable_raises_store_error() -> None:
    plain = SynapseStore(SynapseStoreConfig(database_url=POSTGRES_ADMIN_URL), "hs.example")
    try:
        with pytest.raises(StoreError, match="not a Synapse database"):
            await plain.start()
    finally:
        await plain.close()

    secret = "s3cret-" + uuid.uuid4().hex
    # Port 9 (discard): nothing listens there on a test machine.
    unreachable = SynapseStore(
        SynapseStoreConfig(database_url=f"postgresql://synapse:{secret}@127.0.0.1:9/synapse"),
        "hs.example",
    )
    try:
        with pytest.raises(StoreError, match="unreachable") as caught:
            await unreachable.start()
    finally:
        await unreachable.close()
    message = str(caught.value)
    assert secret not in message
    assert "\n" not in message
    assert "127.0.0.1:9/synapse" in message


async def test_postgres_synapse_find_entries_and_roles(
    synapse_postgres: PostgresSynapse,
) -> None:
    server = synapse_postgres.server
    token = await _admin_token(server)
    address = f"{_localpart('ola')}@example.org"
    phone = "4917" + str(uuid.uuid4().int)[:9]
    user_id, _ = await server.register_user(_localpart("ola"), PASSWORD, admin=True)
    await set_threepids(server, token, user_id, [("email", address), ("msisdn", phone)])
    gone = await _user_with(server, token, "pia", [("email", "pia-" + address)])
    await _deactivate(server, token, gone)

    store = await _started(synapse_postgres.database_url, server.server_name)
    try:
        found = await store.find(
            [("email", address), ("msisdn", phone), ("email", "pia-" + address)]
        )
        assert found == {("email", address): user_id, ("msisdn", phone): user_id}
        listed = await _entries(store)
        assert StoreEntry("email", address, user_id) in listed
        assert StoreEntry("msisdn", phone, user_id) in listed
        assert all(e.mxid != gone for e in listed)
        assert await store.roles(user_id) == frozenset({"admin"})
        assert await store.roles(gone) == frozenset()
    finally:
        await store.close()


async def test_postgres_synapse_bound_mode(synapse_postgres: PostgresSynapse) -> None:
    server = synapse_postgres.server
    token = await _admin_token(server)
    bound_address = f"{_localpart('quinn')}@example.org"
    bound_user = await _user_with(server, token, "quinn", [("email", bound_address)])
    unbound_address = f"{_localpart('rae')}@example.org"
    await _user_with(server, token, "rae", [("email", unbound_address)])
    # Binding through this second Synapse would need a second identity server; the row Synapse
    # would write after a bind is written directly instead (the bind itself is covered above).
    conn = await asyncpg.connect(synapse_postgres.database_url)
    try:
        await conn.execute(
            "INSERT INTO user_threepid_id_server (user_id, medium, address, id_server)"
            " VALUES ($1, 'email', $2, 'is.example')",
            bound_user,
            bound_address,
        )
    finally:
        await conn.close()
    asked = [("email", bound_address), ("email", unbound_address)]

    url = synapse_postgres.database_url
    any_server = await _started(url, server.server_name, threepids="bound")
    named = await _started(url, server.server_name, threepids="bound", id_server="is.example")
    other = await _started(url, server.server_name, threepids="bound", id_server="other.example")
    try:
        assert await any_server.find(asked) == {("email", bound_address): bound_user}
        assert await named.find(asked) == {("email", bound_address): bound_user}
        assert await other.find(asked) == {}
        assert {e.address for e in await _entries(named)} == {bound_address}
        assert await _entries(other) == []
    finally:
        for store in (any_server, named, other):
            await store.close()


@pytest.mark.parametrize(
    ("synapse_settings", "error"),
    [
        ({"database_url": "mysql://synapse"}, "stores.synapse.database_url: .* not a sqlite:"),
        ({"database_url": "sqlite:homeserver.db"}, "stores.synapse.database_url: .* absolute"),
        (
            {"database_url": "sqlite:/hs.db", "threepids": "some"},
            "stores.synapse.threepids: .* not all or bound",
        ),
        (
            {"database_url": "sqlite:/hs.db", "threepids": "all", "id_server": "is.example"},
            "stores.synapse.id_server: only used with threepids: bound",
        ),
    ],
)
def test_config_mistakes_name_the_key(
    tmp_path: Path, synapse_settings: dict[str, str], error: str
) -> None:
    text = yaml.safe_dump({"stores": {"order": ["synapse"], "synapse": synapse_settings}})
    with pytest.raises(ConfigError, match=error):
        load_config_text(text, tmp_path, environ={})


def test_config_accepts_bound_mode_with_id_server(tmp_path: Path) -> None:
    settings = {
        "database_url": "postgresql://synapse@db.example/synapse",
        "threepids": "bound",
        "id_server": "is.example",
    }
    text = yaml.safe_dump({"stores": {"order": ["synapse"], "synapse": settings}})
    config = load_config_text(text, tmp_path, environ={})
    assert config.stores.synapse == SynapseStoreConfig(**settings)
