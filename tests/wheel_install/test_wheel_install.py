"""The package as an operator installs it: the sdist and the wheel built from it carry the
migrations, the templates and the example config; the wheel, installed in a fresh venv, serves from
an empty directory on SQLite and on PostgreSQL.

The venv is made once per session; its dependencies come through pip's own cache, so a run after
the first takes about ten seconds here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import appservice
from tests.conftest import POSTGRES_ADMIN_URL, _admin, run_sync

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "matrix-identity-appservice"
MIGRATIONS = sorted(p.name for p in (REPO / "migrations").glob("*.sql"))
TEMPLATES = sorted(p.name for p in (REPO / "appservice" / "templates").iterdir())
VERSIONS = sorted({int(name[:4]) for name in MIGRATIONS})


def _environ() -> dict[str, str]:
    """The caller's environment without anything that would point at the source tree."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("APPSERVICE_") and name not in ("PYTHONPATH", "VIRTUAL_ENV")
    }


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, cwd=cwd, env=_environ(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from it (python -m build's default), in one directory."""
    if importlib.util.find_spec("build") is None:
        pytest.fail("the build package is missing: scripts/bootstrap.sh test installs it")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], cwd=out)
    return out


@pytest.fixture(scope="session")
def sdist(dist: Path) -> Path:
    (path,) = dist.glob("*.tar.gz")
    return path


@pytest.fixture(scope="session")
def wheel(dist: Path) -> Path:
    (path,) = dist.glob("*.whl")
    return path


@pytest.fixture(scope="session")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh venv (no system site-packages) with the wheel and its dependencies; its bin/."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(root)], cwd=root)
    _run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], cwd=root)
    return root / "bin"


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "operator"
    path.mkdir()
    return path


@pytest.fixture
def fresh_postgres_database() -> Iterator[str]:
    """A PostgreSQL database made for one test and dropped after it."""
    name = f"appservice_pkg_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        run_sync(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as e:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({e})")
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        run_sync(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sdist_carries_migrations_templates_and_example_config(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {f"migrations/{name}" for name in MIGRATIONS} <= names
    assert {f"appservice/templates/{name}" for name in TEMPLATES} <= names
    assert {"config.example.yaml", "setup.py", "pyproject.toml", "README.md"} <= names


def test_wheel_carries_them_inside_the_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert f"{SCRIPT} = appservice.cli:main" in whl.read(entry_points).decode()
        assert (
            whl.read("appservice/config.example.yaml")
            == (REPO / "config.example.yaml").read_bytes()
        )
    assert {f"appservice/migrations/{name}" for name in MIGRATIONS} <= names
    assert {f"appservice/templates/{name}" for name in TEMPLATES} <= names
    assert not any(name.startswith(("tests/", "migrations/")) for name in names)
    assert f"-{appservice.__version__}-" in wheel.name


def test_installed_package_is_the_wheel_and_knows_its_version(venv: Path, empty_dir: Path) -> None:
    where = _run(
        [str(venv / "python"), "-c", "import appservice; print(appservice.__file__)"], empty_dir
    )
    assert Path(where.stdout.strip()).is_relative_to(venv.parent)
    version = _run([str(venv / SCRIPT), "--version"], empty_dir)
    assert version.stdout == f"{SCRIPT} {appservice.__version__}\n"


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_installed_wheel_serves_from_an_empty_directory(
    venv: Path, empty_dir: Path, dialect: str, request: pytest.FixtureRequest
) -> None:
    script = str(venv / SCRIPT)
    _run([script, "generate-config", "-c", "config.yaml"], empty_dir)
    config = empty_dir / "config.yaml"
    assert config.read_bytes() == (REPO / "config.example.yaml").read_bytes()
    if dialect == "postgres":
        url = request.getfixturevalue("fresh_postgres_database")
        text, count = re.subn(
            r'^  url: "sqlite:data/identity.db"$',
            f'  url: "{url}"',
            config.read_text(),
            flags=re.MULTILINE,
        )
        assert count == 1
        config.write_text(text)

    migrated = _run([script, "migrate", "-c", "config.yaml"], empty_dir)
    assert migrated.stdout == f"applied {VERSIONS}\n"
    again = _run([script, "migrate", "-c", "config.yaml"], empty_dir)
    assert again.stdout == "database is up to date\n"

    port = _free_port()
    proc = subprocess.Popen(
        [script, "run", "-c", "config.yaml", "--listen", f"127.0.0.1:{port}"],
        cwd=empty_dir,
        env=_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = ""
    try:
        body = None
        deadline = time.monotonic() + 30
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/_matrix/identity/v2"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(0.1)
        assert proc.poll() is None, "the server exited"
        assert body == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=15)
    assert proc.returncode == 0, output
    assert "Traceback" not in output

    # Everything it made is in the data directory beside the config.
    data = empty_dir / "data"
    expected = {"signing.key"} | ({"identity.db"} if dialect == "sqlite" else set())
    assert expected <= {p.name for p in data.iterdir()}
    assert sorted(p.name for p in empty_dir.iterdir()) == ["config.yaml", "data"]
