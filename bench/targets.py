"""The servers under test and their datasets: our server (SQLite or PostgreSQL) and sydent 2.6.1.

A dataset of N bindings is generated once per (server, backend, N, schema) and cached under the
cache directory (SQLite files, a PostgreSQL template database); each benchmark run works on a
copy of it (a copied file, or ``CREATE DATABASE … TEMPLATE``), dropped at the end.

Addresses are ``user<i>@example<i mod 997>.org`` bound to ``@user<i>:localhost``, so a client can
compute the lookup hash of any bound address from the pepper alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parents[1]
# sydent's installer and config are shared with the import tests (tests/support/sydent.py).
sys.path.insert(0, str(REPO))

from tests.support.sydent import (  # noqa: E402
    SYDENT_VERSION,
    ensure_sydent_venv,
    read_signing_key,
    sydent_command,
    sydent_environment,
    write_sydent_config,
)

Popen = subprocess.Popen[bytes]
MEDIUM = "email"
USER_ID = "@bench:localhost"
ROOM_ID = "!bench:localhost"
# Far in the future, as bindings are valid "forever" (ms).
NOT_AFTER = 4_102_444_800_000
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_ALPHANUMERIC = string.ascii_letters + string.digits


def address(i: int) -> str:
    """The i-th bound email address of a dataset."""
    return f"user{i}@example{i % 997}.org"


def mxid(i: int) -> str:
    """Who the i-th address is bound to."""
    return f"@user{i}:localhost"


def hash_of(addr: str, pepper: str) -> str:
    """The spec's sha256 lookup hash (url-safe unpadded base64)."""
    digest = hashlib.sha256(f"{addr} {MEDIUM} {pepper}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process (``/proc/<pid>/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def process_memory_kib(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` memory line (``VmRSS``, ``VmHWM``) in KiB, 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _schema_key() -> str:
    """A short digest of our migrations: a cached database is rebuilt when they change."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "migrations").glob("*.sql")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _file_exists(path: str) -> bool:
    return os.path.exists(path)


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _clean_env() -> dict[str, str]:
    """The environment for servers: ours must not pick up APPSERVICE_* settings by accident."""
    return {k: v for k, v in os.environ.items() if not k.startswith("APPSERVICE_")}


@dataclass(frozen=True)
class Dataset:
    """A cached dataset: where it is, its pepper and an access token of ``USER_ID``."""

    server: str  # "ours" or "sydent"
    backend: str  # "sqlite" or "postgres"
    n: int
    pepper: str
    token: str
    # SQLite file (ours, sydent) or template database name (ours on PostgreSQL).
    location: str
    # sydent: its cached config file (holds its signing key).
    config: str = ""


@dataclass
class Running:
    """A server process being measured."""

    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    startup_s: float
    log_path: Path

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def cpu_seconds(self) -> float:
        """CPU used by the server so far."""
        return process_cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        """Resident memory now."""
        return process_memory_kib(self.pid, "VmRSS")

    def peak_rss_kib(self) -> int:
        """Peak resident memory (VmHWM)."""
        return process_memory_kib(self.pid, "VmHWM")

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's output, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_process(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the process."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=30)


async def wait_until_ready(
    process: subprocess.Popen[bytes], base_url: str, started: float, within: float = 120.0
) -> float:
    """Poll ``GET /_matrix/identity/v2`` until it answers 200; seconds since ``started``."""
    url = base_url + "/_matrix/identity/v2"
    limit = started + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.perf_counter() < limit:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with status {process.returncode}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            await asyncio.sleep(0.005)
    raise RuntimeError(f"server not ready after {within:.0f} s")


async def start_process(
    name: str, command: list[str], *, cwd: Path, env: dict[str, str], port: int, log_path: Path
) -> Running:
    """Start a server and wait for its first 200 (start-up time: from spawning to it)."""
    started = time.perf_counter()
    process = _spawn(command, cwd, env, log_path)
    base_url = f"http://127.0.0.1:{port}"
    running = Running(name, process, base_url, 0.0, log_path)
    try:
        running.startup_s = await wait_until_ready(process, base_url, started)
    except BaseException as e:
        await asyncio.to_thread(stop_process, process, 2)
        raise RuntimeError(f"{name}: {e}\n{running.log_tail()}") from e
    return running


def _spawn(command: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> Popen:
    """Start a process with its output appended to ``log_path`` (Popen returns at once)."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


# --------------------------------------------------------------------------------------------
# Our server
# --------------------------------------------------------------------------------------------


def write_our_config(
    directory: Path, database_url: str, port: int, smtp_port: int, max_connections: int
) -> Path:
    """Our server's config for the bench (raised rate limits, SMTP to the sink)."""
    config: dict[str, Any] = {
        "server": {"name": f"127.0.0.1:{port}", "public_base_url": f"http://127.0.0.1:{port}"},
        "listen": {"host": "127.0.0.1", "port": port},
        "database": {"url": database_url, "min_connections": 1, "max_connections": max_connections},
        "keys": {"signing_key_path": "signing.key"},
        "ratelimits": {
            "request_token_per_address": {"limit": 1_000_000, "period": "1h"},
            "request_token_per_ip": {"limit": 100_000_000, "period": "1h"},
            "store_invite_per_sender": {"limit": 100_000_000, "period": "1h"},
            # Every request comes from 127.0.0.1.
            "store_invite_per_address": {"limit": 100_000_000, "period": "1h"},
            "store_invite_per_ip": {"limit": 100_000_000, "period": "1h"},
            "register_per_ip": {"limit": 100_000_000, "period": "1h"},
            "v1_lookup_per_ip": {"limit": 100_000_000, "period": "1h"},
        },
        "notifications": {
            "email": {
                "connector": "smtp",
                "sender": "Bench identity server <noreply@localhost>",
                "smtp": {"host": "127.0.0.1", "port": smtp_port, "security": "none"},
            }
        },
        "logging": {"level": "INFO"},
    }
    path = directory / "config.yaml"
    # JSON is YAML; no need for a YAML writer here.
    path.write_text(json.dumps(config, indent=2))
    return path


def _migrate(config_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "appservice", "migrate", "-c", str(config_path)],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"migrate failed: {result.stdout}{result.stderr}")


