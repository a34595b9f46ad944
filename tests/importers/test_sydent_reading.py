"""Reading sydent's data: hand-built SQLite files shaped like sydent's schema versions."""

from __future__ import annotations

import base64
import sqlite3
import time
from pathlib import Path

import nacl.signing
import pytest

from appservice.importers import sydent
from appservice.importers.model import ImportedBinding, ImportFailed, ImportSource
from appservice.importers.sydent import (
    SydentImportError,
    parse_signing_key,
    read_signing_key,
    read_sydent,
)

SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
NOW_MS = int(time.time() * 1000)
LATER = NOW_MS + 10**12
EARLIER = NOW_MS - 10**9


def sydent_db(path: Path, version: int = 5, *, underscored: bool = False) -> sqlite3.Connection:
    """An empty database with sydent's tables as they are at ``user_version`` ``version``."""
    nb, na = ("not_before", "not_after") if underscored else ("notBefore", "notAfter")
    autoincrement = "" if version == 0 else " autoincrement"
    required = " not null" if version == 0 else ""
    hashed = ", lookup_hash varchar(256)" if version >= 3 else ""
    conn = sqlite3.connect(path)
    conn.executescript(
        f"""
        CREATE TABLE local_threepid_associations (
            id integer primary key{autoincrement}, medium varchar(16) not null,
            address varchar(256) not null, mxid varchar(256){required}, ts integer{required},
            {nb} bigint{required}, {na} bigint{required}{hashed});
        CREATE UNIQUE INDEX local_threepid_medium_address
            ON local_threepid_associations(medium, address);
        CREATE TABLE global_threepid_associations (
            id integer primary key, medium varchar(16) not null, address varchar(256) not null,
            mxid varchar(256) not null, ts integer not null, {nb} bigint not null,
            {na} integer not null, originServer varchar(255) not null,
            originId integer not null, sgAssoc text not null{hashed});
        CREATE TABLE invite_tokens (
            id integer primary key, medium varchar(16) not null, address varchar(256) not null,
            room_id varchar(256) not null, sender varchar(256) not null,
            token varchar(256) not null, received_ts bigint, sent_ts bigint);
        CREATE TABLE ephemeral_public_keys (
            id integer primary key, public_key varchar(256) not null,
            verify_count bigint default 0, persistence_ts bigint);
        PRAGMA user_version = {version};
        """
    )
    if version >= 3:
        conn.execute("CREATE TABLE hashing_metadata (id integer primary key, lookup_pepper text)")
        conn.execute("INSERT INTO hashing_metadata VALUES (1, 'pepper')")
    return conn


def local(conn: sqlite3.Connection, address: str, mxid: str | None, ts: int, **kw: int) -> None:
    """A row of the local table (``mxid`` None: sydent's unbind row)."""
    not_before, not_after = (None, None) if mxid is None else (ts, kw.get("not_after", LATER))
    conn.execute(
        "INSERT OR REPLACE INTO local_threepid_associations"
        " (medium, address, mxid, ts, notBefore, notAfter) VALUES (?, ?, ?, ?, ?, ?)",
        (
            "msisdn" if kw.get("medium_msisdn") else "email",
            address,
            mxid,
            ts,
            not_before,
            not_after,
        ),
    )


def remote(conn: sqlite3.Connection, address: str, mxid: str, ts: int, origin_id: int) -> None:
    """A row of the global table, replicated from a peer."""
    conn.execute(
        "INSERT INTO global_threepid_associations (medium, address, mxid, ts, notBefore,"
        " notAfter, originServer, originId, sgAssoc)"
        " VALUES ('email', ?, ?, ?, ?, ?, 'peer', ?, '{}')",
        (address, mxid, ts, ts, LATER, origin_id),
    )


def write_config(tmp_path: Path) -> Path:
    conf = tmp_path / "sydent.conf"
    conf.write_text(
        f'[general]\nserver.name = id.example\n[crypto]\ned25519.signingkey = "ed25519 0 {SEED}"\n'
    )
    return conf


def all_bindings(source: ImportSource) -> list[ImportedBinding]:
    return [binding for batch in source.bindings() for binding in batch]


def test_signing_key_from_config(tmp_path: Path) -> None:
    key = read_signing_key(write_config(tmp_path))
    assert key.key_id == "ed25519:0"
    assert len(key.seed) == 32
    verify = nacl.signing.SigningKey(key.seed).verify_key
    assert key.public_key_base64 == base64.b64encode(bytes(verify)).decode().rstrip("=")


@pytest.mark.parametrize("value", ["ed25519 0", "rsa 0 abc", "ed25519 0 !!!", "ed25519 0 AAAA"])
def test_bad_signing_key(value: str) -> None:
    with pytest.raises(SydentImportError):
        parse_signing_key(value)


