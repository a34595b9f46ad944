"""The command line: help, first run, migrate, keys, config errors."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import appservice
from appservice.app import IdentityServer
from appservice.cli import main
from appservice.config import load_config
from appservice.private_files import write_private_file
from appservice.resources import package_version

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appservice", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_help_lists_the_commands() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    for command in ("run", "generate-config", "migrate", "keys"):
        assert command in result.stdout
    keys_help = _cli("keys", "--help")
    assert all(action in keys_help.stdout for action in ("show", "rotate", "revoke"))


def test_first_run_creates_config_key_and_database_then_serves(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "config.yaml"
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appservice",
            "run",
            "-c",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        body = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/_matrix/identity/v2", timeout=2
                ) as resp:
                    body = resp.read()
                    break
            except OSError:
                time.sleep(0.1)
        assert body == b"{}", proc.stdout.read() if proc.poll() is not None and proc.stdout else ""
        assert config.exists()
        key = tmp_path / "conf" / "data" / "signing.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_text().startswith("ed25519 0 ")
        assert (tmp_path / "conf" / "data" / "identity.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, output
    assert "Traceback" not in output


def test_version_names_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"python -m appservice {package_version()}\n"
    # The installed distribution's version is the package's own (pyproject reads it from there).
    assert package_version().split()[0] == appservice.__version__


def test_generate_config_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    assert main(["generate-config", "-c", str(path)]) == 0
    assert path.read_text().startswith("# Configuration")
    assert main(["generate-config", "-c", str(path)]) == 1
    assert main(["generate-config", "-c", str(path), "--force"]) == 0


def test_migrate_then_again_is_up_to_date(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    main(["generate-config", "-c", str(path)])
    assert main(["migrate", "-c", str(path)]) == 0
    assert "applied [1" in capsys.readouterr().out
    assert main(["migrate", "-c", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_config_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("invites:\n  expiration: {after: 7 dayz}\n")
    result = _cli("migrate", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'config error: invites.expiration.after: "7 dayz" is not a duration'
        " (use e.g. 30s, 10m, 12h, 7d)"
    ]


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("database: {url: 'postgres://nobody@127.0.0.1:1/none'}\n")
    result = _cli("migrate", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: database.url: cannot connect")
    assert "Traceback" not in result.stderr


def test_a_store_that_cannot_start_stops_the_server_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"database: {{url: 'sqlite:{tmp_path / 'is.db'}'}}\n"
        f"listen: {{port: {_free_port()}}}\n"
        "stores:\n"
        "  order: [ldap]\n"
        f"  ldap: {{uri: 'ldap://127.0.0.1:{_free_port()}', base_dn: 'dc=example,dc=org',"
        " timeout: 2s}\n"
    )
    result = _cli("run", "-c", str(path))
    assert result.returncode == 1
    # After the start-up log lines, one line says what is wrong, and the process has ended.
    assert result.stderr.strip().splitlines()[-1].startswith("error: stores.ldap: LDAP server")
    assert "Traceback" not in result.stderr


async def test_keys_rotate_keeps_old_keys_valid_and_revoke_invalidates_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    main(["generate-config", "-c", str(path)])
    server = IdentityServer(load_config(path, environ={}))
    await server.start()
    old = server.keyring.current
    await server.stop()

    result = _cli("keys", "rotate", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "new current key ed25519:1" in result.stdout
    assert f"ed25519:0 {old.public_key} valid" in result.stdout

    server = IdentityServer(load_config(path, environ={}))
    await server.start()
    try:
        assert server.keyring.current.key_id == "ed25519:1"
        assert await server.keys.is_valid(server.keyring.current.public_key)
        # Invites stored under the old key still need it: it stays valid.
        assert await server.keys.is_valid(old.public_key)
    finally:
        await server.stop()

    refused = _cli("keys", "revoke", "ed25519:1", "-c", str(path))
    assert refused.returncode == 1
    assert "current key" in refused.stderr
    unknown = _cli("keys", "revoke", "ed25519:7", "-c", str(path))
    assert unknown.returncode == 1
    assert "no valid key ed25519:7" in unknown.stderr

    revoked = _cli("keys", "revoke", "ed25519:0", "-c", str(path))
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked ed25519:0" in revoked.stdout

    server = IdentityServer(load_config(path, environ={}))
    await server.start()
    try:
        assert not await server.keys.is_valid(old.public_key)
        assert await server.keys.is_valid(server.keyring.current.public_key)
        assert await server.keys.public_key("ed25519:0") == old.public_key
    finally:
        await server.stop()

    shown = _cli("keys", "show", "-c", str(path))
    assert "ed25519:1" in shown.stdout and "(current)" in shown.stdout
    assert f"ed25519:0 {old.public_key} revoked" in shown.stdout


def test_rewriting_a_group_only_config_keeps_its_group_and_a_world_readable_one_gets_private(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    assert main(["generate-config", "-c", str(config)]) == 0
    # As the operator set it up for a service user's group: root:<group> 0640.
    group = 4242 if os.geteuid() == 0 else os.getgid()
    os.chown(config, -1, group)
    os.chmod(config, 0o640)
    assert main(["generate-registration", "-c", str(config)]) == 0  # rewrites the config
    after = config.stat()
    assert "as_token" in config.read_text()
    assert (stat.S_IMODE(after.st_mode), after.st_gid) == (0o640, group)
    # A world-readable file was never private: rewritten, it becomes owner-only.
    os.chmod(config, 0o644)
    write_private_file(config, config.read_text())
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    registration = tmp_path / "data" / "registration.yaml"
    assert stat.S_IMODE(registration.stat().st_mode) == 0o600  # a new file: owner only


def test_generated_config_and_registration_are_private_in_private_directories(
    tmp_path: Path,
) -> None:
    old_umask = os.umask(0o022)
    try:
        config = tmp_path / "etc" / "identity" / "config.yaml"
        assert main(["generate-config", "-c", str(config)]) == 0
        registration = tmp_path / "reg" / "registration.yaml"
        assert main(["generate-registration", "-c", str(config), "-r", str(registration)]) == 0
    finally:
        os.umask(old_umask)
    for path in (config, registration):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (tmp_path / "etc", tmp_path / "etc" / "identity", tmp_path / "reg"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
