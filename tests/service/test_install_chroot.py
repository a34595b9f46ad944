"""contrib/install.sh, the container image's only build step, on a fresh Debian bookworm (minbase
root file system from debootstrap, entered with chroot as root): it installs Python from Debian's
packages and the package from this source tree (PyPI for the dependencies), creates the user, the
directories and the config, and installs again from a wheel as an upgrade would. The installed
console script then serves as that user, as the systemd unit runs it, answers a probe from
outside the chroot, and stops on SIGTERM with status 0.

Bounded: every command has a timeout; about half a minute with the root file system cached,
another half minute the first time (debootstrap)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import debian_rootfs

REPO = Path(__file__).resolve().parents[2]
SRC = "/usr/src/matrix-identity-appservice"
PREFIX = "/opt/matrix-identity-appservice"
EXEC = f"{PREFIX}/bin/matrix-identity-appservice"
USER = "matrix-identity-appservice"
CONFIG = "/etc/matrix-identity-appservice/config.yaml"
STATE = "/var/lib/matrix-identity-appservice"
STOP_WITHIN = 5.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chroot and mount need root")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def copy_source_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked and new files, nothing ignored) into ``dest``."""
    dest.mkdir(parents=True)
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    listing = b"\0".join(f for f in files.split(b"\0") if f and (REPO / f.decode()).exists())
    archive = subprocess.run(
        ["tar", "-C", str(REPO), "--null", "-T", "-", "-cf", "-"],
        input=listing,
        check=True,
        capture_output=True,
        timeout=120,
    ).stdout
    subprocess.run(["tar", "-C", str(dest), "-xf", "-"], input=archive, check=True, timeout=120)


def _ids(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no user {name} in the chroot")


def _chroot(root: Path, *command: str) -> str:
    result = subprocess.run(
        ["chroot", str(root), *command],
        env=debian_rootfs.chroot_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        debian_rootfs.xfail_if_package_lacks_its_files(result.stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _install(root: Path, source: str = SRC) -> str:
    return _chroot(root, "/bin/sh", f"{SRC}/contrib/install.sh", source)


def _get(url: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, json.loads(resp.read())


def test_install_script_in_a_fresh_debian_then_serve_as_the_service_user(tmp_path: Path) -> None:
    root = tmp_path / "root"
    view = tmp_path / "view"
    debian_rootfs.unpack(root)
    copy_source_tree(root / SRC.lstrip("/"))
    try:
        with debian_rootfs.mounted(root):
            out = _install(root)
            assert f"wrote {CONFIG}" in out

            uid, gid = _ids(root, USER)
            config = (root / CONFIG.lstrip("/")).stat()
            assert (config.st_uid, config.st_gid, stat.S_IMODE(config.st_mode)) == (0, gid, 0o640)
            state = (root / STATE.lstrip("/")).stat()
            assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (uid, 0o700)
            config_text = (root / CONFIG.lstrip("/")).read_text()

            # Again, from a wheel (built in the chroot), as an upgrade would: the operator's
            # config is left as it is.
            wheels = "/tmp/wheels"
            _chroot(root, f"{PREFIX}/bin/pip", "wheel", "-q", "--no-deps", "-w", wheels, SRC)
            (wheel,) = (root / wheels.lstrip("/")).glob("*.whl")
            assert f"wrote {CONFIG}" not in _install(root, f"{wheels}/{wheel.name}")
            assert (root / CONFIG.lstrip("/")).read_text() == config_text

        # As the unit runs it: the service user, and the file system as ProtectSystem=strict,
        # StateDirectory= and PrivateTmp= show it (all read-only but /var/lib/<name>, a new /tmp).
        with debian_rootfs.strict_view(root, view, STATE):
            _serve_probe_and_stop(view)
        for name in ("signing.key", "identity.db"):
            info = (root / STATE.lstrip("/") / name).stat()
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (uid, 0o600), name
    finally:
        debian_rootfs.remove(root, view)


def _serve_probe_and_stop(root: Path) -> None:
    port = _free_port()
    command = [EXEC, "run", "-c", CONFIG, "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        ["chroot", f"--userspec={USER}:{USER}", str(root), *command],
        env=debian_rootfs.chroot_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}/_matrix/identity/v2"
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = _get(base)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    output = proc.communicate()[0]
                    debian_rootfs.xfail_if_package_lacks_its_files(output)
                    pytest.fail(f"server did not answer:\n{output}")
                time.sleep(0.2)
        assert (status, body) == (200, {})
        status, key = _get(f"{base}/pubkey/ed25519:0")
        assert status == 200 and isinstance(key.get("public_key"), str)

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=STOP_WITHIN + 10)
        took = time.monotonic() - started
        assert proc.returncode == 0, output
        assert "Traceback" not in output
        assert took < STOP_WITHIN, f"stopping took {took:.1f} s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