def test_config_without_key(tmp_path: Path) -> None:
    conf = tmp_path / "sydent.conf"
    conf.write_text("[general]\nserver.name = id.example\n")
    with pytest.raises(SydentImportError, match=r"no \[crypto\] ed25519\.signingkey"):
        read_signing_key(conf)


def test_newest_state_wins_across_both_tables(tmp_path: Path) -> None:
    db = tmp_path / "sydent.db"
    conn = sydent_db(db)
    # Bound here, then a newer binding from a peer: the peer's wins.
    local(conn, "a@x", "@old:x", NOW_MS - 2000)
    remote(conn, "a@x", "@new:x", NOW_MS - 1000, 1)
    # A peer's binding, then unbound here (sydent's local NULL row is newer): not imported.
    remote(conn, "gone@x", "@gone:x", NOW_MS - 2000, 2)
    local(conn, "gone@x", None, NOW_MS - 1000)
    # Bound here (and copied to the global table at the same ts, as sydent does).
    local(conn, "both@x", "@both:x", NOW_MS - 500)
    remote(conn, "both@x", "@both:x", NOW_MS - 500, 3)
    # Two rows for one address differing in case (stored before sydent case-folded): newest.
    remote(conn, "Case@X", "@first:x", NOW_MS - 3000, 4)
    remote(conn, "case@x", "@second:x", NOW_MS - 2500, 5)
    # Expired: counted, not imported.
    local(conn, "old@x", "@expired:x", NOW_MS - 5000, not_after=EARLIER)
    local(conn, "15551234567", "@phone:x", NOW_MS - 100, medium_msisdn=1)
    conn.commit()
    conn.close()

    source = read_sydent(db, write_config(tmp_path))
    got = sorted(all_bindings(source))
    assert [(b.medium, b.address, b.mxid) for b in got] == [
        ("email", "a@x", "@new:x"),
        ("email", "both@x", "@both:x"),
        ("email", "case@x", "@second:x"),
        ("msisdn", "15551234567", "@phone:x"),
    ]
    assert source.binding_count == 4
    assert source.skipped["expired bindings"] == 1
    assert source.skipped["unbound 3PIDs"] == 1
    a = got[0]
    assert (a.ts, a.not_before, a.not_after) == (NOW_MS - 1000, NOW_MS - 1000, LATER)
    assert sorted(all_bindings(source)) == got  # bindings() reads again


def test_bindings_come_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sydent, "BATCH_SIZE", 7)
    db = tmp_path / "sydent.db"
    conn = sydent_db(db)
    for i in range(30):
        local(conn, f"u{i}@x", f"@u{i}:x", NOW_MS - i)
    conn.commit()
    conn.close()
    source = read_sydent(db, write_config(tmp_path))
    sizes = [len(batch) for batch in source.bindings()]
    assert sizes == [7, 7, 7, 7, 2]
    assert source.binding_count == 30


def test_pending_invites_and_ephemeral_keys(tmp_path: Path) -> None:
    db = tmp_path / "sydent.db"
    conn = sydent_db(db)
    received_s = NOW_MS // 1000 - 3600
    conn.executemany(
        "INSERT INTO invite_tokens (id, medium, address, room_id, sender, token, received_ts,"
        " sent_ts) VALUES (?, 'email', ?, '!room:hs', '@alice:hs', ?, ?, ?)",
        [
            (7, "pending@x", "tok-pending", received_s, None),
            (8, "sent@x", "tok-sent", received_s, received_s + 60),
            (9, "old@x", "tok-old", None, None),
        ],
    )
    conn.execute(
        "INSERT INTO ephemeral_public_keys (public_key, verify_count, persistence_ts)"
        " VALUES ('ZXBoZW1lcmFsLWtleS1vbmU', 3, ?)",
        (received_s,),
    )
    conn.commit()
    conn.close()

    source = read_sydent(db, write_config(tmp_path))
    assert [(i.source_id, i.token, i.address) for i in source.invites] == [
        ("7", "tok-pending", "pending@x"),
        ("9", "tok-old", "old@x"),
    ]
    pending = source.invites[0]
    assert (pending.medium, pending.room_id, pending.sender) == ("email", "!room:hs", "@alice:hs")
    assert pending.created_ts == received_s * 1000  # sydent stores seconds
    assert pending.signing_key_id == "ed25519:0"
    # No received_ts (never the case since sydent 1.0): counted from the import.
    assert source.invites[1].created_ts >= NOW_MS
    assert source.skipped["delivered invites"] == 1
    assert [(k.public_key, k.created_ts) for k in source.ephemeral_keys] == [
        ("ZXBoZW1lcmFsLWtleS1vbmU", received_s * 1000)
    ]
    [key] = source.signing_keys
    assert (key.key_id, key.current, key.valid) == ("ed25519:0", True, True)
    assert key.seed == parse_signing_key(f"ed25519 0 {SEED}").seed
    assert source.name == "sydent" and source.notes == []