def _new_secret(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def _binding_rows(n: int, pepper: str, now_ms: int) -> Iterator[tuple[Any, ...]]:
    for i in range(n):
        a = address(i)
        yield (MEDIUM, a, mxid(i), hash_of(a, pepper), now_ms, now_ms, NOT_AFTER)


_BINDING_COLUMNS = [
    "medium",
    "address",
    "mxid",
    "lookup_hash",
    "created_ts",
    "not_before",
    "not_after",
]


def _sqlite_load_ours(db_path: Path, n: int, pepper: str, token: str, now_ms: int) -> None:
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        with conn:
            conn.execute(
                "INSERT INTO server_state (name, value) VALUES ('lookup_pepper', ?)", (pepper,)
            )
            conn.execute(
                "INSERT INTO accounts (token_hash, user_id, created_ts) VALUES (?, ?, ?)",
                (hashlib.sha256(token.encode()).hexdigest(), USER_ID, now_ms),
            )
            rows = _binding_rows(n, pepper, now_ms)
            conn.executemany(
                f"INSERT INTO bindings ({', '.join(_BINDING_COLUMNS)})"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
    finally:
        conn.close()


async def _pg_load_ours(url: str, n: int, pepper: str, token: str, now_ms: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO server_state (name, value) VALUES ('lookup_pepper', $1)", pepper
        )
        await conn.execute(
            "INSERT INTO accounts (token_hash, user_id, created_ts) VALUES ($1, $2, $3)",
            hashlib.sha256(token.encode()).hexdigest(),
            USER_ID,
            now_ms,
        )
        for chunk in _chunks(n, 100_000):
            rows = [
                (
                    MEDIUM,
                    address(i),
                    mxid(i),
                    hash_of(address(i), pepper),
                    now_ms,
                    now_ms,
                    NOT_AFTER,
                )
                for i in chunk
            ]
            await conn.copy_records_to_table("bindings", records=rows, columns=_BINDING_COLUMNS)
        # What autovacuum would soon do on a live server; without it the planner guesses.
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def pg_admin(admin_url: str, *statements: str) -> None:
    """Run statements on the maintenance database (CREATE/DROP DATABASE)."""
    conn = await asyncpg.connect(admin_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def pg_database_exists(admin_url: str, name: str) -> bool:
    """Whether a database exists."""
    conn = await asyncpg.connect(admin_url)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


def pg_url(admin_url: str, database: str) -> str:
    """``admin_url`` pointing at another database."""
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{database}"


async def prepare_ours(backend: str, n: int, cache_dir: Path, admin_url: str) -> Dataset:
    """The cached dataset of our server for ``backend`` and ``n`` (built when missing)."""
    key = _schema_key()
    meta_path = cache_dir / f"ours-{backend}-{n}-{key}.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        present = (
            _file_exists(meta["location"])
            if backend == "sqlite"
            else await pg_database_exists(admin_url, meta["location"])
        )
        if present:
            return Dataset("ours", backend, n, meta["pepper"], meta["token"], meta["location"])
    pepper, token = _new_secret(32), "bench_" + secrets.token_urlsafe(24)
    now_ms = int(time.time() * 1000)
    started = time.perf_counter()
    work = cache_dir / f"ours-{backend}-{n}-{key}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if backend == "sqlite":
            final = cache_dir / f"ours-sqlite-{n}-{key}"
            write_our_config(work, "sqlite:identity.db", free_port(), 25, 10)
            _migrate(work / "config.yaml")
            _sqlite_load_ours(work / "identity.db", n, pepper, token, now_ms)
            (work / "config.yaml").unlink()
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
            location = str(final / "identity.db")
        else:
            location = f"bench_cache_{n}_{key}"
            building = f"{location}_building_{os.getpid()}"
            await pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)')
            await pg_admin(admin_url, f'CREATE DATABASE "{building}"')
            try:
                write_our_config(work, pg_url(admin_url, building), free_port(), 25, 10)
                _migrate(work / "config.yaml")
                await _pg_load_ours(pg_url(admin_url, building), n, pepper, token, now_ms)
                await pg_admin(
                    admin_url,
                    f'DROP DATABASE IF EXISTS "{location}" WITH (FORCE)',
                    f'ALTER DATABASE "{building}" RENAME TO "{location}"',
                )
            except BaseException:
                await pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)')
                raise
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    meta_path.write_text(json.dumps({"pepper": pepper, "token": token, "location": location}))
    print(
        f"# built dataset ours/{backend} N={n} in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return Dataset("ours", backend, n, pepper, token, location)


class OurServer:
    """Our server on a per-run copy of a cached dataset."""

    def __init__(
        self, dataset: Dataset, run_dir: Path, admin_url: str, smtp_port: int, max_connections: int
    ) -> None:
        self.dataset = dataset
        self.directory = run_dir / f"ours-{dataset.backend}-{dataset.n}"
        self.admin_url = admin_url
        self.smtp_port = smtp_port
        self.max_connections = max_connections
        self.database_name = f"bench_{os.getpid()}_{dataset.n}"
        self.database_url = ""
        self.sqlite_path = self.directory / "identity.db"

    @property
    def label(self) -> str:
        """How rows name it."""
        return "ours"

    async def create_database(self) -> None:
        """This run's copy of the dataset."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.dataset.backend == "sqlite":
            shutil.copyfile(self.dataset.location, self.sqlite_path)
            self.database_url = "sqlite:identity.db"
        else:
            await pg_admin(
                self.admin_url,
                f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)',
                f'CREATE DATABASE "{self.database_name}" TEMPLATE "{self.dataset.location}"',
            )
            self.database_url = pg_url(self.admin_url, self.database_name)

    async def drop_database(self, keep_files: bool = False) -> None:
        """Remove this run's copy (``keep_files``: only the PostgreSQL database)."""
        if self.dataset.backend == "postgres" and self.database_url:
            await pg_admin(
                self.admin_url, f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)'
            )
        if not keep_files:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def start(self) -> Running:
        """Start the server; returns once it answered 200."""
        port = free_port()
        config = write_our_config(
            self.directory, self.database_url, port, self.smtp_port, self.max_connections
        )
        return await start_process(
            "ours",
            [sys.executable, "-m", "appservice", "run", "-c", str(config)],
            cwd=REPO,
            env=_clean_env(),
            port=port,
            log_path=self.directory / "server.log",
        )


