"""Reading an ma1sd / mxisd deployment: its pending 3PID invites and its signing keys.

Facts about ma1sd's data (its storage layout and key store), not its code. The layout read here
is the one of mxisd 1.4.0 and later and of every ma1sd release (1.x and 2.x, up to 2.5): a
store in SQLite, or in PostgreSQL from ma1sd 2.3.0 (``storage.backend: postgresql``). The
single-file key store of mxisd before 1.4.0 is read too (its one key becomes ``ed25519:0``).

- The store's tables are made by ORMLite, with camelCase column names (quoted, so case-sensitive
  on PostgreSQL). Pending invites are the rows of ``invite_3pid`` (``id``, ``token``, ``sender``,
  ``medium``, ``address``, ``roomId``, ``properties``); ``properties`` is a JSON map of strings:
  the whole store-invite request (``room_name``, ``sender_display_name``, ...) plus
  ``created_at`` (ms, as a string), ``p_key_algo``/``p_key_serial``/``p_key_public`` (the
  long-term key the invite was stored under) and ``e_key_algo``/``e_key_serial``/
  ``e_key_public`` (the invite's ephemeral key). Resolved invites were moved to
  ``invite_3pid_history``: they are counted, not imported.
- ma1sd kept no 3PID bindings: its lookups came from its identity stores.
- ``key.path`` is a directory: ``current`` (JSON ``{"type": "Regular", "algo": "ed25519",
  "serial": ...}``) names the signing key; ``regular/ed25519/<serial>`` and
  ``ephemeral/ed25519/<serial>`` are JSON ``{"version", "is_valid", "key"}`` with ``key`` the
  base64 32-byte ed25519 seed. A key's id is ``ed25519:<serial>``.

An invite without ``created_at`` (stored before mxisd 1.4.0) was counted by ma1sd from its own
start; here it is counted from the import, so its expiry restarts at the switch.

ma1sd's ``isvalid`` answered by a key's presence in the store, whatever ``is_valid`` said; here a
key marked invalid is imported revoked (it was disabled there on purpose), and the ephemeral keys
of resolved invites are not imported (their invites are done).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from unpaddedbase64 import encode_base64

from appservice.importers.model import (
    ImportedBinding,
    ImportedInvite,
    ImportedSigningKey,
    ImportFailed,
    ImportSource,
    ed25519_public_key,
)
from appservice.services.invites import DETAIL_FIELDS

INVITES = "invite_3pid"
HISTORY = "invite_3pid_history"
# The columns of an invite row, lower-cased: PostgreSQL copies made without quoted identifiers
# (pgloader's default) fold ``roomId`` to ``roomid``.
_INVITE_COLUMNS = ("id", "token", "sender", "medium", "address", "roomid")
IDENTITY_STORE_NOTE = (
    "ma1sd kept no bindings of its own (its lookups came from its identity stores): "
    "configure the matching identity store here, see docs/identity-stores.md"
)


class Ma1sdImportError(ImportFailed):
    """An ma1sd file that cannot be read; the message is one line."""


@dataclass(frozen=True)
class StoredKey:
    """One key file of ma1sd's key store."""

    serial: str
    seed: bytes
    valid: bool

    @property
    def public_key(self) -> str:
        """Its unpadded base64 ed25519 public key."""
        return ed25519_public_key(self.seed)


@dataclass(frozen=True)
class KeyStore:
    """ma1sd's ``key.path``: its regular keys, the current one's serial, its ephemeral keys."""

    current: str
    regular: dict[str, StoredKey]
    ephemeral: dict[str, StoredKey]


@dataclass(frozen=True)
class _Tables:
    invites: list[dict[str, Any]]  # column names lower-cased
    history_count: int


