"""Directories and files that hold secrets or personal data: ours are created 0700 and 0600.

A directory the operator made is left as it is: only the directories created here get 0700.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each 0700 (whatever the umask); existing
    directories, and ones another process creates at the same moment, are left alone."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)


def write_private_file(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable only by its owner (0600); the
    directories made for it are 0700.

    A file that exists keeps its owner and group where this process may keep them, and its
    group-read bit (a config that is ``root:service 0640`` so that the service can read it stays
    so when root rewrites it); it never stays readable by others or writable by its group.
    """
    make_private_dirs(path.parent)
    try:
        before: os.stat_result | None = path.stat()
    except FileNotFoundError:
        before = None
    # Only a deliberate group-only mode is kept: a world-readable file was never made private.
    group_only = before is not None and before.st_mode & 0o044 == 0o040
    mode = 0o640 if group_only else 0o600
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # A temporary file left by an earlier crash keeps its mode through O_CREAT: set it.
        os.fchmod(fd, 0o600)
        if before is not None:
            _keep_ownership(fd, before)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _keep_ownership(fd: int, before: os.stat_result) -> None:
    """Give the new file the old one's owner and group, or at least its group."""
    try:
        os.fchown(fd, before.st_uid, before.st_gid)
    except PermissionError:  # not root: a group of ours can still be kept
        with contextlib.suppress(PermissionError):
            os.fchown(fd, -1, before.st_gid)