def test_pending_invites_without_the_key_are_refused(tmp_path: Path) -> None:
    db = tmp_path / "sydent.db"
    conn = sydent_db(db)
    conn.execute(
        "INSERT INTO invite_tokens (medium, address, room_id, sender, token, received_ts)"
        " VALUES ('email', 'p@x', '!r:hs', '@a:hs', 'tok', 1)"
    )
    conn.commit()
    conn.close()
    with pytest.raises(ImportFailed, match="1 pending invites, which need its signing key"):
        read_sydent(db, None)


def test_without_config_and_invites_a_note_says_the_key_stays_behind(tmp_path: Path) -> None:
    db = tmp_path / "sydent.db"
    conn = sydent_db(db)
    local(conn, "a@x", "@a:x", NOW_MS)
    conn.commit()
    conn.close()
    source = read_sydent(db, None)
    assert source.signing_keys == []
    assert len(source.notes) == 1 and "--sydent-config" in source.notes[0]
    assert [b.mxid for b in all_bindings(source)] == ["@a:x"]


@pytest.mark.parametrize(
    ("version", "underscored"), [(0, False), (1, False), (3, False), (5, True)]
)
def test_schema_versions(tmp_path: Path, version: int, underscored: bool) -> None:
    db = tmp_path / "sydent.db"
    conn = sydent_db(db, version, underscored=underscored)
    nb, na = ("not_before", "not_after") if underscored else ("notBefore", "notAfter")
    conn.execute(
        f"INSERT INTO local_threepid_associations (medium, address, mxid, ts, {nb}, {na})"
        " VALUES ('email', 'a@x', '@a:x', ?, ?, ?)",
        (NOW_MS, NOW_MS, LATER),
    )
    conn.commit()
    conn.close()
    source = read_sydent(db, write_config(tmp_path))
    assert [(b.address, b.mxid) for b in all_bindings(source)] == [("a@x", "@a:x")]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImportFailed, match="no such file"):
        read_sydent(tmp_path / "nope.db", None)


def test_not_an_sqlite_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.db"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ImportFailed, match="not an SQLite database") as info:
        read_sydent(bad, None)
    assert "\n" not in str(info.value)


def test_corrupt_database(tmp_path: Path) -> None:
    db = tmp_path / "sydent.db"
    conn = sydent_db(db)
    for i in range(2000):
        local(conn, f"user{i}@example.org", f"@user{i}:example.org", NOW_MS)
    conn.commit()
    conn.close()
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[3 * page : 6 * page] = b"\xa5" * (3 * page)
    db.write_bytes(bytes(data))
    with pytest.raises(ImportFailed, match="the database is damaged") as info:
        read_sydent(db, None)
    assert str(info.value).startswith(str(db))
    assert "\n" not in str(info.value)


def test_damaged_association_table(tmp_path: Path) -> None:
    db = tmp_path / "sydent.db"
    conn = sydent_db(db)
    for i in range(500):
        remote(conn, f"user{i}@example.org", f"@user{i}:example.org", NOW_MS, i)
    conn.commit()
    (root,) = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'global_threepid_associations'"
    ).fetchone()
    conn.close()
    data = bytearray(db.read_bytes())
    page = 4096
    data[(root - 1) * page : root * page] = b"\xa5" * page
    db.write_bytes(bytes(data))
    with pytest.raises(ImportFailed, match="the database is damaged") as info:
        read_sydent(db, None)
    assert "\n" not in str(info.value)


def test_foreign_sqlite_database(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(ImportFailed, match="not a sydent database"):
        read_sydent(db, None)


def test_missing_table(tmp_path: Path) -> None:
    db = tmp_path / "sydent.db"
    conn = sydent_db(db)
    conn.execute("DROP TABLE ephemeral_public_keys")
    conn.commit()
    conn.close()
    with pytest.raises(ImportFailed, match="no ephemeral_public_keys"):
        read_sydent(db, None)


def test_missing_column(tmp_path: Path) -> None:
    db = tmp_path / "sydent.db"
    conn = sydent_db(db)
    conn.execute("ALTER TABLE invite_tokens DROP COLUMN sent_ts")
    conn.commit()
    conn.close()
    with pytest.raises(ImportFailed, match="invite_tokens has no sent_ts column"):
        read_sydent(db, None)


def test_bad_config_file(tmp_path: Path) -> None:
    db = tmp_path / "sydent.db"
    sydent_db(db).close()
    conf = tmp_path / "sydent.conf"
    conf.write_text("this is not = [an ini file")
    with pytest.raises(ImportFailed, match="not a sydent configuration"):
        read_sydent(db, conf)