# --------------------------------------------------------------------------------------------
# sydent
# --------------------------------------------------------------------------------------------


async def _start_sydent(directory: Path, venv: Path, config: Path, port: int) -> Running:
    return await start_process(
        "sydent",
        sydent_command(venv),
        cwd=directory,
        env=sydent_environment(config),
        port=port,
        log_path=directory / "sydent.log",
    )


def _sqlite_load_sydent(db_path: Path, n: int, server_name: str, token: str) -> str:
    """Load N associations into both of sydent's tables; returns sydent's pepper."""
    conn = sqlite3.connect(db_path)
    try:
        (pepper,) = conn.execute("SELECT lookup_pepper FROM hashing_metadata").fetchone()
        now_ms = int(time.time() * 1000)
        conn.execute("PRAGMA synchronous = OFF")
        with conn:
            conn.execute(
                "INSERT INTO accounts (user_id, created_ts, consent_version) VALUES (?, ?, NULL)",
                (USER_ID, now_ms),
            )
            # sydent stores its access tokens as they are.
            conn.execute("INSERT INTO tokens (token, user_id) VALUES (?, ?)", (token, USER_ID))
            for chunk in _chunks(n, 50_000):
                local_rows = []
                global_rows = []
                for i in chunk:
                    a, m, h = address(i), mxid(i), hash_of(address(i), pepper)
                    local_rows.append((i + 1, MEDIUM, a, m, now_ms, now_ms, NOT_AFTER, h))
                    signed = {
                        "address": a,
                        "medium": MEDIUM,
                        "mxid": m,
                        "not_before": now_ms,
                        "not_after": NOT_AFTER,
                        "ts": now_ms,
                        # Shaped like an ed25519 signature (never verified by a v2 lookup).
                        "signatures": {server_name: {"ed25519:0": "A" * 86}},
                    }
                    global_rows.append(
                        (
                            MEDIUM,
                            a,
                            m,
                            now_ms,
                            now_ms,
                            NOT_AFTER,
                            server_name,
                            i + 1,
                            json.dumps(signed),
                            h,
                        )
                    )
                conn.executemany(
                    "INSERT INTO local_threepid_associations"
                    " (id, medium, address, mxid, ts, notBefore, notAfter, lookup_hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    local_rows,
                )
                conn.executemany(
                    "INSERT INTO global_threepid_associations"
                    " (medium, address, mxid, ts, notBefore, notAfter, originServer, originId,"
                    " sgAssoc, lookup_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    global_rows,
                )
        return str(pepper)
    finally:
        conn.close()


