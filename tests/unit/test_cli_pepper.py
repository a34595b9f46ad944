"""``pepper show|rotate`` on both databases, and the configuration of rotation and of the synapse
store's default (issue 20)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appservice.app import IdentityServer
from appservice.cli import main
from appservice.config import ConfigError, load_config, load_config_text
from appservice.crypto.hashing import lookup_hash

BINDING = ("email", "alice@example.org", "@alice:hs.test")


def _config(tmp_path: Path, database_url: str, extra: str = "") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"database: {{url: '{database_url}'}}\n"
        f"keys: {{signing_key_path: '{tmp_path / 'keys' / 'signing.key'}'}}\n" + extra
    )
    return path


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def _cli(*args: str) -> int:
    """``main`` in a worker thread (it runs its own event loop)."""
    return await asyncio.to_thread(main, list(args))


async def _bound_and_pepper(config: Path) -> str:
    """Start once (the key and the pepper), bind alice; the pepper."""
    server = IdentityServer(load_config(config, environ={}))
    await server.open()
    try:
        from appservice.db.bindings import Binding

        medium, address, mxid = BINDING
        await server.bindings.upsert(
            Binding(medium, address, mxid, 0, 0, 10**13),
            await server.lookup.hashes_of(medium, address),
        )
        return server.lookup.pepper
    finally:
        await server.stop()


async def _found(config: Path, pepper: str) -> dict[str, str]:
    server = IdentityServer(load_config(config, environ={}))
    await server.open()
    try:
        medium, address, _ = BINDING
        return await server.lookup.lookup("sha256", pepper, [lookup_hash(address, medium, pepper)])
    finally:
        await server.stop()


async def test_pepper_rotate_rehashes_and_refuses_a_second_rotation_during_the_grace(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, database_url)
    first = await _bound_and_pepper(config)
    assert await _cli("pepper", "show", "-c", str(config)) == 0
    shown = capsys.readouterr().out
    assert "generation:         0\n" in shown
    assert "scheduled rotation: off (lookup.pepper_rotation)\n" in shown

    assert await _cli("pepper", "rotate", "-c", str(config)) == 0
    out = capsys.readouterr().out
    assert out.startswith("rotated: generation 1, 1 rows rehashed in ")
    assert "previous pepper:    answered until " in out

    assert await _cli("pepper", "rotate", "-c", str(config)) == 1
    err = capsys.readouterr().err.splitlines()[0]
    assert err.startswith("error: the previous pepper is answered until ")
    assert err.endswith("(lookup.pepper_grace); rotate again after that")

    server = IdentityServer(load_config(config, environ={}))
    await server.open()
    try:
        second = server.lookup.pepper
    finally:
        await server.stop()
    assert second != first
    assert list((await _found(config, second)).values()) == ["@alice:hs.test"]
    assert list((await _found(config, first)).values()) == ["@alice:hs.test"]


async def test_pepper_show_before_the_first_start_creates_nothing(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, database_url)
    assert await _cli("pepper", "show", "-c", str(config)) == 1
    assert capsys.readouterr().err.startswith(
        "pepper: none yet; the server makes it on its first start"
    )
    assert _files(tmp_path) == ["config.yaml"]


def test_pepper_rotation_is_off_by_default_and_must_be_longer_than_the_grace(
    tmp_path: Path,
) -> None:
    config = load_config_text("", tmp_path, environ={})
    assert config.lookup.pepper_rotation is None
    assert config.lookup.pepper_grace == 600
    config = load_config_text("lookup: {pepper_rotation: 30d}", tmp_path, environ={})
    assert config.lookup.pepper_rotation == 30 * 86400
    with pytest.raises(ConfigError, match=r"^lookup.pepper_rotation: must be longer than"):
        load_config_text("lookup: {pepper_rotation: 5m, pepper_grace: 10m}", tmp_path, environ={})


def test_the_synapse_store_publishes_only_bound_threepids_by_default(tmp_path: Path) -> None:
    config = load_config_text("", tmp_path, environ={})
    assert config.stores.synapse.threepids == "bound"
    example = (Path(__file__).resolve().parents[2] / "config.example.yaml").read_text()
    assert "    threepids: bound\n" in example
