"""The long-term ed25519 signing keys of this server (signedjson key file format).

The key file holds one key per line (``ed25519 <version> <seed>``); the first line is the current
key, later lines are earlier keys kept after ``keys rotate``: an invite's onbind is signed with the
key its store-invite answered with.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import signedjson.key
import signedjson.sign
from unpaddedbase64 import encode_base64


class KeyFileError(Exception):
    """The signing key file cannot be read or written."""


@dataclass(frozen=True)
class PublicKey:
    """A key id and its unpadded base64 public key."""

    key_id: str
    public_key: str


def _contains_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_contains_float(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_contains_float(v) for v in value)
    return False


class KeyRing:
    """The signing keys read from the key file; signs with the current one."""

    def __init__(self, path: Path, keys: list[Any]) -> None:
        if not keys:
            raise KeyFileError(f"keys: {path} holds no signing key")
        self.path = path
        self._keys = keys

    @classmethod
    def load_or_create(cls, path: Path) -> KeyRing:
        """Read the key file, creating it (mode 0600) with a fresh key ``ed25519:0`` if missing."""
        if not path.exists():
            _write_keys(path, [signedjson.key.generate_signing_key("0")])
        try:
            with path.open(encoding="utf-8") as f:
                keys = signedjson.key.read_signing_keys(f)
        except (OSError, ValueError) as e:
            raise KeyFileError(f"keys: cannot read signing key file {path}: {e}") from e
        return cls(path, list(keys))

    @property
    def current(self) -> PublicKey:
        """The key used for new signatures."""
        return _public(self._keys[0])

    def sign(
        self, obj: dict[str, Any], server_name: str, key_id: str | None = None
    ) -> dict[str, Any]:
        """A signed copy of ``obj`` (Matrix "Signing JSON"); floats are refused.

        Signed with the key ``key_id`` while the key file holds it, else with the current key.
        """
        if _contains_float(obj):
            raise ValueError("signed JSON must not contain floats")
        key = next((k for k in self._keys if _key_id(k) == key_id), self._keys[0])
        signed: dict[str, Any] = signedjson.sign.sign_json(copy.deepcopy(obj), server_name, key)
        return signed

    def rotate(self) -> PublicKey:
        """Make a new current key (next integer version), keeping the old ones in the file: they
        still sign the onbind notifications of invites stored under them."""
        versions = [int(k.version) for k in self._keys if str(k.version).isdigit()]
        new_key = signedjson.key.generate_signing_key(str(max(versions, default=-1) + 1))
        self._keys = [new_key, *self._keys]
        _write_keys(self.path, self._keys)
        return _public(new_key)


def _key_id(key: Any) -> str:
    return f"{key.alg}:{key.version}"


def _public(key: Any) -> PublicKey:
    return PublicKey(_key_id(key), encode_base64(key.verify_key.encode()))


def _write_keys(path: Path, keys: list[Any]) -> None:
    """Write the key file atomically, readable only by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            signedjson.key.write_signing_keys(f, keys)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as e:
        raise KeyFileError(f"keys: cannot write signing key file {path}: {e.strerror}") from e