async def prepare_sydent(n: int, cache_dir: Path, venv: Path) -> Dataset:
    """sydent's cached dataset for ``n``: schema and pepper from a first start, then N rows."""
    final = cache_dir / f"sydent-{SYDENT_VERSION}-{n}"
    meta_path = final / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return Dataset(
            "sydent",
            "sqlite",
            n,
            meta["pepper"],
            meta["token"],
            str(final / "sydent.db"),
            str(final / "sydent.conf"),
        )
    ensure_sydent_venv(venv)
    started = time.perf_counter()
    work = cache_dir / f"sydent-{SYDENT_VERSION}-{n}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        port = free_port()
        config = write_sydent_config(work, port=port, smtp_port=25, db_file=work / "sydent.db")
        running = await _start_sydent(work, venv, config, port)
        stop_process(running.process)
        token = "bench_" + secrets.token_urlsafe(24)
        pepper = _sqlite_load_sydent(work / "sydent.db", n, "127.0.0.1", token)
        (work / "meta.json").write_text(json.dumps({"pepper": pepper, "token": token}))
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(f"# built dataset sydent N={n} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return await prepare_sydent(n, cache_dir, venv)


class SydentServer:
    """sydent on a per-run copy of its cached dataset."""

    def __init__(self, dataset: Dataset, run_dir: Path, venv: Path, smtp_port: int) -> None:
        self.dataset = dataset
        self.directory = run_dir / f"sydent-{dataset.n}"
        self.venv = venv
        self.smtp_port = smtp_port
        self.db_path = self.directory / "sydent.db"

    @property
    def label(self) -> str:
        """How rows name it."""
        return f"sydent {SYDENT_VERSION}"

    async def create_database(self) -> None:
        """This run's copy of the dataset."""
        self.directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.dataset.location, self.db_path)

    async def drop_database(self, keep_files: bool = False) -> None:
        """Remove this run's copy (unless ``keep_files``)."""
        if not keep_files:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def start(self) -> Running:
        """Start sydent; returns once it answered 200."""
        port = free_port()
        config = write_sydent_config(
            self.directory,
            port=port,
            smtp_port=self.smtp_port,
            db_file=self.db_path,
            signing_key=read_signing_key(Path(self.dataset.config)),
        )
        return await _start_sydent(self.directory, self.venv, config, port)
