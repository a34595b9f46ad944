"""The key file against the keys the deployment published (the database), on both databases: a
replaced or lost key file stops start-up, one id never gets two keys, instances starting together
on a fresh deployment share one key."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import signedjson.key

from appservice.app import IdentityServer
from appservice.config import Config
from appservice.crypto.signing import KeyRing, PublicKey
from appservice.db.database import AppDatabase
from appservice.db.signing_keys import SigningKeyStore
from appservice.services.keys import KeyConflictError
from tests.support.api_server import make_config


async def _published(database_url: str) -> list[tuple[str, str]]:
    db = AppDatabase(database_url)
    await db.start()
    try:
        return [(k.key_id, k.public_key) for k in await SigningKeyStore(db).all()]
    finally:
        await db.stop()


async def _open(config: Config) -> PublicKey:
    """Open a server (as `run` and every command does), then stop it; its current key."""
    server = IdentityServer(config)
    try:
        await server.open()
        return server.keyring.current
    finally:
        await server.stop()


def _another_key_file(path: Path, version: str = "0") -> None:
    with path.open("w") as f:
        signedjson.key.write_signing_keys(f, [signedjson.key.generate_signing_key(version)])


def _edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


async def test_register_keeps_the_key_recorded_first_for_an_id(database_url: str) -> None:
    db = AppDatabase(database_url)
    await db.start()
    try:
        await db.migrate()
        store = SigningKeyStore(db)
        first = await store.register("ed25519:0", "A" * 43, 1)
        assert first is not None and first.public_key == "A" * 43
        again = await store.register("ed25519:0", "B" * 43, 2)
        assert again is not None and (again.public_key, again.created_ts) == ("A" * 43, 1)
        # The same public key under another id is not recorded either.
        assert await store.register("ed25519:1", "A" * 43, 3) is None
        assert [k.key_id for k in await store.all()] == ["ed25519:0"]
    finally:
        await db.stop()


async def test_a_replaced_key_file_stops_start_up_with_one_line(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url, {})
    published = await _open(config)
    key_path = Path(config.keys.signing_key_path)
    _another_key_file(key_path)

    with pytest.raises(KeyConflictError) as refused:
        await _open(config)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"keys.signing_key_path: {key_path} holds another ed25519:0 than the one this "
        "deployment published (recorded in the database)"
    )
    assert "restore this deployment's key file from a backup" in message
    assert "keys rotate --replace-lost-key" in message
    # Nothing changed: the published key stays the one the deployment signed with.
    assert await _published(database_url) == [("ed25519:0", published.public_key)]


async def test_a_lost_key_file_stops_start_up_and_no_key_is_made(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url, {})
    published = await _open(config)
    key_path = Path(config.keys.signing_key_path)
    os.unlink(key_path)

    with pytest.raises(KeyConflictError) as refused:
        await _open(config)
    assert str(refused.value) == (
        f"keys.signing_key_path: no signing key file at {key_path}, but the database records keys "
        "this deployment published (ed25519:0); restore the file from a backup (all instances "
        "use the same key file), or if it is lost for good run `keys rotate --replace-lost-key` "
        "to make a new key"
    )
    assert not KeyRing(key_path).exists()
    assert await _published(database_url) == [("ed25519:0", published.public_key)]


async def test_a_key_file_naming_a_published_key_differently_stops_start_up(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url, {})
    await _open(config)
    key_path = Path(config.keys.signing_key_path)
    _edit(key_path, "ed25519 0 ", "ed25519 7 ")
    with pytest.raises(KeyConflictError, match="names a key ed25519:7 that the database records"):
        await _open(config)


async def test_a_key_file_from_before_a_rotation_starts_with_a_warning(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, database_url, {})
    await _open(config)
    key_path = Path(config.keys.signing_key_path)
    os.link(key_path, tmp_path / "backup.key")
    KeyRing.load_or_create(key_path).rotate()
    assert (await _open(config)).key_id == "ed25519:1"
    os.replace(tmp_path / "backup.key", key_path)
    assert (await _open(config)).key_id == "ed25519:0"
    assert "lacks the valid keys ed25519:1" in caplog.text


async def test_instances_with_their_own_key_files_record_one_key_and_the_others_stop(
    tmp_path: Path, database_url: str
) -> None:
    # A deployment whose instances were (wrongly) given separate key files, started at once.
    configs = [
        make_config(
            tmp_path / str(i),
            database_url,
            {},
            f"keys: {{signing_key_path: '{tmp_path / str(i) / 'signing.key'}'}}",
        )
        for i in range(3)
    ]
    db = AppDatabase(database_url)
    await db.start()
    await db.migrate()
    await db.stop()
    results = await asyncio.gather(*(_open(c) for c in configs), return_exceptions=True)
    started = [r for r in results if isinstance(r, PublicKey)]
    refused = [r for r in results if isinstance(r, KeyConflictError)]
    assert len(started) == 1 and len(refused) == 2, results
    assert await _published(database_url) == [("ed25519:0", started[0].public_key)]


def test_instances_starting_together_on_a_fresh_deployment_share_one_key(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url, {})
    instances = 4
    barrier = threading.Barrier(instances)

    def start() -> PublicKey:
        barrier.wait()
        return asyncio.run(_open(config))

    with ThreadPoolExecutor(instances) as pool:
        keys = [f.result() for f in [pool.submit(start) for _ in range(instances)]]
    assert len(set(keys)) == 1
    assert KeyRing.load_or_create(Path(config.keys.signing_key_path)).current == keys[0]
    published = asyncio.run(_published(database_url))
    assert published == [("ed25519:0", keys[0].public_key)]
