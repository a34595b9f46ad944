"""Write an :class:`~appservice.importers.model.ImportSource` into our database and key file.

The server is stopped while this runs (refused when an instance looks alive). Each table goes
in one transaction, so an interrupted import leaves no half table; a second run changes nothing.
Order: signing keys first (imported invites name them), then bindings, then pending invites with
the ephemeral keys. ``dry_run`` does the same work and rolls every transaction back, leaving the
key file alone.

Bindings stream through a staging table (``COPY`` on PostgreSQL, ``executemany`` on SQLite);
one statement then plans them (the newest association of each address, and whether it is new,
newer than ours or unchanged), and an ``INSERT … SELECT`` and an ``UPDATE … FROM`` write what
changes (into an empty table the newest rows go straight in). A large write drops the table's
secondary indexes and builds them again after.

A later run does not bring back an imported association unbound here since (the old server
still has it): ``unbound_imports`` keeps a digest of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import signedjson.key
from unpaddedbase64 import decode_base64, encode_base64

from appservice.clock import Clock
from appservice.config.model import InvitesConfig
from appservice.crypto.hashing import lookup_hash
from appservice.crypto.signing import (
    KeyFileError,
    PublicKey,
    key_id_of,
    public_key_of,
    read_key_file,
    write_key_file,
)
from appservice.db.bindings import unbound_digest
from appservice.db.database import AppDatabase
from appservice.db.invites import PENDING
from appservice.db.lookup_peppers import HASH_COLUMNS, PepperState, PepperStore
from appservice.db.server_state import ServerStateStore
from appservice.db.signing_keys import SigningKeyStore, StoredSigningKey
from appservice.importers.model import (
    ImportedBinding,
    ImportedInvite,
    ImportFailed,
    ImportSource,
    ed25519_public_key,
)
from appservice.services.invites import DETAIL_FIELDS, redact_address
from appservice.services.keys import check_key_file, lost_key_file, normalise_public_key
from appservice.services.lookup import ensure_pepper
from appservice.threepid import canonical_address, is_opaque_id, is_room_id, user_id_server

BINDINGS = "bindings"
INVITES = "invites"
SIGNING_KEYS = "signing keys"
EPHEMERAL_KEYS = "ephemeral keys"
# A progress line every this many binding rows.
PROGRESS_EVERY = 100_000
_SOURCE_NAME = re.compile(r"[a-z0-9_]{1,32}")
_KEY_ID = re.compile(r"ed25519:[A-Za-z0-9_-]{1,64}")  # ma1sd serials hold "-"
_STAGING = "import_bindings_staging"
_STAGING_COLUMNS = ("medium", "address", "mxid", "created_ts", "not_before", "not_after")
# On PostgreSQL the lookup hashes (HASH_COLUMNS) are staged too (see _hash_sql).
# Tables whose leases show a running instance: (table, extra condition).
_LEASES = (
    ("onbind_outbox", "claimed_until IS NOT NULL AND claimed_until > $1"),
    ("appservice_actions", "claimed_until IS NOT NULL AND claimed_until > $1"),
    ("store_sync", "claimed_until > $1"),
    ("lookup_pepper", "claimed_until > $1"),
)


class ImportRefused(ImportFailed):
    """The import must not run against this database as it is (the message says why)."""


@dataclass
class TableReport:
    """What one table got: rows found in the source and what became of them."""

    found: int = 0
    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    # Rows not imported, by reason.
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, count: int = 1) -> None:
        """Count ``count`` rows skipped for ``reason``."""
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    @property
    def changed(self) -> bool:
        """Whether this table was (or would be) written."""
        return bool(self.imported or self.updated)

    def line(self, table: str, dry_run: bool) -> str:
        """One line for the operator."""
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        tail = f", skipped {skipped} ({reasons})" if skipped else ""
        if not self.changed:
            return (
                f"{table}: found {self.found}, nothing to change ({self.unchanged} unchanged{tail})"
            )
        verb = "would import" if dry_run else "imported"
        update = "would update" if dry_run else "updated"
        return (
            f"{table}: found {self.found}, {verb} {self.imported}, {update} {self.updated},"
            f" unchanged {self.unchanged}{tail}"
        )


@dataclass
class ImportReport:
    """The outcome of :func:`run_import`, per table, with the reader's notes."""

    source: str
    dry_run: bool
    tables: dict[str, TableReport] = field(default_factory=dict)
    # The reader's counts of what it found and deliberately left out ("delivered invites": 3).
    source_skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self, name: str) -> TableReport:
        """The report of one table (made on first use)."""
        return self.tables.setdefault(name, TableReport())

    @property
    def changed(self) -> bool:
        """Whether anything was (or would be) written."""
        return any(t.changed for t in self.tables.values())

    def lines(self) -> list[str]:
        """What the command prints."""
        out = [f"import from {self.source}{' (dry run)' if self.dry_run else ''}:"]
        out += [f"  {t.line(name, self.dry_run)}" for name, t in self.tables.items()]
        out += [
            f"  not imported from {self.source}: {n} {what}"
            for what, n in sorted(self.source_skipped.items())
            if n
        ]
        out += [f"  note: {note}" for note in self.notes]
        if self.dry_run:
            out.append("  dry run: nothing was written")
        elif not self.changed:
            out.append("  nothing to change: the database already holds this import")
        out.append(f"  took {self.seconds:.1f} s")
        return out

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON object (kept in ``import_runs``)."""
        return {
            "source": self.source,
            "tables": {
                name: {
                    "found": t.found,
                    "imported": t.imported,
                    "updated": t.updated,
                    "unchanged": t.unchanged,
                    "skipped": t.skipped,
                }
                for name, t in self.tables.items()
            },
            "source_skipped": self.source_skipped,
            "notes": self.notes,
        }


class _Rollback(Exception):
    """Raised inside a transaction to undo it (a dry run)."""


def invite_id(source: str, source_id: str) -> str:
    """Our id for an imported invite: the same on every run, hex (an opaque id that never
    starts with ``-``) and 24 characters like the ids store-invite makes."""
    return hashlib.sha256(f"{source}\x00{source_id}".encode()).hexdigest()[:24]


async def run_import(
    db: AppDatabase,
    key_path: Path,
    source: ImportSource,
    *,
    invites: InvitesConfig | None = None,
    merge: bool = False,
    dry_run: bool = False,
    clock: Clock | None = None,
    progress: Callable[[str], None] | None = None,
) -> ImportReport:
    """Import ``source`` into ``db`` (started and migrated) and the key file at ``key_path``.

    ``invites``: the server's invite settings (display names are redacted as store-invite
    does; the report counts invites past their expiry). ``progress`` gets a line every
    :data:`PROGRESS_EVERY` bindings.

    Raises :class:`ImportRefused` (nothing written) when an instance looks alive, or when the
    database has bindings or invites not imported from this source and ``merge`` is False;
    :class:`ImportFailed` for source data that cannot be imported; ``KeyFileError`` for a key
    file that cannot be read or written.
    """
    clock = clock or Clock()
    started = clock.time()
    if not _SOURCE_NAME.fullmatch(source.name):
        raise ImportFailed(f"import: source name {source.name!r} is not [a-z0-9_]{{1,32}}")
    report = ImportReport(source.name, dry_run, source_skipped=dict(source.skipped))
    report.notes += source.notes
    step = "checking the database"
    try:
        await _refuse_if_running(db, clock.now_ms())
        fresh = await _refuse_foreign_rows(db, source.name, merge)
        step = SIGNING_KEYS
        key_map = await _import_signing_keys(db, key_path, source, fresh, dry_run, clock, report)
        step = BINDINGS
        await _import_bindings(db, source, dry_run, clock, report, progress)
        step = INVITES
        await _import_invites(
            db, source, key_map, invites or InvitesConfig(), dry_run, clock.now_ms(), report
        )
    except (sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        # E.g. SQLite locked by a running server: one line, not a driver's traceback.
        done = [name for name in report.tables if name != step and report.tables[name].changed]
        raise ImportFailed(
            f"import: the database failed while importing {step}, which was not written"
            f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            + (f"; {', '.join(done)} were imported before it" if done and not dry_run else "")
        ) from e
    report.seconds = clock.time() - started
    if report.changed and not dry_run:
        await db.execute(
            "INSERT INTO import_runs (id, source, started_ts, finished_ts, report)"
            " VALUES ($1, $2, $3, $4, $5)",
            secrets.token_hex(12),
            source.name,
            int(started * 1000),
            clock.now_ms(),
            json.dumps(report.as_json(), sort_keys=True),
        )
    return report


async def _refuse_if_running(db: AppDatabase, now_ms: int) -> None:
    """Refuse while a server instance holds a lease on some work (it is running)."""
    for table, condition in _LEASES:
        if await db.fetchval(f"SELECT 1 FROM {table} WHERE {condition} LIMIT 1", now_ms):
            raise ImportRefused(
                f"import: a server instance is running on this database (it holds a lease in "
                f"{table}); stop every instance first, then import"
            )


async def _refuse_foreign_rows(db: AppDatabase, source: str, merge: bool) -> bool:
    """Whether the database is fresh for ``source`` (no bindings or invites from elsewhere);
    refuse when it is not and ``merge`` is False."""
    counts = []
    for table in (BINDINGS, INVITES):
        n = await db.fetchval(
            f"SELECT COUNT(*) FROM {table} WHERE imported_from IS NULL OR imported_from <> $1",
            source,
        )
        counts.append(int(n or 0))
    if not any(counts):
        return True
    if not merge:
        raise ImportRefused(
            f"import: the database already has {counts[0]} bindings and {counts[1]} invites not "
            f"imported from {source}; run again with --merge to add {source}'s data to them"
        )
    return False


# --- signing keys -------------------------------------------------------------------------------


def _signing_key(key_id: str, seed: bytes) -> Any:
    """A signedjson signing key (what the key file holds) from an id and a 32-byte seed."""
    if not _KEY_ID.fullmatch(key_id):
        raise ImportFailed(
            f"import: signing key id {key_id!r} is not ed25519:<letters, digits, _ or ->"
        )
    if len(seed) != 32:
        raise ImportFailed(f"import: signing key {key_id} is not a 32-byte ed25519 seed")
    return signedjson.key.decode_signing_key_base64(
        "ed25519", key_id.partition(":")[2], encode_base64(seed)
    )


def _public(key: Any) -> str:
    return public_key_of(key).public_key


def _write_key_file(path: Path, keys: list[Any], backup: Path | None) -> None:
    """Replace the key file atomically (0600); first copy the old one to ``backup`` (0600)."""
    if backup is not None:
        try:
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(path.read_bytes())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise KeyFileError(
                f"keys: cannot back up signing key file to {backup}: {e.strerror}"
            ) from e
    write_key_file(path, keys)


@dataclass
class _KeyPlan:
    in_file: list[Any]  # the new key file, current key first
    inserts: list[tuple[str, str, bool]]  # (key id, public key, valid) to record
    revokes: list[str]
    drops: list[str]  # our key ids to forget (a fresh server's key clashing with the source's)


def _ids(keys: list[Any]) -> set[str]:
    return {key_id_of(k) for k in keys}


def _plan_keys(
    source: ImportSource,
    existing: list[Any],
    stored: list[StoredSigningKey],
    fresh: bool,
    report: ImportReport,
) -> tuple[_KeyPlan, dict[str, str]]:
    """Decide where each imported key goes; returns the plan and the map from the source's key
    ids to ours.

    A key already here (by public key) keeps its id. Else it takes its own id when free; on a
    fresh server a key of ours with that id is dropped (nothing was signed with it that anyone
    kept), on a merge it takes ``ed25519:<source>_<version>``.
    """
    table = report.table(SIGNING_KEYS)
    in_file = list(existing)
    stored_by_id = {k.key_id: k for k in stored}
    stored_by_public = {k.public_key: k for k in stored}
    plan = _KeyPlan([], [], [], [])
    key_map: dict[str, str] = {}
    new_current: str | None = None
    # Key ids that must not sign: revoked here, or imported as revoked.
    invalid = {k.key_id for k in stored if k.revoked_ts is not None}
    for source_key in source.signing_keys:
        table.found += 1
        key = _signing_key(source_key.key_id, source_key.seed)
        public = _public(key)
        in_file_as = {_public(k): key_id_of(k) for k in in_file}.get(public)
        recorded_as = stored_by_public.get(public)
        target = in_file_as or (recorded_as.key_id if recorded_as else None)
        if target is None:
            target = source_key.key_id
            if target in _ids(in_file) or target in stored_by_id:
                if fresh:
                    plan.drops.append(target)
                    in_file = [k for k in in_file if key_id_of(k) != target]
                    report.notes.append(
                        f"{source.name}'s {target} replaces this server's unused {target}"
                    )
                else:
                    target = f"ed25519:{source.name}_{key.version}"
                    if target in _ids(in_file) or target in stored_by_id:
                        raise ImportFailed(
                            f"import: {source.name}'s {source_key.key_id} clashes with our key "
                            f"of that id, and {target} is taken too"
                        )
                    report.notes.append(
                        f"{source.name}'s {source_key.key_id} clashes with this server's key of "
                        f"that id: imported as {target}, ours stays current (homeservers check "
                        "invite signatures by public key, so invites listing it still complete)"
                    )
        changed = False
        if target not in _ids(in_file):
            in_file.append(_signing_key(target, source_key.seed))
            changed = True
        recorded = None if target in plan.drops else stored_by_id.get(target)
        if recorded is None:
            plan.inserts.append((target, public, source_key.valid))
            changed = True
        if changed:
            table.imported += 1
        elif not source_key.valid and recorded is not None and recorded.revoked_ts is None:
            plan.revokes.append(target)
            table.updated += 1
        else:
            table.unchanged += 1
        key_map[source_key.key_id] = target
        if not source_key.valid:
            invalid.add(target)
        if source_key.current and source_key.valid and fresh:
            new_current = target
    if new_current is None and (not in_file or key_id_of(in_file[0]) in invalid):
        # The key that would sign is revoked (or there is none): the first valid key of the
        # file becomes current, else a new key.
        new_current = next((key_id_of(k) for k in in_file if key_id_of(k) not in invalid), None)
        if new_current is None:
            taken = _ids(in_file) | set(stored_by_id)
            numbers = [int(v) for v in (i.partition(":")[2] for i in taken) if v.isdigit()]
            fresh_key = signedjson.key.generate_signing_key(str(max(numbers, default=-1) + 1))
            new_current = key_id_of(fresh_key)
            in_file.append(fresh_key)
            plan.inserts.append((new_current, _public(fresh_key), True))
            report.notes.append(
                f"{source.name} has no valid signing key: a new key {new_current} signs here"
            )
    if new_current is not None:
        first = [k for k in in_file if key_id_of(k) == new_current]
        in_file = first + [k for k in in_file if key_id_of(k) != new_current]
    plan.in_file = in_file
    return plan, key_map


async def _import_signing_keys(
    db: AppDatabase,
    key_path: Path,
    source: ImportSource,
    fresh: bool,
    dry_run: bool,
    clock: Clock,
    report: ImportReport,
) -> dict[str, str]:
    """Put the source's keys into the key file and ``signing_keys``; returns the id map."""
    report.table(SIGNING_KEYS)  # listed first, also when the source has none
    store = SigningKeyStore(db)
    existing = read_key_file(key_path)
    stored = await store.all()
    if existing is None and stored:
        raise lost_key_file(key_path, stored)
    check_key_file(
        key_path,
        [PublicKey(key_id_of(k), _public(k)) for k in existing or []],
        stored,
    )
    if not source.signing_keys:
        return {}
    plan, key_map = _plan_keys(source, existing or [], stored, fresh, report)
    file_changes = [(key_id_of(k), _public(k)) for k in plan.in_file] != [
        (key_id_of(k), _public(k)) for k in existing or []
    ]
    if not (plan.inserts or plan.revokes or plan.drops or file_changes):
        return key_map
    now = clock.now_ms()
    try:
        async with db.transaction():
            for key_id in plan.drops:
                await db.execute("DELETE FROM signing_keys WHERE key_id = $1", key_id)
            for key_id, public, valid in plan.inserts:
                await db.execute(
                    "INSERT INTO signing_keys (key_id, public_key, created_ts, revoked_ts)"
                    " VALUES ($1, $2, $3, $4)",
                    key_id,
                    public,
                    now,
                    None if valid else now,
                )
            for key_id in plan.revokes:
                await store.revoke(key_id, now)
            if dry_run:
                raise _Rollback
            if file_changes:
                backup = (
                    key_path.with_name(f"{key_path.name}.before-{source.name}-import-{now}")
                    if existing is not None
                    else None
                )
                _write_key_file(key_path, plan.in_file, backup)
                if backup is not None:
                    report.notes.append(f"the previous key file is kept as {backup}")
    except _Rollback:
        pass
    current = plan.in_file[0]
    if not existing or _public(existing[0]) != _public(current):
        report.notes.append(
            f"current signing key {'would be' if dry_run else 'is now'} {key_id_of(current)}"
            f" {_public(current)}"
        )
    return key_map


