import sqlite3
from pathlib import Path

import nacl.signing
import pytest

from appservice.importers.sydent import (
    SydentImportError,
    parse_signing_key,
    read_associations,
    read_signing_key,
)

SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"


def test_signing_key_from_config(tmp_path: Path) -> None:
    conf = tmp_path / "sydent.conf"
    conf.write_text(f'[crypto]\ned25519.signingkey = "ed25519 0 {SEED}"\n')
    key = read_signing_key(conf)
    assert key.key_id == "ed25519:0"
    assert len(key.seed) == 32
    assert key.public_key_base64 == (
        __import__("base64")
        .b64encode(bytes(nacl.signing.SigningKey(key.seed).verify_key))
        .decode()
        .rstrip("=")
    )


@pytest.mark.parametrize("value", ["ed25519 0", "rsa 0 abc", "ed25519 0 !!!", "ed25519 0 AAAA"])
def test_bad_signing_key(value: str) -> None:
    with pytest.raises(SydentImportError):
        parse_signing_key(value)


def test_newest_association_wins(tmp_path: Path) -> None:
    db = tmp_path / "sydent.db"
    conn = sqlite3.connect(db)
    for table in ("local_threepid_associations", "global_threepid_associations"):
        conn.execute(
            f"CREATE TABLE {table} (medium TEXT, address TEXT, mxid TEXT, ts INTEGER,"
            " not_before INTEGER, not_after INTEGER)"
        )
    conn.execute("INSERT INTO local_threepid_associations VALUES ('email','a@x','@old:x',1,0,9)")
    conn.execute("INSERT INTO global_threepid_associations VALUES ('email','a@x','@new:x',2,0,9)")
    conn.execute("INSERT INTO global_threepid_associations VALUES ('msisdn','1','@b:x',5,0,9)")
    conn.commit()
    conn.close()
    got = read_associations(db)
    assert [(a.medium, a.address, a.mxid) for a in got] == [
        ("email", "a@x", "@new:x"),
        ("msisdn", "1", "@b:x"),
    ]


def test_foreign_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.db"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(SydentImportError):
        read_associations(bad)