async def read_ma1sd(db: str, key_dir: Path | None) -> ImportSource:
    """Everything to import from the ma1sd store ``db`` (an SQLite path or a ``postgresql://``
    URL) and its key store ``key_dir`` (``key.path``; without it no key is imported).

    Only reads. Raises :class:`ImportFailed` with one line for a store or key file that is not
    ma1sd's.
    """
    if db.startswith(("postgres://", "postgresql://")):
        tables = await _read_postgres(db)
    else:
        tables = await asyncio.to_thread(_read_sqlite, Path(db.removeprefix("sqlite:")))
    keys = await asyncio.to_thread(read_key_store, key_dir) if key_dir is not None else None
    now_ms = int(time.time() * 1000)
    invites: list[ImportedInvite] = []
    skipped: dict[str, int] = {}
    if tables.history_count:
        skipped["resolved invites"] = tables.history_count
    notes = [IDENTITY_STORE_NOTE]
    missing_ephemeral = 0
    used_ephemeral: set[str] = set()
    for row in tables.invites:
        invite, e_serial = _invite(row, now_ms)
        if keys is not None and e_serial is not None:
            stored = keys.ephemeral.get(e_serial)
            if stored is None:
                missing_ephemeral += 1
            elif not stored.valid:
                # ma1sd revoked it: the room's copy of it no longer answers valid.
                invite = _replace_ephemeral(invite, None, None)
                skipped["revoked ephemeral keys"] = skipped.get("revoked ephemeral keys", 0) + 1
            else:
                if invite.ephemeral_public_key not in (None, stored.public_key):
                    raise Ma1sdImportError(
                        f"{INVITES} row {row['id']}: e_key_public does not match the key file "
                        f"ephemeral/ed25519/{e_serial}"
                    )
                invite = _replace_ephemeral(invite, stored.public_key, encode_base64(stored.seed))
                used_ephemeral.add(e_serial)
        invites.append(invite)
    signing_keys: list[ImportedSigningKey] = []
    if keys is None:
        notes.append(
            "no key store given (--keys, ma1sd's key.path): its signing keys were not imported, "
            "so invites already in rooms cannot complete through this server"
        )
    else:
        signing_keys = [
            ImportedSigningKey(
                key_id=f"ed25519:{k.serial}",
                seed=k.seed,
                current=k.serial == keys.current,
                valid=k.valid,
            )
            for k in sorted(keys.regular.values(), key=lambda k: k.serial)
        ]
        unused = len(set(keys.ephemeral) - used_ephemeral)
        if unused:
            skipped["ephemeral keys of resolved invites"] = unused
        if missing_ephemeral:
            notes.append(
                f"{missing_ephemeral} pending invites name an ephemeral key missing from the "
                "key store: their public key still answers valid, onbinds are signed with the "
                "long-term key only"
            )
        regular_ids = {k.key_id for k in signing_keys}
        unknown = sorted({i.signing_key_id for i in invites if i.signing_key_id} - regular_ids)
        if unknown:
            notes.append(
                "pending invites name signing keys missing from the key store: "
                + ", ".join(unknown)
            )
    return ImportSource(
        name="ma1sd",
        binding_count=0,
        bindings=_no_bindings,
        invites=invites,
        signing_keys=signing_keys,
        ephemeral_keys=[],
        skipped=skipped,
        notes=notes,
    )


def _no_bindings() -> Iterator[list[ImportedBinding]]:
    return iter(())


def _replace_ephemeral(
    invite: ImportedInvite, public_key: str | None, private_key: str | None
) -> ImportedInvite:
    return replace(invite, ephemeral_public_key=public_key, ephemeral_private_key=private_key)


def _invite(row: Mapping[str, Any], now_ms: int) -> tuple[ImportedInvite, str | None]:
    """The invite of one ``invite_3pid`` row, and the serial of its ephemeral key."""
    for column in _INVITE_COLUMNS:
        if not isinstance(row.get(column), str) or not row[column]:
            raise Ma1sdImportError(
                f"{INVITES} row {row.get('id')!r}: {column} is missing: not an ma1sd store"
            )
    props = _properties(row)
    created = props.get("created_at", "")
    created_ts = int(created) if created.isdigit() else now_ms
    signing_key_id = None
    if props.get("p_key_serial") and props.get("p_key_algo", "ed25519") == "ed25519":
        signing_key_id = f"ed25519:{props['p_key_serial']}"
    e_serial = None
    if props.get("e_key_serial") and props.get("e_key_algo", "ed25519") == "ed25519":
        e_serial = props["e_key_serial"]
    address: str = row["address"]
    invite = ImportedInvite(
        source_id=row["id"],
        token=row["token"],
        medium=row["medium"],
        address=address,
        room_id=row["roomid"],
        sender=row["sender"],
        created_ts=created_ts,
        # What ma1sd answered store-invite with, so what the room shows.
        display_name=address[:3] + "...",
        ephemeral_public_key=props.get("e_key_public") or None,
        signing_key_id=signing_key_id,
        details={k: props[k] for k in DETAIL_FIELDS if props.get(k)},
    )
    return invite, e_serial


def _properties(row: Mapping[str, Any]) -> dict[str, str]:
    raw = row.get("properties")
    if raw is None or not str(raw).strip():
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(v, str | int | bool) or v is None for v in value.values()
    ):
        raise Ma1sdImportError(
            f"{INVITES} row {row['id']!r}: properties is not a JSON map of strings"
        )
    return {str(k): str(v) for k, v in value.items() if v is not None}