# --- bindings -----------------------------------------------------------------------------------


def _staged_rows(
    batch: Iterable[ImportedBinding],
    table: TableReport,
    peppers: tuple[str | None, str | None] | None,
) -> list[tuple[Any, ...]]:
    """The rows to stage: canonical, with a Matrix ID; with their hashes under ``peppers``
    (one per slot) when given."""
    rows: list[tuple[Any, ...]] = []
    pepper_0, pepper_1 = peppers or (None, None)
    for b in batch:
        address = canonical_address(b.medium, b.address)
        if address is None:
            table.skip("address not canonical")
            continue
        if user_id_server(b.mxid) is None:
            table.skip("not a Matrix user ID")
            continue
        row: tuple[Any, ...] = (
            b.medium,
            address,
            b.mxid,
            int(b.ts),
            int(b.not_before),
            int(b.not_after),
        )
        if peppers is not None:
            row += (
                lookup_hash(address, b.medium, pepper_0) if pepper_0 is not None else None,
                lookup_hash(address, b.medium, pepper_1) if pepper_1 is not None else None,
            )
        rows.append(row)
    return rows


def _hash_sql(postgres: bool, slot: int, pepper: str | None) -> str:
    """SQL for the lookup hash of the planned row ``p`` in hash slot ``slot``.

    On PostgreSQL the hashes are computed while staging: in this process, while the database
    works on the previous batch (hashing in SQL cost more: 1.7 µs a hash against 1.2 µs). On
    SQLite, whose writes share this process, only the rows written are hashed, by
    ``crypto.hashing.lookup_hash`` registered on the connection (its pepper parameter is
    ``$3`` or ``$4``); a slot without a pepper is NULL without a call."""
    if postgres:
        return f"p.{HASH_COLUMNS[slot]}"
    if pepper is None:
        return "NULL"
    return f"{_HASH_FUNCTION}(p.address, p.medium, ${slot + 3})"


