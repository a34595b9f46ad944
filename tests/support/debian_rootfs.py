"""A fresh Debian bookworm root file system (debootstrap --variant=minbase), built once and kept as
a tarball under .cache/debootstrap/, and chroots made from it for one test each.

The mirror is the one apt uses on this machine (/etc/apt/sources.list*), so debootstrap reaches
the same network apt does. The tarball is rebuilt only when missing; building takes about half a
minute, unpacking a second or two."""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "debootstrap"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The host's CA bundle, so that pip in the chroot trusts what the host trusts (on this machine
# an egress proxy re-signs TLS with its own CA, which Debian's ca-certificates do not know).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The first Debian archive URI in apt's sources (deb822 ``.sources`` or one-line ``.list``)
    that serves ``bookworm``; deb.debian.org when none does."""
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file() or path.suffix not in (".list", ".sources", ""):
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (m.group(1).lower(), m.group(2).split())
                    for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M)
                )
                if SUITE in fields.get("suites", []) and "deb" in fields.get("types", []):
                    uris = fields.get("uris", [])
                    if uris and uris[0].rstrip("/").endswith("/debian"):
                        return uris[0].rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if m and m.group(2) == SUITE and m.group(1).rstrip("/").endswith("/debian"):
                    return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def rootfs_tarball() -> Path:
    """The cached minbase root file system as a tarball (built with debootstrap if missing)."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    tarball = CACHE / f"{SUITE}-minbase-{arch}.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        if tarball.exists():
            return tarball
        work = CACHE / f"build-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            subprocess.run(
                ["debootstrap", "--variant=minbase", SUITE, str(work), debian_mirror()],
                check=True,
                capture_output=True,
                timeout=600,
            )
            partial = tarball.with_suffix(".tar.part")
            subprocess.run(
                ["tar", "-C", str(work), "--numeric-owner", "-cf", str(partial), "."],
                check=True,
                timeout=300,
            )
            partial.rename(tarball)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"debootstrap failed: {e.stderr.decode(errors='replace')[-2000:]}"
            ) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return tarball


def unpack(root: Path) -> None:
    """Unpack a fresh copy of the root file system into ``root`` (which must not exist)."""
    root.mkdir(parents=True)
    subprocess.run(
        ["tar", "-C", str(root), "--numeric-owner", "-xf", str(rootfs_tarball())],
        check=True,
        timeout=300,
    )
    # Name resolution as on the host (the tarball keeps the resolv.conf of the day it was made).
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    if HOST_CA_BUNDLE.is_file():
        shutil.copyfile(HOST_CA_BUNDLE, root / "etc/host-ca-certificates.crt")


def chroot_env(**extra: str) -> dict[str, str]:
    """A clean environment for commands in the chroot (nothing of the host's venv or pip)."""
    env = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    if HOST_CA_BUNDLE.is_file():
        env["PIP_CERT"] = "/etc/host-ca-certificates.crt"
    env.update(extra)
    return env


@contextlib.contextmanager
def _mounts(steps: list[tuple[list[str], Path]]) -> Iterator[None]:
    """``mount ARGS TARGET`` for each step in order; each mount made is undone, in reverse,
    however the block ends. A step whose ARGS start with ``-o remount`` changes the mount before
    it and is not undone on its own."""
    mounts: list[Path] = []
    try:
        for args, target in steps:
            subprocess.run(["mount", *args, str(target)], check=True, timeout=30)
            if not (args[0] == "-o" and args[1].startswith("remount")):
                mounts.append(target)
        yield
    finally:
        for target in reversed(mounts):
            if subprocess.run(["umount", str(target)], timeout=30).returncode != 0:
                # Busy (a process still inside): detach now, the kernel finishes later.
                subprocess.run(["umount", "--lazy", str(target)], timeout=30)


def _system_mounts(root: Path) -> list[tuple[list[str], Path]]:
    return [
        (["-t", "proc", "proc"], root / "proc"),
        (["--bind", "/dev"], root / "dev"),
        (["-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts"], root / "dev/pts"),
    ]


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[Path]:
    """/proc, /dev and a private /dev/pts (apt wants one) mounted in ``root`` while the block
    runs; unmounted however it ends."""
    with _mounts(_system_mounts(root)):
        yield root


@contextlib.contextmanager
def strict_view(root: Path, view: Path, writable: str) -> Iterator[Path]:
    """``root`` as systemd's ProtectSystem=strict + StateDirectory= + PrivateTmp= show it to a
    service: at ``view``, everything read-only but the directory ``writable`` (inside the root)
    and a fresh /tmp; with /proc and /dev. Chroot into the view returned."""
    view.mkdir()
    with _mounts(
        [
            (["--bind", str(root)], view),
            (["-o", "remount,bind,ro"], view),
            (["--bind", str(root / writable.lstrip("/"))], view / writable.lstrip("/")),
            (["-t", "tmpfs", "-o", "mode=1777", "tmpfs"], view / "tmp"),
            *_system_mounts(view),
        ]
    ):
        yield view


def remove(*roots: Path) -> None:
    """Delete unpacked roots (and views), refusing while anything is still mounted in them."""
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f]
    for root in roots:
        inside = [t for t in targets if t == str(root) or t.startswith(f"{root}/")]
        if inside:
            raise RuntimeError(f"still mounted in {root}: {inside}")
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


def xfail_if_package_lacks_its_files(output: str) -> None:
    """Until the package ships its example config and migrations (issue 15, "Install like a
    package"), an installed copy fails in exactly these ways; any other failure stays a failure,
    and once they ship, the tests run to the end."""
    symptoms = ("site-packages/config.example.yaml'", "no such table: signing_keys")
    if any(symptom in output for symptom in symptoms):
        pytest.xfail("the installed package does not ship config.example.yaml/migrations yet")
