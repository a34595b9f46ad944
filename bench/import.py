"""Speed of ``python -m appservice import sydent`` on a large sydent database (issue 18).

A sydent-shaped SQLite database (sydent 2.6.1's tables, schema version 5) with N 3PID
associations and a few thousand invites is built once and cached under ``.cache/bench``. Then,
for each backend, a fresh database of ours is made (``migrate``, not timed) and the import runs
as an operator runs it: ``python -m appservice import sydent -c … --db … --sydent-config …`` in
its own process, timed from start to exit (start-up included), with its peak RSS from
``wait4``. The import is run a second time (it must change nothing) and the rows are counted
in our database. A last row times the reader alone (``read_sydent`` and every batch).

    .venv/bin/python bench/import.py                 # N=1,000,000, SQLite and PostgreSQL
    .venv/bin/python bench/import.py --rows 10000    # quick run

Prints a markdown table, also written to ``bench/results/import.md`` (``--output``).

The dataset, per 100 associations: 1 unbound here (a newer local row with a NULL mxid over an
older peer's row, as sydent leaves an unbind), 1 expired (``notAfter`` past), 10 only in the
global table, replicated from a peer (for one of them an older row of the peer binds the
address to someone else first), and 88 bound here (a local row and its global copy, as sydent
writes them). So 98 of 100 are imported.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nacl.signing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from targets import pg_admin  # noqa: E402

from appservice.importers.sydent import read_sydent  # noqa: E402

# Bump when the dataset's shape changes: the cache is keyed by it.
LAYOUT = 1
DEFAULT_POSTGRES = os.environ.get(
    "APPSERVICE_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres"
)
SERVER_NAME = "sydent.example"
PEER = "peer.example"
# sydent's association lifetime: 100 years.
LIFETIME_MS = 100 * 365 * 24 * 3600 * 1000
TARGET_ROWS_PER_S = 50_000

# sydent 2.6.1's tables as its migrations leave them (schema version 5), the ones an import
# reads plus their neighbours; facts about its layout.
SYDENT_SCHEMA = """
CREATE TABLE local_threepid_associations (
    id integer primary key autoincrement, medium varchar(16) not null,
    address varchar(256) not null, mxid varchar(256), ts integer, notBefore bigint,
    notAfter bigint, lookup_hash VARCHAR(256));
CREATE UNIQUE INDEX local_threepid_medium_address
    ON local_threepid_associations(medium, address);
CREATE TABLE global_threepid_associations (
    id integer primary key autoincrement, medium varchar(16) not null,
    address varchar(256) not null, mxid varchar(256) not null, ts integer not null,
    notBefore bigint not null, notAfter integer not null, originServer varchar(255) not null,
    originId integer not null, sgAssoc text not null, lookup_hash VARCHAR(256));
CREATE INDEX global_threepid_medium_address ON global_threepid_associations (medium, address);
CREATE INDEX global_threepid_medium_lower_address
    ON global_threepid_associations (medium, lower(address));
CREATE UNIQUE INDEX global_threepid_originServer_originId
    ON global_threepid_associations (originServer, originId);
CREATE INDEX global_threepid_lookup_hash ON global_threepid_associations(lookup_hash);
CREATE TABLE invite_tokens (
    id integer primary key, medium varchar(16) not null, address varchar(256) not null,
    room_id varchar(256) not null, sender varchar(256) not null, token varchar(256) not null,
    received_ts bigint, sent_ts bigint);
CREATE INDEX invite_token_medium_address on invite_tokens(medium, address);
CREATE INDEX invite_token_token on invite_tokens(token);
CREATE TABLE ephemeral_public_keys (
    id integer primary key, public_key varchar(256) not null, verify_count bigint default 0,
    persistence_ts bigint);
CREATE UNIQUE INDEX ephemeral_public_keys_index on ephemeral_public_keys(public_key);
CREATE TABLE hashing_metadata (id integer primary key, lookup_pepper varchar(256));
CREATE TABLE accounts (
    user_id TEXT NOT NULL PRIMARY KEY, created_ts BIGINT NOT NULL, consent_version TEXT);