def _read_sqlite(path: Path) -> _Tables:
    if not path.is_file():
        raise Ma1sdImportError(f"{path}: no such ma1sd store (storage.provider.sqlite.database)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise Ma1sdImportError(f"{path}: cannot open the ma1sd store ({exc})") from exc
    try:
        tables = {
            name.lower()
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if INVITES not in tables:
            raise Ma1sdImportError(f"{path}: no {INVITES} table: not an ma1sd/mxisd store")
        cursor = conn.execute(f"SELECT * FROM {INVITES}")
        columns = [d[0].lower() for d in cursor.description]
        rows = [dict(zip(columns, r, strict=True)) for r in cursor]
        history = 0
        if HISTORY in tables:
            history = conn.execute(f"SELECT count(*) FROM {HISTORY}").fetchone()[0]
    except sqlite3.Error as exc:
        raise Ma1sdImportError(f"{path}: not an ma1sd store ({exc})") from exc
    finally:
        conn.close()
    return _Tables(rows, int(history))


async def _read_postgres(url: str) -> _Tables:
    where = _safe_location(url)
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, ValueError) as exc:
        raise Ma1sdImportError(f"{where}: cannot connect to the ma1sd store ({exc})") from exc
    try:
        async with conn.transaction(readonly=True):
            names = {
                r["name"].lower()
                for r in await conn.fetch(
                    "SELECT table_name AS name FROM information_schema.tables"
                    " WHERE table_schema = ANY(current_schemas(false))"
                )
            }
            if INVITES not in names:
                raise Ma1sdImportError(f"{where}: no {INVITES} table: not an ma1sd store")
            rows = [
                {k.lower(): v for k, v in r.items()}
                for r in await conn.fetch(f"SELECT * FROM {INVITES}")
            ]
            history = 0
            if HISTORY in names:
                history = await conn.fetchval(f"SELECT count(*) FROM {HISTORY}")
    except asyncpg.PostgresError as exc:
        raise Ma1sdImportError(f"{where}: not an ma1sd store ({exc})") from exc
    finally:
        await conn.close()
    return _Tables(rows, int(history))


def _safe_location(url: str) -> str:
    """The URL's host, port and database, for messages: never its user, password or query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the ma1sd PostgreSQL URL"
    return f"postgresql://{host}{port}{parts.path}"


def read_key_store(key_dir: Path) -> KeyStore:
    """ma1sd's key store at ``key_dir`` (its ``key.path``)."""
    if key_dir.is_file():
        # mxisd before 1.4.0: the file is the base64 seed of its one key.
        seed = _seed(key_dir.read_text(errors="replace").strip(), key_dir)
        return KeyStore(current="0", regular={"0": StoredKey("0", seed, True)}, ephemeral={})
    if not key_dir.is_dir():
        raise Ma1sdImportError(f"{key_dir}: no ma1sd key store there (key.path)")
    regular = _key_files(key_dir / "regular" / "ed25519")
    ephemeral = _key_files(key_dir / "ephemeral" / "ed25519")
    current_file = key_dir / "current"
    if current_file.is_file():
        current = _current_serial(current_file)
    elif len(regular) == 1:
        current = next(iter(regular))
    else:
        raise Ma1sdImportError(f"{current_file}: missing, so which key signs is unknown")
    if current not in regular:
        raise Ma1sdImportError(f"{current_file}: names ed25519:{current}, which has no key file")
    return KeyStore(current=current, regular=regular, ephemeral=ephemeral)


def _current_serial(path: Path) -> str:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise Ma1sdImportError(f"{path}: not ma1sd's current-key JSON") from exc
    if (
        not isinstance(value, dict)
        or str(value.get("type", "")).lower() != "regular"
        or value.get("algo") != "ed25519"
        or not isinstance(value.get("serial"), str)
        or not value["serial"]
    ):
        raise Ma1sdImportError(
            f'{path}: not {{"type": "Regular", "algo": "ed25519", "serial": ...}}'
        )
    serial: str = value["serial"]
    return serial


def _key_files(directory: Path) -> dict[str, StoredKey]:
    if not directory.exists():
        return {}
    if not directory.is_dir():
        raise Ma1sdImportError(f"{directory}: not a directory of ma1sd key files")
    keys: dict[str, StoredKey] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            value = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise Ma1sdImportError(f"{path}: not an ma1sd key file (JSON)") from exc
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("key"), str)
            or not isinstance(value.get("is_valid"), bool)
        ):
            raise Ma1sdImportError(f"{path}: not an ma1sd key file ({{version, is_valid, key}})")
        keys[path.name] = StoredKey(path.name, _seed(value["key"], path), value["is_valid"])
    return keys


def _seed(text: str, path: Path) -> bytes:
    try:
        seed = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Ma1sdImportError(f"{path}: the key is not base64") from exc
    if len(seed) != 32:
        raise Ma1sdImportError(f"{path}: the key is not a 32-byte ed25519 seed")
    return seed
