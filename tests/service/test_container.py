"""contrib/container/Containerfile builds with podman and the image serves: the base image is
imported from the debootstrap root file system (this machine reaches no image registry), the
build's one step is contrib/install.sh, the container answers a probe on a published port, and
``podman stop`` (SIGTERM) ends it with status 0.

podman needs two settings here: the runc runtime (crun 1.8 refuses this machine's hybrid cgroup
v1/v2 layout) and explicit, lower ulimits (podman's defaults are above what this sandbox lets a
process set). Bounded: every command has a timeout; the build takes about half a minute."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import debian_rootfs

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "contrib" / "container" / "Containerfile"
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
STOP_WITHIN = 5.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="podman runs rootful here")


def _podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(*args: str, timeout: float = 60) -> str:
    result = _podman(*args, timeout=timeout)
    assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def base_image() -> str:
    """The debootstrap root file system as a local image (imported once per tarball)."""
    tarball = debian_rootfs.rootfs_tarball()
    info = tarball.stat()
    digest = hashlib.sha256(f"{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()[:12]
    repository = "localhost/matrix-identity-appservice-base"
    tag = f"{repository}:bookworm-minbase-{digest}"
    if _podman("image", "exists", tag).returncode != 0:
        _ok("import", str(tarball), tag, timeout=300)
        # A rebuilt tarball (a clean checkout) replaces the base imported from the previous one.
        listed = _ok("images", "--format", "{{.Repository}}:{{.Tag}}", repository).split()
        for old in listed:
            if old != tag:
                _podman("rmi", old)
    return tag


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, json.loads(resp.read())


def test_image_builds_from_the_install_script_serves_and_stops_on_sigterm() -> None:
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.fail("podman or runc missing: run scripts/ensure-podman.sh")
    image = f"localhost/matrix-identity-appservice:test-{os.getpid()}"
    name = f"matrix-identity-appservice-test-{os.getpid()}"
    build = ["build", "--layers=false", "--network=host", *ULIMITS]
    build += ["--build-arg", f"BASE={base_image()}", "-f", str(CONTAINERFILE), "-t", image]
    if debian_rootfs.HOST_CA_BUNDLE.is_file():
        # pip in the build trusts what the host trusts (see tests/support/debian_rootfs.py).
        build += ["-v", f"{debian_rootfs.HOST_CA_BUNDLE}:/etc/host-ca-certificates.crt:ro"]
        build += ["--build-arg", "PIP_CERT=/etc/host-ca-certificates.crt"]
    try:
        _ok(*build, str(REPO), timeout=600)
        config = json.loads(_ok("image", "inspect", image))[0]["Config"]
        assert config["User"] == "matrix-identity-appservice"
        assert config["StopSignal"] == "SIGTERM"

        port = _free_port()
        _ok("run", "-d", "--name", name, *ULIMITS, "-p", f"127.0.0.1:{port}:8090", image)
        base = f"http://127.0.0.1:{port}/_matrix/identity/v2"
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = _get(base)
                break
            except OSError:
                running = _ok("inspect", name, "--format", "{{.State.Running}}").strip()
                if running != "true" or time.monotonic() > deadline:
                    logs = _podman("logs", name)
                    debian_rootfs.xfail_if_package_lacks_its_files(logs.stdout + logs.stderr)
                    pytest.fail(f"container did not answer:\n{logs.stdout}{logs.stderr}")
                time.sleep(0.3)
        assert (status, body) == (200, {})
        status, key = _get(f"{base}/pubkey/ed25519:0")
        assert status == 200 and isinstance(key.get("public_key"), str)
        # The first run wrote its config and state into the volume, as the service user.
        listing = _ok("exec", name, "ls", "-ln", "/var/lib/matrix-identity-appservice")
        assert "config.yaml" in listing

        started = time.monotonic()
        _ok("stop", "-t", "20", name)
        took = time.monotonic() - started
        state = json.loads(_ok("inspect", name))[0]["State"]
        logs = _podman("logs", name)
        assert state["ExitCode"] == 0, logs.stdout + logs.stderr
        assert "Traceback" not in logs.stdout + logs.stderr
        assert took < STOP_WITHIN, f"stopping took {took:.1f} s"
    finally:
        _podman("rm", "-f", "-v", name)
        _podman("rmi", "-f", image)
