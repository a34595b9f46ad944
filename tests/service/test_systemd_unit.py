"""contrib/systemd/matrix-identity-appservice.service passes ``systemd-analyze verify`` and keeps
its hardening (``systemd-analyze security --offline``).

``verify`` insists that ExecStart's binary exists and that every unit it pulls in (sysinit.target,
network-online.target, ...) can be loaded. Rather than rewrite ExecStart, the unit is checked
verbatim inside a throw-away root (``--root``): the unit in etc/systemd/system, an executable stub
at the ExecStart path, and a copy of the host's own system units for the dependencies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "matrix-identity-appservice.service"
EXEC = "/opt/matrix-identity-appservice/bin/matrix-identity-appservice"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _exec_start() -> list[str]:
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1
    return lines[0].removeprefix("ExecStart=").split()


def _root(tmp_path: Path, unit_text: str, with_binary: bool = True) -> Path:
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / UNIT.name).write_text(unit_text)
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    if with_binary:
        stub = root / EXEC.lstrip("/")
        stub.parent.mkdir(parents=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    return root


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, cwd="/"
    )


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    return _analyze("verify", f"--root={root}", UNIT.name)


@pytest.fixture(autouse=True)
def _needs_systemd_analyze() -> None:
    if shutil.which("systemd-analyze") is None or not SYSTEM_UNITS.is_dir():
        pytest.fail(
            "systemd-analyze or /usr/lib/systemd/system missing: scripts/ensure-systemd-analyze.sh"
        )


def test_unit_runs_the_installed_console_script_on_the_etc_config() -> None:
    assert _exec_start() == [EXEC, "run", "-c", "/etc/matrix-identity-appservice/config.yaml"]


def test_systemd_analyze_verify_passes_without_a_warning(tmp_path: Path) -> None:
    result = _verify(_root(tmp_path, UNIT.read_text()))
    # Unknown or misspelt keys are only warnings (exit status 0): any output fails the test.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_catches_a_misspelt_key_and_a_missing_binary(tmp_path: Path) -> None:
    """The check above can fail: a typo is reported, and so is a missing ExecStart binary."""
    text = UNIT.read_text()
    assert "\nProtectSystem=strict\n" in text
    typo = _verify(_root(tmp_path / "typo", text.replace("ProtectSystem=", "ProtectSystm=")))
    assert "Unknown key 'ProtectSystm'" in typo.stderr
    missing = _verify(_root(tmp_path / "missing", text, with_binary=False))
    assert missing.returncode != 0
    assert "is not executable" in missing.stderr


def test_unit_is_hardened(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for setting in (
        "User=matrix-identity-appservice",
        "StateDirectory=matrix-identity-appservice",
        "ConfigurationDirectory=matrix-identity-appservice",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
    ):
        assert f"\n{setting}\n" in text, setting
    # systemd's own score: 0 (locked down) to 10 (unprotected); this unit scores 1.1 ("OK").
    # --threshold is in tenths: anything above 2.0 fails.
    result = _analyze(
        "security", "--offline=yes", f"--root={_root(tmp_path, text)}", "--threshold=20", UNIT.name
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level" in result.stdout
