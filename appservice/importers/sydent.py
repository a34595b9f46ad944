"""Reading a sydent deployment: its signing key and its 3PID associations.

Facts about sydent's data (its configuration and SQLite schema), not its code:
the signing key is ``[crypto] ed25519.signingkey = "ed25519 <version> <base64 seed>"``
and associations live in ``global_threepid_associations`` and
``local_threepid_associations`` (medium, address, mxid, ts, not_before, not_after).
"""

from __future__ import annotations

import base64
import configparser
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

from appservice.importers.model import ImportFailed


class SydentImportError(ImportFailed):
    """A sydent file that cannot be read; the message is one line."""


@dataclass(frozen=True)
class SydentKey:
    key_id: str
    seed: bytes

    @property
    def public_key_base64(self) -> str:
        verify = nacl.signing.SigningKey(self.seed).verify_key
        return base64.b64encode(bytes(verify)).decode().rstrip("=")


@dataclass(frozen=True)
class Association:
    medium: str
    address: str
    mxid: str
    ts: int


def parse_signing_key(value: str) -> SydentKey:
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
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(config_path.read_text())
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise SydentImportError(f"{config_path}: not a sydent configuration") from exc
    value = parser.get("crypto", "ed25519.signingkey", fallback=None)
    if not value:
        raise SydentImportError(f"{config_path}: no [crypto] ed25519.signingkey")
    return parse_signing_key(value)


def read_associations(db_path: Path) -> list[Association]:
    """Every (medium, address) with its newest mxid across both tables."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise SydentImportError(f"{db_path}: cannot open the sydent database") from exc
    newest: dict[tuple[str, str], Association] = {}
    try:
        for table in ("local_threepid_associations", "global_threepid_associations"):
            rows = conn.execute(f"SELECT medium, address, mxid, ts FROM {table}")
            for medium, address, mxid, ts in rows:
                key = (medium, address)
                old = newest.get(key)
                if old is None or int(ts) >= old.ts:
                    newest[key] = Association(medium, address, mxid, int(ts))
    except sqlite3.Error as exc:
        raise SydentImportError(f"{db_path}: not a sydent database ({exc})") from exc
    finally:
        conn.close()
    return sorted(newest.values(), key=lambda a: (a.medium, a.address))