_HASH_FUNCTION = "import_lookup_hash"


def _sqlite_lookup_hash(address: str, medium: str, pepper: str | None) -> str | None:
    return None if pepper is None else lookup_hash(address, medium, pepper)


def _newest_sql(columns: tuple[str, ...]) -> str:
    """Each staged address once: its newest association."""
    return (
        f"SELECT {', '.join(columns)} FROM (SELECT r.*, ROW_NUMBER() OVER ("
        "PARTITION BY medium, address ORDER BY created_ts DESC, mxid DESC) AS n"
        f" FROM {_STAGING} r) ranked WHERE n = 1"
    )


def _plan_sql(columns: tuple[str, ...], postgres: bool, tombstones: bool) -> str:
    """:func:`_newest_sql` and what the import does with each row: 0 insert, 1 update (ours is
    older), 2 nothing (ours is as new or newer), 3 nothing (an imported association of that 3PID,
    as new or newer, was unbound here: see ``unbound_imports``)."""
    unbound = join = ""
    if tombstones:
        digest = (
            "encode(sha256(convert_to(s.medium || ' ' || s.address, 'UTF8')), 'hex')"
            if postgres
            else f"{_DIGEST_FUNCTION}(s.medium, s.address)"
        )
        unbound = " WHEN b.medium IS NULL AND s.created_ts <= u.imported_ts THEN 3"
        join = f" LEFT JOIN unbound_imports u ON u.digest = {digest}"
    return (
        f"SELECT {', '.join(f's.{c}' for c in columns)}, CASE{unbound}"
        " WHEN b.medium IS NULL THEN 0"
        " WHEN b.created_ts < s.created_ts THEN 1 ELSE 2 END AS action"
        f" FROM ({_newest_sql(columns)}) s"
        " LEFT JOIN bindings b ON b.medium = s.medium AND b.address = s.address" + join
    )


