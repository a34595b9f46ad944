"""``keys``: ``show`` creates nothing and reports a key file that does not match the database;
``rotate --replace-lost-key`` recovers from a lost key file; ``run`` refuses a replaced one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import signedjson.key

from appservice.app import IdentityServer
from appservice.cli import main
from appservice.config import load_config
from tests.support.settings import write_cli_config

REPO = Path(__file__).resolve().parents[2]


async def _cli(*args: str) -> int:
    """``main`` in a worker thread (it runs its own event loop)."""
    return await asyncio.to_thread(main, list(args))


def _files(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


async def _tables(database_url: str) -> list[str]:
    if not database_url.startswith("postgres"):
        return []
    base, _, schema = database_url.partition("?search_path=")
    conn = await asyncpg.connect(base)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
    finally:
        await conn.close()
    return [row["table_name"] for row in rows]


async def _start_and_stop(config: Path) -> str:
    server = IdentityServer(load_config(config, environ={}))
    await server.start()
    try:
        return server.keyring.current.public_key
    finally:
        await server.stop()


async def test_keys_show_on_a_fresh_config_says_there_is_no_key_and_creates_nothing(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_cli_config(tmp_path, database_url)
    before = _files(tmp_path)
    assert await _cli("keys", "show", "-c", str(config)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"keys: no signing key yet (no file at {tmp_path / 'keys' / 'signing.key'}); the server"
        " makes it on its first start\n"
    )
    assert _files(tmp_path) == before
    assert await _tables(database_url) == []


async def test_keys_show_before_the_first_start_lists_the_key_file_and_creates_nothing(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_cli_config(tmp_path, database_url)
    key_path = tmp_path / "keys" / "signing.key"
    key_path.parent.mkdir()
    signing_key = signedjson.key.generate_signing_key("0")
    with key_path.open("w") as f:
        signedjson.key.write_signing_keys(f, [signing_key])
    public = signedjson.key.encode_verify_key_base64(signing_key.verify_key)
    before = _files(tmp_path)
    assert await _cli("keys", "show", "-c", str(config)) == 0
    assert capsys.readouterr().out == f"ed25519:0 {public} unpublished (current)\n"
    assert _files(tmp_path) == before
    assert await _tables(database_url) == []


async def test_keys_show_refuses_a_replaced_key_file_with_one_line(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_cli_config(tmp_path, database_url)
    published = await _start_and_stop(config)
    assert await _cli("keys", "show", "-c", str(config)) == 0
    assert capsys.readouterr().out == f"ed25519:0 {published} valid (current)\n"

    key_path = tmp_path / "keys" / "signing.key"
    with key_path.open("w") as f:
        signedjson.key.write_signing_keys(f, [signedjson.key.generate_signing_key("0")])
    assert await _cli("keys", "show", "-c", str(config)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: keys.signing_key_path: {key_path} holds another ed25519:0")
    assert err.count("\n") == 1


async def test_rotate_replace_lost_key_makes_a_new_key_file_with_the_next_id(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_cli_config(tmp_path, database_url)
    lost = await _start_and_stop(config)
    key_path = tmp_path / "keys" / "signing.key"
    key_path.unlink()
    # A plain rotation does not make a key file where the deployment's one is lost.
    assert await _cli("keys", "rotate", "-c", str(config)) == 1
    assert "if it is lost for good run `keys rotate --replace-lost-key`" in capsys.readouterr().err
    assert not key_path.exists()

    assert await _cli("keys", "rotate", "--replace-lost-key", "-c", str(config)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"new key file {key_path}, current key ed25519:1 ")
    new_public = out[0].split()[-1]
    # The lost key stays valid: what was signed with it still verifies.
    assert out[1:] == [f"ed25519:0 {lost} valid", f"ed25519:1 {new_public} valid (current)"]

    # Once there is a key file again, --replace-lost-key refuses to replace it.
    assert await _cli("keys", "rotate", "--replace-lost-key", "-c", str(config)) == 1
    assert "exists; --replace-lost-key only makes a new key file" in capsys.readouterr().err
    assert await _start_and_stop(config) == new_public


def test_run_refuses_a_replaced_key_file_with_one_line(tmp_path: Path) -> None:
    config = write_cli_config(tmp_path, f"sqlite:{tmp_path / 'is.db'}")
    asyncio.run(_start_and_stop(config))
    key_path = tmp_path / "keys" / "signing.key"
    with key_path.open("w") as f:
        signedjson.key.write_signing_keys(f, [signedjson.key.generate_signing_key("0")])
    result = subprocess.run(
        [sys.executable, "-m", "appservice", "run", "-c", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: keys.signing_key_path: {key_path} holds another ed25519:0")
