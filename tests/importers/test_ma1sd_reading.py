"""Reading an ma1sd store (SQLite and PostgreSQL) and its key store, as ma1sd laid them out."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from appservice.importers.ma1sd import IDENTITY_STORE_NOTE, read_ma1sd
from appservice.importers.model import ImportFailed
from tests.conftest import postgres_schema
from tests.support.ma1sd import (
    Ma1sdInvite,
    Ma1sdKeys,
    create_store,
    make_invite,
    new_serial,
    public_key,
    unpadded,
)

SENDER = "@alice:example.org"
ROOM = "!room:example.org"


@pytest.fixture(params=["sqlite", "postgres"])
async def ma1sd_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Where an ma1sd store is to be made: an SQLite path, or a fresh PostgreSQL schema's URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "ma1sd.db")
        return
    async with postgres_schema(request.getfixturevalue("postgres_database"), "ma1sd") as url:
        yield url


async def test_reads_pending_invites_keys_and_counts_resolved(
    ma1sd_db: str, tmp_path: Path
) -> None:
    keys = Ma1sdKeys(tmp_path / "keys")
    # About one ma1sd serial in ten holds a "-" (URL-safe base64).
    revoked_serial, revoked_seed = keys.new_regular(current=False, valid=False, dash=True)
    old_serial, old_seed = keys.new_regular(current=False)
    serial, seed = keys.new_regular()
    created = int(time.time() * 1000) - 3_600_000
    first, first_eseed = make_invite(
        keys, serial, seed, address="bob@example.com", room_id=ROOM, sender=SENDER,
        created_at=created,
    )  # fmt: skip
    second, second_eseed = make_invite(
        keys, old_serial, old_seed, address="carol@example.com", room_id="!other:example.org",
        sender=SENDER, created_at=created + 5,
    )  # fmt: skip
    resolved, _ = make_invite(
        keys, serial, seed, address="dave@example.com", room_id=ROOM, sender=SENDER,
        created_at=created,
    )  # fmt: skip
    await create_store(ma1sd_db, [first, second], [resolved])

    source = await read_ma1sd(ma1sd_db, keys.path)

    assert source.name == "ma1sd"
    assert source.binding_count == 0
    assert list(source.bindings()) == []
    assert IDENTITY_STORE_NOTE in source.notes
    assert source.skipped == {"resolved invites": 1, "ephemeral keys of resolved invites": 1}
    by_token = {i.token: i for i in source.invites}
    assert set(by_token) == {first.token, second.token}
    got = by_token[first.token]
    assert got.source_id == first.id
    assert (got.medium, got.address, got.room_id, got.sender) == (
        "email",
        "bob@example.com",
        ROOM,
        SENDER,
    )
    assert got.created_ts == created
    assert got.display_name == "bob..."
    assert got.signing_key_id == f"ed25519:{serial}"
    assert got.ephemeral_public_key == public_key(first_eseed)
    assert got.ephemeral_private_key == unpadded(first_eseed)
    assert got.details == {
        "sender_display_name": "Alice",
        "room_name": "Team room",
        "room_join_rules": "invite",
    }
    other = by_token[second.token]
    assert other.signing_key_id == f"ed25519:{old_serial}"
    assert other.room_id == "!other:example.org"
    assert other.created_ts == created + 5
    assert other.ephemeral_private_key == unpadded(second_eseed)
    signing = {k.key_id: k for k in source.signing_keys}
    assert set(signing) == {f"ed25519:{s}" for s in (revoked_serial, old_serial, serial)}
    assert signing[f"ed25519:{serial}"].seed == seed
    assert [k.key_id for k in source.signing_keys if k.current] == [f"ed25519:{serial}"]
    assert signing[f"ed25519:{old_serial}"].valid
    assert signing[f"ed25519:{old_serial}"].seed == old_seed
    assert not signing[f"ed25519:{revoked_serial}"].valid
    assert signing[f"ed25519:{revoked_serial}"].seed == revoked_seed
    assert source.ephemeral_keys == []


async def test_reading_changes_nothing(tmp_path: Path) -> None:
    keys = Ma1sdKeys(tmp_path / "keys")
    serial, seed = keys.new_regular()
    invite, _ = make_invite(
        keys, serial, seed, address="bob@example.com", room_id=ROOM, sender=SENDER, created_at=1
    )
    db = tmp_path / "ma1sd.db"
    await create_store(str(db), [invite])
    before = db.read_bytes()
    files = {p: p.read_bytes() for p in keys.path.rglob("*") if p.is_file()}

    await read_ma1sd(str(db), keys.path)

    assert db.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keys", "ma1sd.db"]
    assert {p: p.read_bytes() for p in keys.path.rglob("*") if p.is_file()} == files


async def test_invite_from_before_ephemeral_keys_counts_from_the_import(
    ma1sd_db: str, tmp_path: Path
) -> None:
    """mxisd before 1.4.0 stored no created_at and no key fields in properties."""
    old = Ma1sdInvite(
        id="example.orgemailerin@example.com",
        token="T" * 64,
        sender=SENDER,
        medium="email",
        address="erin@example.com",
        room_id=ROOM,
        properties={"room_name": "Old room", "sender_display_name": ""},
    )
    await create_store(ma1sd_db, [old])
    keys = Ma1sdKeys(tmp_path / "keys")
    keys.new_regular()
    before = int(time.time() * 1000)

    source = await read_ma1sd(ma1sd_db, keys.path)

    (got,) = source.invites
    assert before <= got.created_ts <= int(time.time() * 1000)
    assert got.ephemeral_public_key is None
    assert got.ephemeral_private_key is None
    assert got.signing_key_id is None
    assert got.details == {"room_name": "Old room"}
    assert source.skipped == {}


async def test_without_a_key_store_invites_keep_their_public_ephemeral_key(
    ma1sd_db: str, tmp_path: Path
) -> None:
    keys = Ma1sdKeys(tmp_path / "keys")
    serial, seed = keys.new_regular()
    invite, e_seed = make_invite(
        keys, serial, seed, address="bob@example.com", room_id=ROOM, sender=SENDER, created_at=7
    )
    await create_store(ma1sd_db, [invite])

    source = await read_ma1sd(ma1sd_db, None)

    assert source.signing_keys == []
    (got,) = source.invites
    assert got.ephemeral_public_key == public_key(e_seed)
    assert got.ephemeral_private_key is None
    assert any("--keys" in note for note in source.notes)


async def test_revoked_ephemeral_key_is_not_carried(tmp_path: Path) -> None:
    keys = Ma1sdKeys(tmp_path / "keys")
    serial, seed = keys.new_regular()
    invite, _ = make_invite(
        keys, serial, seed, address="bob@example.com", room_id=ROOM, sender=SENDER,
        created_at=7, ephemeral_valid=False,
    )  # fmt: skip
    db = str(tmp_path / "ma1sd.db")
    await create_store(db, [invite])

    source = await read_ma1sd(db, keys.path)

    (got,) = source.invites
    assert got.ephemeral_public_key is None
    assert got.ephemeral_private_key is None
    assert source.skipped["revoked ephemeral keys"] == 1


async def test_missing_ephemeral_key_file_is_noted(tmp_path: Path) -> None:
    keys = Ma1sdKeys(tmp_path / "keys")
    serial, seed = keys.new_regular()
    invite, e_seed = make_invite(
        None, serial, seed, address="bob@example.com", room_id=ROOM, sender=SENDER, created_at=7
    )
    db = str(tmp_path / "ma1sd.db")
    await create_store(db, [invite])

    source = await read_ma1sd(db, keys.path)

    (got,) = source.invites
    assert got.ephemeral_public_key == public_key(e_seed)
    assert got.ephemeral_private_key is None
    assert any("missing from the key store" in note for note in source.notes)


async def test_single_file_key_store_of_old_mxisd(tmp_path: Path) -> None:
    seed = secrets.token_bytes(32)
    key_file = tmp_path / "sign.key"
    key_file.write_text(unpadded(seed) + "\n")
    db = str(tmp_path / "ma1sd.db")
    await create_store(db, [])

    source = await read_ma1sd(db, key_file)

    (key,) = source.signing_keys
    assert (key.key_id, key.seed, key.current, key.valid) == ("ed25519:0", seed, True, True)
    assert source.invites == []


async def test_postgres_copy_without_quoted_identifiers(
    postgres_database: str, tmp_path: Path
) -> None:
    """pgloader without "quote identifiers" folds roomId to roomid: still read."""
    schema = f"ma1sd_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(postgres_database)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(
            f"CREATE TABLE {schema}.invite_3pid (id text PRIMARY KEY, token text, sender text,"
            " medium text, address text, roomId text, properties text)"
        )
        await conn.execute(
            f"INSERT INTO {schema}.invite_3pid VALUES ('i1', 'tok', $1, 'email', 'b@x.org', $2,"
            " $3)",
            SENDER,
            ROOM,
            json.dumps({"created_at": "42"}),
        )
        source = await read_ma1sd(f"{postgres_database}?search_path={schema}", None)
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()
    (got,) = source.invites
    assert (got.source_id, got.token, got.room_id, got.created_ts) == ("i1", "tok", ROOM, 42)


async def _expect_failure(db: str, key_dir: Path | None, words: str) -> None:
    with pytest.raises(ImportFailed) as info:
        await read_ma1sd(db, key_dir)
    message = str(info.value)
    assert "\n" not in message
    assert words in message


async def test_foreign_or_corrupt_store(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database " * 200)
    await _expect_failure(str(garbage), None, "not an ma1sd store")
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    await _expect_failure(str(other), None, "no invite_3pid table")
    await _expect_failure(str(tmp_path / "absent.db"), None, "no such ma1sd store")


async def test_foreign_or_unreachable_postgres(postgres_database: str) -> None:
    schema = f"empty_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(postgres_database)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await _expect_failure(
            f"{postgres_database}?search_path={schema}", None, "no invite_3pid table"
        )
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()
    url = "postgresql://nobody:hunter2@127.0.0.1:1/ma1sd?password=hunter3"
    with pytest.raises(ImportFailed) as info:
        await read_ma1sd(url, None)
    assert str(info.value).startswith("postgresql://127.0.0.1:1/ma1sd: cannot connect")
    assert "hunter" not in str(info.value)


async def test_bad_invite_rows(ma1sd_db: str) -> None:
    bad = Ma1sdInvite("i1", "tok", SENDER, "email", "b@x.org", ROOM, {})
    await create_store(ma1sd_db, [bad])
    if ma1sd_db.startswith("postgres"):
        conn = await asyncpg.connect(ma1sd_db)
        await conn.execute("""UPDATE invite_3pid SET properties = '["not", "a map"]'""")
        await conn.close()
    else:
        lite = sqlite3.connect(ma1sd_db)
        lite.execute("""UPDATE invite_3pid SET properties = '["not", "a map"]'""")
        lite.commit()
        lite.close()
    await _expect_failure(ma1sd_db, None, "properties is not a JSON map of strings")


def _key_store(tmp_path: Path) -> tuple[Ma1sdKeys, str]:
    keys = Ma1sdKeys(tmp_path / "keys")
    serial, _ = keys.new_regular()
    return keys, serial


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "not an ma1sd key file"),
        (json.dumps({"version": "0", "is_valid": True}), "not an ma1sd key file"),
        (json.dumps({"version": "0", "is_valid": True, "key": "!!!"}), "not base64"),
        (json.dumps({"version": "0", "is_valid": True, "key": "AAAA"}), "32-byte"),
    ],
)
async def test_bad_key_files(tmp_path: Path, content: str, words: str) -> None:
    db = str(tmp_path / "ma1sd.db")
    await create_store(db, [])
    keys, serial = _key_store(tmp_path)
    (keys.path / "regular" / "ed25519" / serial).write_text(content)
    await _expect_failure(db, keys.path, words)


async def test_bad_current_file(tmp_path: Path) -> None:
    db = str(tmp_path / "ma1sd.db")
    await create_store(db, [])
    keys, _ = _key_store(tmp_path)
    keys.set_current(new_serial())
    await _expect_failure(db, keys.path, "which has no key file")
    (keys.path / "current").write_text('{"type": "Ephemeral"}')
    await _expect_failure(db, keys.path, "not {")
    keys.new_regular(current=False)
    (keys.path / "current").unlink()
    await _expect_failure(db, keys.path, "current: missing")
    await _expect_failure(db, tmp_path / "nowhere", "no ma1sd key store")


async def test_ephemeral_key_not_matching_the_invite(tmp_path: Path) -> None:
    keys = Ma1sdKeys(tmp_path / "keys")
    serial, seed = keys.new_regular()
    invite, _ = make_invite(
        keys, serial, seed, address="bob@example.com", room_id=ROOM, sender=SENDER, created_at=7
    )
    invite.properties["e_key_public"] = public_key(secrets.token_bytes(32))
    db = str(tmp_path / "ma1sd.db")
    await create_store(db, [invite])
    await _expect_failure(db, keys.path, "does not match the key file")
