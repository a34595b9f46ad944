"""Reading a sydent deployment: its 3PID associations, pending invites and signing key.

Facts about sydent's data (its configuration and SQLite schema), not its code. The layout read
here is the one of every sydent 2.x release (2.0.0 up to 2.6.1) and of the 1.x releases before
them: ``PRAGMA user_version`` 0 to 5 of sydent's own migrations. Version by version:

- v0 (the original schema files): ``local_threepid_associations`` and
  ``global_threepid_associations`` with ``medium, address, mxid, ts, notBefore, notAfter``
  (camelCase), the global table adding ``originServer, originId, sgAssoc``; ``invite_tokens``
  (``id, medium, address, room_id, sender, token, received_ts, sent_ts``) and
  ``ephemeral_public_keys`` (``id, public_key, verify_count, persistence_ts``).
- v1: the local table's ``mxid``, ``ts``, ``notBefore``, ``notAfter`` become nullable: an
  unbind replaces the local row by one with ``mxid`` NULL (and a fresh ``ts``); the matching
  global row (the copy a server keeps of its own and its peers' associations) is deleted.
- v3: a ``lookup_hash`` column on both association tables and ``hashing_metadata`` (the
  pepper). Not read: our hashes are recomputed under our pepper. v2, v4 (accounts, terms) and
  v5 (an index) change nothing read here.

``received_ts`` and ``persistence_ts`` are in seconds (``ts``, ``notBefore``, ``notAfter`` in
ms); a value that is already in ms is taken as it is. Older sydent releases stored email
addresses as given (case-folding, and a script folding stored rows, came later), so
associations are grouped by lower-cased email address, the newest row of a group winning.
``not_before``/``not_after`` spelt with an underscore are read too.

The signing key comes from ``sydent.conf``: ``[crypto] ed25519.signingkey =
"ed25519 <version> <base64 seed>"``, its key id ``ed25519:<version>``.

Without the configuration no signing key is imported. When sydent still holds pending invites
that is refused: each of those invites sits in a room listing sydent's public key, and the
invitee's homeserver checks the signature we later make with it, so importing them without the
key would leave invites that look fine here and can never complete.
"""

from __future__ import annotations

import base64
import configparser
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from appservice.importers.model import (
    ImportedBinding,
    ImportedEphemeralKey,
    ImportedInvite,
    ImportedSigningKey,
    ImportFailed,
    ImportSource,
    ed25519_public_key,
)

BATCH_SIZE = 10_000
LOCAL = "local_threepid_associations"
GLOBAL = "global_threepid_associations"
INVITES = "invite_tokens"
EPHEMERAL = "ephemeral_public_keys"
_TABLES = (LOCAL, GLOBAL, INVITES, EPHEMERAL)
_ASSOCIATION_COLUMNS = ("medium", "address", "mxid", "ts")
_INVITE_COLUMNS = ("id", "medium", "address", "room_id", "sender", "token", "sent_ts")
# Below this a timestamp is in seconds (1e11 ms is 1973; 1e11 s is the year 5138).
_SECONDS_BELOW = 100_000_000_000

SKIPPED_EXPIRED = "expired bindings"
SKIPPED_UNBOUND = "unbound 3PIDs"
SKIPPED_DELIVERED = "delivered invites"


class SydentImportError(ImportFailed):
    """A sydent file that cannot be read; the message is one line."""

    def __init__(self, message: str) -> None:
        # SQLite's own messages (quick_check's report) can span lines.
        super().__init__(" ".join(message.split()))


@dataclass(frozen=True)
class SydentKey:
    """sydent's long-term signing key."""

    key_id: str
    seed: bytes

    @property
    def public_key_base64(self) -> str:
        """Its unpadded base64 ed25519 public key."""
        return ed25519_public_key(self.seed)


def parse_signing_key(value: str) -> SydentKey:
    """The key of an ``ed25519.signingkey`` value."""
    parts = value.strip().strip('"').split()
    if len(parts) != 3 or parts[0] != "ed25519":
        raise SydentImportError("ed25519.signingkey is not 'ed25519 <version> <base64 seed>'")
    try:
        seed = base64.b64decode(parts[2] + "=" * (-len(parts[2]) % 4), validate=True)
    except ValueError as exc:
        raise SydentImportError("ed25519.signingkey: the seed is not base64") from exc
    if len(seed) != 32:
        raise SydentImportError("ed25519.signingkey: the seed is not 32 bytes")
    return SydentKey(key_id=f"ed25519:{parts[1]}", seed=seed)


