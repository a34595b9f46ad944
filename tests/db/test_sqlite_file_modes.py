"""The SQLite database holds client secrets, invite tokens and addresses: its files (the database
and its -wal and -shm) are readable by their owner only, and a directory made for it is 0700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from appservice.db.database import AppDatabase, DatabaseError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The usual umask, under which files are created world-readable (0644) by default."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def _open_and_write(path: Path) -> None:
    """Open the database, migrate and write, then check its files while it is open."""
    db = AppDatabase(f"sqlite:{path}")
    await db.start()
    try:
        await db.migrate()
        await db.execute("INSERT INTO server_state (name, value) VALUES ($1, $2)", "a", "b")
        assert db.sqlite_reader() is not None
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert all(p.exists() for p in files)
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    finally:
        await db.stop()


async def test_a_new_database_and_its_wal_files_are_0600_in_a_new_0700_directory(
    tmp_path: Path, permissive_umask: None
) -> None:
    path = tmp_path / "var" / "data" / "identity.db"
    await _open_and_write(path)
    assert _mode(path) == 0o600
    assert _mode(tmp_path / "var" / "data") == 0o700
    assert _mode(tmp_path / "var") == 0o700


async def test_an_existing_directory_keeps_its_mode(tmp_path: Path, permissive_umask: None) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    await _open_and_write(data / "identity.db")
    assert _mode(data) == 0o755


async def test_a_world_readable_database_is_made_0600_at_open(
    tmp_path: Path, permissive_umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    # What earlier releases left behind: the database and the -wal/-shm of a crashed process.
    path = tmp_path / "identity.db"
    await _open_and_write(path)
    leftovers = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    for p in leftovers:
        p.touch()
    for p in [path, *leftovers]:
        os.chmod(p, 0o644)
    db = AppDatabase(f"sqlite:{path}")
    await db.start()
    try:
        assert {p.name: _mode(p) for p in [path, *leftovers]} == {
            p.name: 0o600 for p in [path, *leftovers]
        }
    finally:
        await db.stop()
    assert f"{path} was readable by other users" in caplog.text


async def test_a_group_readable_database_is_left_as_the_operator_set_it(
    tmp_path: Path, permissive_umask: None
) -> None:
    # e.g. 0640 for a backup group: a deliberate choice, not a default.
    path = tmp_path / "identity.db"
    await _open_and_write(path)
    os.chmod(path, 0o640)
    db = AppDatabase(f"sqlite:{path}")
    await db.start()
    await db.stop()
    assert _mode(path) == 0o640


async def test_a_database_that_does_not_exist_is_not_created_by_construction(
    tmp_path: Path,
) -> None:
    # Read-only commands ask exists() and never start it: nothing is created before start().
    db = AppDatabase(f"sqlite:{tmp_path / 'data' / 'identity.db'}")
    assert not db.exists()
    assert os.listdir(tmp_path) == []


async def test_a_database_path_that_cannot_be_created_is_a_database_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "data").write_text("a file where the directory should be")
    db = AppDatabase(f"sqlite:{tmp_path / 'data' / 'db' / 'identity.db'}")
    with pytest.raises(DatabaseError, match=r"database\.url: cannot create the directory of"):
        await db.start()


async def test_a_database_path_that_is_a_directory_is_refused_and_left_alone(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "data"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    db = AppDatabase(f"sqlite:{directory}")
    with pytest.raises(DatabaseError, match=r"database\.url: .* is not a file"):
        await db.start()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755