_DIGEST_FUNCTION = "import_unbound_digest"


_PLANNED = "import_bindings_planned"
# Writing more rows than this (and at least half as many as the table holds) drops the
# secondary indexes of ``bindings`` and builds them again after: a sorted build costs a fraction
# of a million random insertions into each index (1M updates: 16 s instead of 24 s on SQLite).
_REBUILD_INDEXES_FROM = 100_000


async def _secondary_indexes(conn: Any, postgres: bool) -> list[tuple[str, str]]:
    """(name, CREATE statement) of the indexes of ``bindings`` that no constraint needs."""
    if postgres:
        rows = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
            " AND tablename = 'bindings' AND indexdef NOT LIKE 'CREATE UNIQUE%'"
        )
    else:
        rows = await conn.fetch(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'bindings'"
            " AND sql IS NOT NULL AND sql NOT LIKE 'CREATE UNIQUE%'"
        )
    return [(str(row[0]), str(row[1])) for row in rows]


async def _stage(
    conn: Any,
    source: ImportSource,
    table: TableReport,
    peppers: tuple[str | None, str | None] | None,
    say: Callable[[str], None],
) -> int:
    """Read the source's batches into the staging table; how many rows were staged.

    A batch is written while the next one is read (the database works in its own process or
    thread meanwhile)."""
    insert = f"INSERT INTO {_STAGING} VALUES ({', '.join('?' * len(_STAGING_COLUMNS))})"

    async def write(rows: list[tuple[Any, ...]]) -> None:
        if peppers is not None:  # PostgreSQL
            columns = _STAGING_COLUMNS + HASH_COLUMNS
            await conn.copy_records_to_table(_STAGING, records=rows, columns=columns)
        else:
            await conn.executemany(insert, rows)

    staged = 0
    next_progress = PROGRESS_EVERY
    writing: asyncio.Task[None] | None = None
    try:
        for batch in source.bindings():
            table.found += len(batch)
            rows = _staged_rows(batch, table, peppers)
            if writing is not None:
                await writing
                writing = None
            if rows:
                writing = asyncio.ensure_future(write(rows))
                await asyncio.sleep(0)  # let it start before the next batch is read
            staged += len(rows)
            if table.found >= next_progress:
                say(f"bindings: {table.found} of {source.binding_count} read")
                next_progress = (table.found // PROGRESS_EVERY + 1) * PROGRESS_EVERY
        if writing is not None:
            await writing
            writing = None
    finally:
        if writing is not None:  # the source failed: let the write end before rolling back
            with contextlib.suppress(Exception):
                await writing
    return staged


async def _import_bindings(
    db: AppDatabase,
    source: ImportSource,
    dry_run: bool,
    clock: Clock,
    report: ImportReport,
    progress: Callable[[str], None] | None,
) -> None:
    """Stage every binding, then merge them into ``bindings`` in one statement; one
    transaction."""
    table = report.table(BINDINGS)
    began = time.monotonic()

    def say(line: str) -> None:
        if progress is not None:
            progress(f"{line} ({time.monotonic() - began:.1f} s)")

    postgres = db.is_postgres
    try:
        async with db.transaction() as logged:
            # The driver's own connection (asyncpg, or mautrix's aiosqlite one): mautrix's
            # wrapper logs every statement over a second, whole, as a warning, and the big ones
            # here take seconds by design.
            conn: Any = logged.wrapped
            await ensure_pepper(ServerStateStore(db), PepperStore(db), clock)
            # Read in this transaction (PepperStore reads through SQLite's read-only connection,
            # which does not see a pepper made just now).
            row = await conn.fetchrow(
                "SELECT generation, pepper, since_ts, previous_pepper, grace_until_ts, next_pepper,"
                " rotation_started_ts, claimed_by, claimed_until FROM lookup_pepper WHERE id = 1"
            )
            assert row is not None
            pepper = PepperState(*(row[i] for i in range(9)))
            if postgres:
                # For this transaction: the sorts of a million rows and the index builds.
                await conn.execute("SET LOCAL work_mem = '128MB'")
                await conn.execute("SET LOCAL maintenance_work_mem = '256MB'")

            for temp in (_STAGING, _PLANNED):
                await conn.execute(f"DROP TABLE IF EXISTS {temp}")
            (pepper_0, pepper_1), generation = pepper.slot_peppers()
            columns = _STAGING_COLUMNS + (HASH_COLUMNS if postgres else ())
            column_types = (
                "medium TEXT, address TEXT, mxid TEXT, created_ts BIGINT, not_before BIGINT,"
                " not_after BIGINT"
            ) + (", lookup_hash TEXT, lookup_hash_1 TEXT" if postgres else "")
            on_commit = " ON COMMIT DROP" if postgres else ""
            await conn.execute(f"CREATE TEMPORARY TABLE {_STAGING} ({column_types}){on_commit}")
            peppers = (pepper_0, pepper_1) if postgres else None
            existing = int(await conn.fetchval("SELECT COUNT(*) FROM bindings"))
            tombstones = await conn.fetchval("SELECT 1 FROM unbound_imports LIMIT 1") is not None
            staged = await _stage(conn, source, table, peppers, say)
            if existing or tombstones:
                if tombstones and not postgres:
                    await conn.create_function(
                        _DIGEST_FUNCTION, 2, unbound_digest, deterministic=True
                    )
                plan = _plan_sql(columns, postgres, tombstones)
                await conn.execute(f"CREATE TEMPORARY TABLE {_PLANNED}{on_commit} AS {plan}")
                actions = {
                    int(r[0]): int(r[1])
                    for r in await conn.fetch(
                        f"SELECT action, COUNT(*) FROM {_PLANNED} GROUP BY action"
                    )
                }
                table.imported, table.updated = actions.get(0, 0), actions.get(1, 0)
                table.unchanged = actions.get(2, 0)
                table.skip("unbound here since an earlier import", actions.get(3, 0))
                writes = table.imported + table.updated
                planned = f"{_PLANNED} p WHERE p.action = 0"
                if table.found >= PROGRESS_EVERY:
                    say(f"bindings: compared, {writes} to write")
            else:
                # An empty table: every address is new, no plan to keep (a pass over a million
                # rows less).
                writes = staged
                planned = f"({_newest_sql(columns)}) p"
            if writes:
                rebuild = writes >= _REBUILD_INDEXES_FROM and writes * 2 >= existing
                indexes = await _secondary_indexes(conn, postgres) if rebuild else []
                for name, _ in indexes:
                    await conn.execute(f"DROP INDEX {name}")
                if writes >= PROGRESS_EVERY:
                    say(f"bindings: writing {writes if existing else 'all'} rows")
                if not postgres:
                    await conn.create_function(
                        _HASH_FUNCTION, 3, _sqlite_lookup_hash, deterministic=True
                    )
                hash_0 = _hash_sql(postgres, 0, pepper_0)
                hash_1 = _hash_sql(postgres, 1, pepper_1)
                params: list[Any] = [source.name, generation]
                if not postgres:  # the peppers, up to the last one used ($3, $4)
                    params += [pepper_0] if pepper_1 is None else [pepper_0, pepper_1]
                # No ON CONFLICT: the plan was made in this transaction, on a stopped server, so
                # its inserts conflict with nothing (a plain insert costs a third less).
                base = ", ".join(_STAGING_COLUMNS)
                await conn.execute(
                    f"INSERT INTO bindings ({base}, lookup_hash, lookup_hash_1, hash_gen,"
                    f" imported_from) SELECT {', '.join(f'p.{c}' for c in _STAGING_COLUMNS)},"
                    f" {hash_0}, {hash_1}, $2, $1 FROM {planned}",
                    *params,
                )
                if not existing:
                    table.imported = int(await conn.fetchval("SELECT COUNT(*) FROM bindings"))
                if table.updated:
                    await conn.execute(
                        "UPDATE bindings SET mxid = p.mxid, created_ts = p.created_ts,"
                        " not_before = p.not_before, not_after = p.not_after,"
                        f" lookup_hash = {hash_0},"
                        f" lookup_hash_1 = COALESCE({hash_1}, bindings.lookup_hash_1),"
                        f" hash_gen = $2, imported_from = $1 FROM {_PLANNED} p"
                        " WHERE p.action = 1 AND bindings.medium = p.medium"
                        " AND bindings.address = p.address",
                        *params,
                    )
                if indexes:
                    say(f"bindings: building {len(indexes)} indexes")
                for _, create in indexes:
                    await conn.execute(create)
                if writes >= PROGRESS_EVERY:
                    say("bindings: written, committing")
            table.skip(
                "older association of the same address",
                staged
                - table.imported
                - table.updated
                - table.unchanged
                - table.skipped.get("unbound here since an earlier import", 0),
            )
            if not postgres:
                for temp in (_STAGING, _PLANNED):
                    await conn.execute(f"DROP TABLE IF EXISTS {temp}")
            if dry_run:
                raise _Rollback
    except _Rollback:
        pass


# --- invites ------------------------------------------------------------------------------------


def _check_invite(invite: ImportedInvite) -> tuple[str | None, str]:
    """(the canonical address, "") or (None, why the invite cannot be imported)."""
    if invite.medium != "email":
        return None, f"medium {invite.medium} not supported"
    address = canonical_address(invite.medium, invite.address)
    if address is None:
        return None, "address not canonical"
    if not is_room_id(invite.room_id):
        return None, "not a room ID"
    if user_id_server(invite.sender) is None:
        return None, "sender not a Matrix user ID"
    if not is_opaque_id(invite.token):
        return None, "token not usable"
    return address, ""


def _ephemeral_pair(invite: ImportedInvite) -> tuple[str, str | None] | None:
    """The invite's (public key, private seed) normalised; None when they are unusable."""
    public = invite.ephemeral_public_key
    private = invite.ephemeral_private_key
    if private is not None:
        seed = normalise_public_key(private)  # the same rules: 32 bytes of base64
        if seed is None:
            return None
        derived_public = ed25519_public_key(decode_base64(seed))
        if public is not None and normalise_public_key(public) != derived_public:
            return None
        return derived_public, seed
    if public is None:
        return "", None
    normalised = normalise_public_key(public)
    return (normalised, None) if normalised is not None else None


async def _existing(
    conn: Any, db: AppDatabase, table: str, column: str, values: list[str]
) -> set[str]:
    """Those of ``values`` that ``table.column`` holds."""
    if not values:
        return set()
    query, params = db.select_by_keys(table, (column,), column, values)
    return {str(row[0]) for row in await conn.fetch(query, *params)}


async def _import_invites(
    db: AppDatabase,
    source: ImportSource,
    key_map: dict[str, str],
    config: InvitesConfig,
    dry_run: bool,
    now_ms: int,
    report: ImportReport,
) -> None:
    """Pending invites and the ephemeral keys, in one transaction: what is there already is
    read in one query per kind, the new rows written in one batch."""
    table = report.table(INVITES)
    keys_table = report.table(EPHEMERAL_KEYS)
    current_source_key = next((k.key_id for k in source.signing_keys if k.current), None)
    rows: dict[str, tuple[Any, ...]] = {}  # our id -> the row
    tokens: set[str] = set()
    for invite in source.invites:
        table.found += 1
        address, why = _check_invite(invite)
        if address is None:
            table.skip(why)
            continue
        pair = _ephemeral_pair(invite)
        if pair is None:
            table.skip("ephemeral key unusable")
            continue
        our_id = invite_id(source.name, invite.source_id)
        if invite.token in tokens or our_id in rows:
            table.skip("token given twice" if invite.token in tokens else "id given twice")
            continue
        tokens.add(invite.token)
        source_key = invite.signing_key_id or current_source_key
        details = {k: v for k, v in invite.details.items() if k in DETAIL_FIELDS and v}
        rows[our_id] = (
            our_id,
            invite.token,
            invite.medium,
            address,
            invite.room_id,
            invite.sender,
            invite.display_name
            or redact_address(address, config.redaction.local_chars, config.redaction.domain_chars),
            pair[0],
            json.dumps(details, sort_keys=True),
            int(invite.created_ts),
            PENDING,
            # A key of the source that was not imported is not ours, whatever its id: the
            # onbind is then signed with our current key.
            key_map.get(source_key) if source_key else None,
            pair[1],
            source.name,
        )
    keys: dict[str, int] = {}
    for key in source.ephemeral_keys:
        keys_table.found += 1
        public = normalise_public_key(key.public_key)
        if public is None:
            keys_table.skip("not an ed25519 public key")
        elif public in keys:
            keys_table.skip("given twice")
        else:
            keys[public] = int(key.created_ts)
    new: list[tuple[Any, ...]] = []
    bound = 0
    try:
        async with db.transaction() as conn:
            ours = await _existing(conn, db, "invites", "id", list(rows))
            taken = await _existing(conn, db, "invites", "token", sorted(tokens))
            for our_id, row in rows.items():
                if our_id in ours:
                    table.unchanged += 1
                elif row[1] in taken:
                    table.skip("token already used by another invite here")
                else:
                    new.append(row)
            if new:
                await conn.executemany(
                    "INSERT INTO invites (id, token, medium, address, room_id, sender,"
                    " display_name, ephemeral_public_key, details, created_ts, state,"
                    " signing_key_id, ephemeral_private_key, imported_from)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                    new,
                )
                clause, params = db.in_list("i.id", [row[0] for row in new])
                bound = int(
                    await conn.fetchval(
                        "SELECT COUNT(*) FROM invites i JOIN bindings b"
                        f" ON b.medium = i.medium AND b.address = i.address WHERE {clause}",
                        *params,
                    )
                )
            table.imported = len(new)
            known = await _existing(conn, db, "imported_ephemeral_keys", "public_key", list(keys))
            fresh_keys = [(k, source.name, ts) for k, ts in keys.items() if k not in known]
            if fresh_keys:
                await conn.executemany(
                    "INSERT INTO imported_ephemeral_keys (public_key, imported_from, created_ts)"
                    " VALUES ($1, $2, $3)",
                    fresh_keys,
                )
            keys_table.imported = len(fresh_keys)
            keys_table.unchanged = len(keys) - len(fresh_keys)
            if dry_run:
                raise _Rollback
    except _Rollback:
        pass
    keyless = sum(1 for row in new if row[11] is None and row[12] is None)
    if keyless:
        report.notes.append(
            f"{keyless} imported invites have neither {source.name}'s signing key nor an "
            "ephemeral private key: their onbind is signed with this server's key, which their "
            "room does not list, so the invitee's homeserver will refuse it"
        )
    after_ms = config.expiration.after * 1000
    expired = sum(1 for row in new if now_ms - row[9] > after_ms)
    if expired and config.expiration.enabled:
        report.notes.append(
            f"{expired} imported invites are older than invites.expiration.after"
            f" ({config.expiration.after:g} s): the server withdraws them when it starts"
        )
    if bound:
        report.notes.append(
            f"{bound} imported invites are for addresses bound already: the server delivers "
            "them when it starts"
        )