def read_signing_key(config_path: Path) -> SydentKey:
    """The signing key in sydent's configuration file."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(config_path.read_text())
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise SydentImportError(f"{config_path}: not a sydent configuration") from exc
    value = parser.get("crypto", "ed25519.signingkey", fallback=None)
    if not value:
        raise SydentImportError(f"{config_path}: no [crypto] ed25519.signingkey")
    return parse_signing_key(value)


def read_sydent(db_path: Path, config_path: Path | None) -> ImportSource:
    """Everything to import from sydent's SQLite database and (optionally) its configuration.

    Only reads. The bindings are read again, in batches, each time ``bindings()`` is called.
    Raises :class:`ImportFailed` with one line for a file that is not a readable sydent
    database or configuration, and when there are pending invites but no configuration.
    """
    key = read_signing_key(config_path) if config_path is not None else None
    now_ms = int(time.time() * 1000)
    newest = _Newest(db_path, now_ms)
    with _connect(db_path) as conn:
        columns = _check_schema(conn, db_path)
        newest.columns = columns
        invites, delivered = _read_invites(conn, db_path, columns[INVITES], key, now_ms)
        ephemeral = _read_ephemeral_keys(conn, db_path)
    notes: list[str] = []
    if key is None:
        if invites:
            raise SydentImportError(
                f"sydent holds {len(invites)} pending invites, which need its signing key: "
                "give its configuration (--sydent-config)"
            )
        notes.append(
            "sydent's signing key was not imported (no --sydent-config): "
            "this server signs with its own key"
        )
    # Every association is read (and grouped) here, before anything is written: a damaged
    # table fails now.
    bound, expired, unbound = newest.prepare()
    return ImportSource(
        name="sydent",
        binding_count=bound,
        bindings=newest.batches,
        invites=invites,
        signing_keys=[]
        if key is None
        else [ImportedSigningKey(key_id=key.key_id, seed=key.seed, current=True)],
        ephemeral_keys=ephemeral,
        skipped={
            SKIPPED_EXPIRED: expired,
            SKIPPED_UNBOUND: unbound,
            SKIPPED_DELIVERED: delivered,
        },
        notes=notes,
    )


def _open(db_path: Path) -> sqlite3.Connection:
    if not db_path.is_file():
        raise SydentImportError(f"{db_path}: no such file")
    try:
        return sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise SydentImportError(f"{db_path}: cannot open it: {exc}") from exc


def _read_error(db_path: Path, what: str, exc: sqlite3.Error) -> SydentImportError:
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_NOTADB":
        return SydentImportError(f"{db_path}: not an SQLite database ({exc})")
    if name == "SQLITE_CORRUPT":
        return SydentImportError(f"{db_path}: the database is damaged ({exc})")
    return SydentImportError(f"{db_path}: cannot read {what}: {exc}")


def _connect(db_path: Path) -> closing[sqlite3.Connection]:
    return closing(_open(db_path))


def _check_schema(conn: sqlite3.Connection, db_path: Path) -> dict[str, dict[str, str]]:
    """The columns of sydent's tables (lower-cased name -> name as spelt), once the file is
    known to be an intact sydent database."""
    try:
        names = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        present = [table for table in _TABLES if table in names]
        if not present:
            raise SydentImportError(f"{db_path}: not a sydent database (none of its tables)")
        if len(present) < len(_TABLES):
            missing = ", ".join(table for table in _TABLES if table not in names)
            raise SydentImportError(f"{db_path}: not a complete sydent database (no {missing})")
        columns = {
            table: {row[1].lower(): row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            for table in _TABLES
        }
    except sqlite3.Error as exc:
        raise _read_error(db_path, "its tables", exc) from exc
    for table in (LOCAL, GLOBAL):
        needed = [*_ASSOCIATION_COLUMNS, "notbefore|not_before", "notafter|not_after"]
        for column in needed:
            if not any(name in columns[table] for name in column.split("|")):
                raise SydentImportError(f"{db_path}: {table} has no {column.split('|')[0]} column")
    for column in _INVITE_COLUMNS:
        if column not in columns[INVITES]:
            raise SydentImportError(f"{db_path}: {INVITES} has no {column} column")
    return columns


class _Newest:
    """Per 3PID, the newest row of both association tables, grouped once by SQLite into a
    temporary table of a connection that ``batches()`` then reads (and closes).

    One grouping pass of two million rows costs a few seconds; the temporary table saves a
    second one (the counts are needed before the first batch).
    """

    def __init__(self, db_path: Path, now_ms: int) -> None:
        self.db_path = db_path
        self.now_ms = int(now_ms)
        self.columns: dict[str, dict[str, str]] = {}
        self._prepared: sqlite3.Connection | None = None

    def _grouping(self) -> str:
        selects = []
        for source, table in enumerate((LOCAL, GLOBAL)):
            spelt = self.columns[table]
            not_before = spelt.get("notbefore") or spelt["not_before"]
            not_after = spelt.get("notafter") or spelt["not_after"]
            selects.append(
                f"SELECT {source} AS source, medium, address, mxid, ts,"
                f' "{not_before}" AS not_before, "{not_after}" AS not_after FROM {table}'
            )
        # SQLite takes the bare columns of an aggregate query from the row holding the max().
        # On equal ts the local row wins: an unbind is written there only.
        return (
            "CREATE TEMP TABLE newest AS"
            " SELECT medium, address, mxid, coalesce(ts, 0) AS ts,"
            " coalesce(not_before, 0) AS not_before, not_after FROM ("
            "  SELECT *, max(coalesce(ts, 0) * 2 + (source = 0))"
            f"  FROM ({' UNION ALL '.join(selects)})"
            "  GROUP BY medium, CASE WHEN medium = 'email' THEN lower(address) ELSE address END)"
        )

    def _grouped(self) -> sqlite3.Connection:
        conn = _open(self.db_path)
        try:
            conn.execute(self._grouping())
        except sqlite3.Error as exc:
            conn.close()
            raise self._failed(exc) from exc
        return conn

    def _failed(self, exc: sqlite3.Error) -> SydentImportError:
        return _read_error(self.db_path, "sydent's associations", exc)

    def prepare(self) -> tuple[int, int, int]:
        """Group the associations; returns how many are bound, expired, unbound."""
        conn = self._grouped()
        now = self.now_ms
        try:
            counts = conn.execute(
                "SELECT"
                f" coalesce(sum(mxid IS NOT NULL AND not_after >= {now}), 0),"
                f" coalesce(sum(mxid IS NOT NULL AND (not_after IS NULL OR not_after < {now})), 0),"
                " coalesce(sum(mxid IS NULL), 0)"
                " FROM temp.newest"
            ).fetchone()
        except sqlite3.Error as exc:
            conn.close()
            raise self._failed(exc) from exc
        self._prepared = conn
        bound, expired, unbound = counts
        return int(bound), int(expired), int(unbound)

    def batches(self) -> Iterator[list[ImportedBinding]]:
        """The bound, unexpired associations in batches of ``BATCH_SIZE``."""
        conn, self._prepared = self._prepared or self._grouped(), None
        try:
            cursor = conn.execute(
                "SELECT medium, address, mxid, ts, not_before, not_after FROM temp.newest"
                f" WHERE mxid IS NOT NULL AND not_after >= {self.now_ms}"
            )
            while rows := cursor.fetchmany(BATCH_SIZE):
                yield list(map(ImportedBinding._make, rows))
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc
        finally:
            conn.close()


def _ms(ts: int | None, default: int) -> int:
    if ts is None:
        return default
    return int(ts) * 1000 if int(ts) < _SECONDS_BELOW else int(ts)


def _read_invites(
    conn: sqlite3.Connection,
    db_path: Path,
    columns: dict[str, str],
    key: SydentKey | None,
    now_ms: int,
) -> tuple[list[ImportedInvite], int]:
    """The pending invites, and how many were delivered already."""
    received = "received_ts" if "received_ts" in columns else "NULL"
    try:
        (delivered,) = conn.execute(
            f"SELECT count(*) FROM {INVITES} WHERE sent_ts IS NOT NULL"
        ).fetchone()
        rows = conn.execute(
            f"SELECT id, medium, address, room_id, sender, token, {received} FROM {INVITES}"
            " WHERE sent_ts IS NULL ORDER BY id"
        ).fetchall()
    except sqlite3.Error as exc:
        raise _read_error(db_path, "sydent's invites", exc) from exc
    invites = [
        ImportedInvite(
            source_id=str(row_id),
            token=str(token),
            medium=str(medium),
            address=str(address),
            room_id=str(room_id),
            sender=str(sender),
            created_ts=_ms(received_ts, now_ms),
            signing_key_id=key.key_id if key is not None else None,
        )
        for row_id, medium, address, room_id, sender, token, received_ts in rows
    ]
    return invites, int(delivered)


def _read_ephemeral_keys(conn: sqlite3.Connection, db_path: Path) -> list[ImportedEphemeralKey]:
    try:
        rows = conn.execute(
            f"SELECT public_key, persistence_ts FROM {EPHEMERAL} ORDER BY id"
        ).fetchall()
    except sqlite3.Error as exc:
        raise _read_error(db_path, "sydent's ephemeral keys", exc) from exc
    now_ms = int(time.time() * 1000)
    return [
        ImportedEphemeralKey(public_key=str(public_key).rstrip("="), created_ts=_ms(ts, now_ms))
        for public_key, ts in rows
    ]