CREATE TABLE tokens (token TEXT NOT NULL PRIMARY KEY, user_id TEXT NOT NULL);
PRAGMA user_version = 5;
"""


@dataclass(frozen=True)
class SydentDataset:
    """A cached sydent database and what an import of it must give."""

    db: Path
    config: Path
    associations: int
    bound: int
    pending_invites: int
    delivered_invites: int


@dataclass(frozen=True)
class Outcome:
    """One row of the table."""

    backend: str
    rows: int
    seconds: float
    peak_rss_mib: float
    rerun_seconds: float | None = None
    checked: str = ""

    @property
    def rows_per_s(self) -> float:
        """Imported bindings per second."""
        return self.rows / self.seconds if self.seconds else 0.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _lookup_hash(address: str, pepper: str) -> str:
    digest = hashlib.sha256(f"{address} email {pepper}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _association_rows(
    n: int, now_ms: int, pepper: str
) -> Iterator[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """(local rows, global rows) in chunks, shaped as the module docstring says."""
    local: list[tuple[Any, ...]] = []
    remote: list[tuple[Any, ...]] = []
    origin_id = 0
    for i in range(n):
        address = f"user{i}@example{i % 997}.org"
        mxid = f"@user{i}:localhost"
        ts = now_ms - 10 * (n - i)
        h = _lookup_hash(address, pepper)
        kind = i % 100
        if kind == 0:  # bound by a peer, then unbound here
            origin_id += 1
            remote.append(_global(address, mxid, ts - 5, ts - 5 + LIFETIME_MS, PEER, origin_id, h))
            local.append(("email", address, None, ts, None, None, h))
        elif kind <= 11:  # expired (kind 1), or replicated from a peer
            server = SERVER_NAME if kind == 1 else PEER
            not_after = now_ms - 1000 if kind == 1 else ts + LIFETIME_MS
            if kind == 2:
                origin_id += 1
                remote.append(
                    _global(address, f"@before{i}:localhost", ts - 5, not_after, PEER, origin_id, h)
                )
            if kind == 1:
                local.append(("email", address, mxid, ts, ts, not_after, h))
            origin_id += 1
            remote.append(_global(address, mxid, ts, not_after, server, origin_id, h))
        else:  # bound here: the local row and its global copy
            local.append(("email", address, mxid, ts, ts, ts + LIFETIME_MS, h))
            origin_id += 1
            remote.append(_global(address, mxid, ts, ts + LIFETIME_MS, SERVER_NAME, origin_id, h))
        if len(local) + len(remote) >= 100_000:
            yield local, remote
            local, remote = [], []
    yield local, remote


def _global(
    address: str, mxid: str, ts: int, not_after: int, server: str, origin_id: int, h: str
) -> tuple[Any, ...]:
    signed = (
        f'{{"address": "{address}", "medium": "email", "mxid": "{mxid}", "not_after": {not_after},'
        f' "not_before": {ts}, "signatures": {{"{server}": {{"ed25519:0": "{"A" * 86}"}}}},'
        f' "ts": {ts}}}'
    )
    return ("email", address, mxid, ts, ts, not_after, server, origin_id, signed, h)


def build_sydent(n: int, invites: int, cache_dir: Path) -> SydentDataset:
    """The cached sydent dataset for ``n`` associations and ``invites`` pending invites."""
    final = cache_dir / f"sydent-import-{n}-{invites}-v{LAYOUT}"
    meta_path = final / "meta.json"
    if not meta_path.exists():
        started = time.perf_counter()
        work = cache_dir / f"{final.name}.building-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            meta = _write_sydent(work, n, invites)
            (work / "meta.json").write_text(json.dumps(meta))
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        print(
            f"# built sydent dataset N={n:,} in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    meta = json.loads(meta_path.read_text())
    return SydentDataset(
        db=final / "sydent.db",
        config=final / "sydent.conf",
        associations=n,
        bound=meta["bound"],
        pending_invites=meta["pending"],
        delivered_invites=meta["delivered"],
    )


def _write_sydent(directory: Path, n: int, invites: int) -> dict[str, int]:
    now_ms = int(time.time() * 1000)
    pepper = base64.urlsafe_b64encode(os.urandom(12)).decode()
    seed = os.urandom(32)
    (directory / "sydent.conf").write_text(
        f"[general]\nserver.name = {SERVER_NAME}\n\n[db]\ndb.file = {directory / 'sydent.db'}\n\n"
        f"[crypto]\ned25519.signingkey = ed25519 0 {_b64(seed)}\n"
    )
    conn = sqlite3.connect(directory / "sydent.db")
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(SYDENT_SCHEMA)
        with conn:
            conn.execute("INSERT INTO hashing_metadata VALUES (1, ?)", (pepper,))
            for local, remote in _association_rows(n, now_ms, pepper):
                conn.executemany(
                    "INSERT INTO local_threepid_associations (medium, address, mxid, ts,"
                    " notBefore, notAfter, lookup_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    local,
                )
                conn.executemany(
                    "INSERT INTO global_threepid_associations (medium, address, mxid, ts,"
                    " notBefore, notAfter, originServer, originId, sgAssoc, lookup_hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    remote,
                )
            delivered = invites // 3
            received_s = now_ms // 1000 - 3600
            rows = []
            keys = []
            for j in range(invites + delivered):
                sent = received_s + 60 if j >= invites else None
                token = _b64(os.urandom(24)).replace("+", "a").replace("/", "b")
                rows.append(
                    (
                        "email",
                        f"invitee{j}@example.net",
                        f"!room{j % 50}:localhost",
                        "@inviter:localhost",
                        token,
                        received_s + j % 3600,
                        sent,
                    )
                )
                public = nacl.signing.SigningKey.generate().verify_key
                keys.append((_b64(bytes(public)), received_s + j % 3600))
            conn.executemany(
                "INSERT INTO invite_tokens (medium, address, room_id, sender, token,"
                " received_ts, sent_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.executemany(
                "INSERT INTO ephemeral_public_keys (public_key, verify_count, persistence_ts)"
                " VALUES (?, 0, ?)",
                keys,
            )
    finally:
        conn.close()
    unbound_or_expired = len(range(0, n, 100)) + len(range(1, n, 100))
    return {"bound": n - unbound_or_expired, "pending": invites, "delivered": delivered}


def _our_config(directory: Path, database_url: str) -> Path:
    config = {
        "server": {"name": "id.example", "public_base_url": "https://id.example"},
        "database": {"url": database_url},
        "keys": {"signing_key_path": str(directory / "signing.key")},
        "logging": {"level": "WARNING"},
    }
    path = directory / "config.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("APPSERVICE_")}


def _appservice(*args: str, log: Path) -> tuple[float, float, str]:
    """Run ``python -m appservice ARGS``: (seconds, peak RSS MiB, stdout); raises on failure."""
    started = time.perf_counter()
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "appservice", *args],
            cwd=REPO,
            env=_clean_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        assert process.stdout is not None
        out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(
            f"appservice {' '.join(args[:2])} failed ({process.returncode}):"
            f"\n{out}{log.read_text()[-3000:]}"
        )
    return seconds, usage.ru_maxrss / 1024, out


async def _pg_counts(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        bindings = await conn.fetchval("SELECT count(*) FROM bindings")
        invites = await conn.fetchval("SELECT count(*) FROM invites WHERE state = 'pending'")
        return int(bindings), int(invites)
    finally:
        await conn.close()


def _sqlite_counts(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        (bindings,) = conn.execute("SELECT count(*) FROM bindings").fetchone()
        (invites,) = conn.execute("SELECT count(*) FROM invites WHERE state = 'pending'").fetchone()
        return int(bindings), int(invites)
    finally:
        conn.close()


def run_backend(
    backend: str, data: SydentDataset, args: argparse.Namespace, run_dir: Path
) -> Outcome:
    """Import ``data`` into a fresh database of ``backend``, twice; checks the counts."""
    directory = run_dir / backend
    directory.mkdir(parents=True)
    database = f"bench_import_{os.getpid()}"
    if backend == "sqlite":
        url = f"sqlite:{directory / 'identity.db'}"
    else:
        asyncio.run(pg_admin(args.postgres, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        asyncio.run(pg_admin(args.postgres, f'CREATE DATABASE "{database}"'))
        url = f"{args.postgres.rpartition('/')[0]}/{database}"
    try:
        config = _our_config(directory, url)
        _appservice("migrate", "-c", str(config), log=directory / "migrate.log")
        command = ["import", "sydent", "-c", str(config), "--db", str(data.db)]
        command += ["--sydent-config", str(data.config)]
        seconds, rss, _ = _appservice(*command, log=directory / "import.log")
        rerun, _, again = _appservice(*command, log=directory / "import-again.log")
        if "nothing to change" not in again:
            raise RuntimeError(f"the second import changed something:\n{again}")
        if backend == "sqlite":
            bindings, invites = _sqlite_counts(directory / "identity.db")
        else:
            bindings, invites = asyncio.run(_pg_counts(url))
        expected = (data.bound, data.pending_invites)
        if (bindings, invites) != expected:
            raise RuntimeError(
                f"{backend}: {bindings} bindings and {invites} pending invites after the import,"
                f" expected {expected[0]} and {expected[1]}"
            )
    finally:
        if backend == "postgres":
            drop = f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'
            asyncio.run(pg_admin(args.postgres, drop))
    return Outcome(backend, bindings, seconds, rss, rerun, f"{bindings:,} + {invites:,}")


def run_reader(data: SydentDataset) -> Outcome:
    """``read_sydent`` alone, every batch read (in this process: its RSS includes the bench's)."""
    started = time.perf_counter()
    source = read_sydent(data.db, data.config)
    rows = sum(len(batch) for batch in source.bindings())
    seconds = time.perf_counter() - started
    if rows != data.bound or source.binding_count != data.bound:
        raise RuntimeError(f"the reader found {rows} bindings, expected {data.bound}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Outcome("read_sydent only", rows, seconds, rss)


def render(outcomes: Sequence[Outcome], data: SydentDataset) -> str:
    """The markdown report."""
    lines = [
        f"# Import from sydent ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"{os.cpu_count()} cores. A sydent database of {data.associations:,} associations "
        f"({data.bound:,} to import; see `bench/import.py`), {data.pending_invites:,} pending "
        f"and {data.delivered_invites:,} delivered invites. `seconds` is the wall time of "
        "`python -m appservice import sydent` into a fresh, migrated database (start-up "
        "included), `peak RSS` that process's; `re-run` the same command again (changes "
        f"nothing). Target: {TARGET_ROWS_PER_S:,} rows/s.",
        "",
        "| backend | rows | seconds | rows/s | peak RSS MiB | re-run (s) | in our db after |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for o in outcomes:
        rerun = f"{o.rerun_seconds:.1f}" if o.rerun_seconds is not None else ""
        lines.append(
            f"| {o.backend} | {o.rows:,} | {o.seconds:.1f} | {o.rows_per_s:,.0f} | "
            f"{o.peak_rss_mib:.0f} | {rerun} | {o.checked} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or reuse) the dataset, import it into each backend, print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="associations (default 1M)")
    parser.add_argument("--invites", type=int, help="pending invites (default rows/300, ≤ 3,000)")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="maintenance database URL")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench" / "results" / "import.md",
        help="also write the report here",
    )
    args = parser.parse_args(argv)
    if args.rows < 100:
        parser.error("--rows: at least 100")
    backends = args.backends.split(",")
    for backend in backends:
        if backend not in ("sqlite", "postgres"):
            parser.error(f"--backends: unknown backend {backend!r}")
    invites = args.invites if args.invites is not None else max(1, min(3000, args.rows // 300))
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    data = build_sydent(args.rows, invites, args.cache_dir)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="bench-import-") as run_dir:
        for backend in backends:
            outcomes.append(run_backend(backend, data, args, Path(run_dir)))
    outcomes.append(run_reader(data))
    report = render(outcomes, data)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
