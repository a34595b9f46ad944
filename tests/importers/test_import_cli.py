"""``python -m appservice import``: what it prints, its progress lines, and its one-line errors
(exit 1, nothing written), on both of our databases. The sydent database is laid out by the test
from the facts of sydent's schema (the real sydent is in test_import_real_sydent.py)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from appservice.cli import main
from appservice.db.database import AppDatabase
from appservice.importers import writer
from tests.support.settings import write_cli_config

SEED_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"  # bytes 0..31
T0_S = 1_600_000_000


def _sydent(tmp_path: Path) -> tuple[Path, Path]:
    """A small sydent database (the original schema) and its sydent.conf."""
    db = tmp_path / "sydent.db"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE local_threepid_associations (id INTEGER PRIMARY KEY, medium VARCHAR(16),"
        " address VARCHAR(256), mxid VARCHAR(256), ts INTEGER, notBefore BIGINT,"
        " notAfter BIGINT);"
        "CREATE TABLE global_threepid_associations (id INTEGER PRIMARY KEY, medium VARCHAR(16),"
        " address VARCHAR(256), mxid VARCHAR(256), ts INTEGER, notBefore BIGINT,"
        " notAfter INTEGER, originServer VARCHAR(255), originId INTEGER, sgAssoc TEXT);"
        "CREATE TABLE invite_tokens (id INTEGER PRIMARY KEY, medium VARCHAR(16),"
        " address VARCHAR(256), room_id VARCHAR(256), sender VARCHAR(256), token VARCHAR(256),"
        " received_ts BIGINT, sent_ts BIGINT);"
        "CREATE TABLE ephemeral_public_keys (id INTEGER PRIMARY KEY, public_key VARCHAR(256),"
        " verify_count BIGINT, persistence_ts BIGINT);"
    )
    far = (T0_S + 10 * 365 * 86400) * 1000
    conn.executemany(
        "INSERT INTO local_threepid_associations (medium, address, mxid, ts, notBefore, notAfter)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [
            ("email", "alice@example.com", "@alice:hs.test", T0_S * 1000, T0_S * 1000, far),
            ("msisdn", "18005552067", "@bob:hs.test", T0_S * 1000, T0_S * 1000, far),
            ("email", "carol@example.com", "@carol:hs.test", T0_S * 1000, T0_S * 1000, far),
        ],
    )
    conn.executemany(
        "INSERT INTO invite_tokens (medium, address, room_id, sender, token, received_ts,"
        " sent_ts) VALUES ('email', ?, ?, '@inviter:hs.test', ?, ?, ?)",
        [
            ("dave@example.com", "!room:hs.test", "pendingToken", T0_S, None),
            ("erin@example.com", "!room:hs.test", "deliveredToken", T0_S, T0_S + 5),
        ],
    )
    conn.commit()
    conn.close()
    conf = tmp_path / "sydent.conf"
    conf.write_text(f'[crypto]\ned25519.signingkey = "ed25519 0 {SEED_B64}"\n')
    return db, conf


async def _cli(*args: str) -> int:
    """``main`` in a worker thread (it runs its own event loop)."""
    return await asyncio.to_thread(main, list(args))


async def _count(database_url: str, table: str) -> int:
    db = AppDatabase(database_url)
    await db.start()
    try:
        if not await db.has_table(table):
            return 0
        return int(await db.fetchval(f"SELECT COUNT(*) FROM {table}"))
    finally:
        await db.stop()


async def test_import_sydent_prints_what_it_did_then_nothing_to_change(
    tmp_path: Path,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = write_cli_config(tmp_path, database_url)
    db, conf = _sydent(tmp_path)
    monkeypatch.setattr(writer, "PROGRESS_EVERY", 2)
    args = ("import", "sydent", "-c", str(config), "--db", str(db), "--sydent-config", str(conf))
    assert await _cli(*args) == 0
    out, err = capsys.readouterr()
    assert "bindings: found 3, imported 3, updated 0, unchanged 0" in out
    assert "invites: found 1, imported 1" in out
    assert "signing keys: found 1, imported 1" in out
    assert "not imported from sydent: 1 delivered invites" in out
    assert "bindings: 3 of 3 read (" in err  # progress, on stderr
    assert await _count(database_url, "bindings") == 3
    assert await _count(database_url, "invites") == 1
    # The imported invite is one of ours: listed, from sydent's time.
    assert await _cli("invites", "list", "-c", str(config), "--pending", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(i["id"], i["created"], i["invitee"]) for i in listed] == [
        (writer.invite_id("sydent", "1"), "2020-09-13T12:26:40Z", "d…@e…")
    ]

    assert await _cli(*args) == 0
    out, _ = capsys.readouterr()
    assert "bindings: found 3, nothing to change (3 unchanged)" in out
    assert "invites: found 1, nothing to change (1 unchanged)" in out
    assert "nothing to change: the database already holds this import" in out


async def test_dry_run_prints_what_it_would_do_and_writes_nothing(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_cli_config(tmp_path, database_url)
    db, conf = _sydent(tmp_path)
    args = ("import", "sydent", "-c", str(config), "--db", str(db), "--sydent-config", str(conf))
    code = await _cli(*args, "--dry-run")
    assert code == 0
    out, _ = capsys.readouterr()
    assert "bindings: found 3, would import 3" in out
    assert "dry run: nothing was written" in out
    assert "the database schema was migrated first" in out  # a fresh database: only that
    assert await _count(database_url, "bindings") == 0
    assert await _count(database_url, "invites") == 0
    assert await _count(database_url, "signing_keys") == 0
    assert not (tmp_path / "keys" / "signing.key").exists()


async def test_refused_without_merge_in_one_line_then_merged(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_cli_config(tmp_path, database_url)
    db, conf = _sydent(tmp_path)
    assert await _cli("migrate", "-c", str(config)) == 0
    store = AppDatabase(database_url)
    await store.start()
    try:
        await store.execute(
            "INSERT INTO bindings (medium, address, mxid, lookup_hash, created_ts, not_before,"
            " not_after) VALUES ('email', 'here@example.com', '@here:hs.test', 'h', 1, 1, 2)"
        )
    finally:
        await store.stop()
    capsys.readouterr()
    args = ("import", "sydent", "-c", str(config), "--db", str(db), "--sydent-config", str(conf))
    assert await _cli(*args) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: import: the database already has 1")
    assert "--merge" in err and out == ""
    assert await _count(database_url, "bindings") == 1
    assert not (tmp_path / "keys" / "signing.key").exists()

    assert await _cli(*args, "--merge") == 0
    assert await _count(database_url, "bindings") == 4


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.db", "no such file"),
        (lambda p: p / "config.yaml", "not an SQLite database"),
    ],
)
async def test_a_bad_sydent_file_is_one_line_and_writes_nothing(
    tmp_path: Path,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    make: object,
    message: str,
) -> None:
    config = write_cli_config(tmp_path, database_url)
    bad = make(tmp_path)  # type: ignore[operator]
    assert await _cli("import", "sydent", "-c", str(config), "--db", str(bad)) == 1
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert "Traceback" not in err
    assert await _count(database_url, "bindings") == 0
    assert not (tmp_path / "keys" / "signing.key").exists()


async def test_an_unreachable_ma1sd_database_is_one_line(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_cli_config(tmp_path, database_url)
    url = "postgresql://nobody@127.0.0.1:1/ma1sd"
    assert await _cli("import", "ma1sd", "-c", str(config), "--db", url) == 1
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "Traceback" not in err
