"""The long-term ed25519 signing keys of this server (signedjson key file format).

The key file holds one key per line (``ed25519 <version> <seed>``); the first line is the current
key, later lines are earlier keys kept after ``keys rotate``: an invite's onbind is signed with the
key its store-invite answered with.
"""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import signedjson.key
import signedjson.sign
from unpaddedbase64 import encode_base64

from appservice.private_files import make_private_dirs


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
    """The signing keys of the key file; signs with the current one.

    Made empty and filled by :meth:`load` (or :meth:`create`), so that the caller decides
    whether a missing file may be created: :class:`~appservice.services.keys.KeyService` first
    asks the database whether this deployment already published keys.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: list[Any] = []

    @classmethod
    def load_or_create(cls, path: Path) -> KeyRing:
        """Read the key file, creating it (mode 0600) with a fresh key ``ed25519:0`` if missing.

        Safe when several processes start at once: one creates the file, the others read it.
        """
        ring = cls(path)
        if not ring.exists():
            ring.create(ring.generate())
        else:
            ring.load()
        return ring

    def exists(self) -> bool:
        """Whether the key file exists."""
        return os.path.lexists(self.path)

    def load(self) -> None:
        """Read the key file."""
        try:
            with self.path.open(encoding="utf-8") as f:
                keys = signedjson.key.read_signing_keys(f)
        except FileNotFoundError as e:
            raise KeyFileError(f"keys: no signing key file at {self.path}") from e
        except (OSError, ValueError) as e:
            raise KeyFileError(f"keys: cannot read signing key file {self.path}: {e}") from e
        if not keys:
            raise KeyFileError(f"keys: {self.path} holds no signing key")
        self._keys = list(keys)

    @property
    def current(self) -> PublicKey:
        """The key used for new signatures."""
        return public_key_of(self._loaded()[0])

    @property
    def public_keys(self) -> list[PublicKey]:
        """Every key of the file, the current one first."""
        return [public_key_of(key) for key in self._loaded()]

    def _loaded(self) -> list[Any]:
        if not self._keys:
            raise KeyFileError(f"keys: the signing key file {self.path} was not loaded")
        return self._keys

    def sign(
        self, obj: dict[str, Any], server_name: str, key_id: str | None = None
    ) -> dict[str, Any]:
        """A signed copy of ``obj`` (Matrix "Signing JSON"); floats are refused.

        Signed with the key ``key_id`` while the key file holds it, else with the current key.
        """
        if _contains_float(obj):
            raise ValueError("signed JSON must not contain floats")
        keys = self._loaded()
        key = next((k for k in keys if key_id_of(k) == key_id), keys[0])
        signed: dict[str, Any] = signedjson.sign.sign_json(copy.deepcopy(obj), server_name, key)
        return signed

    def generate(self, taken_key_ids: Iterable[str] = ()) -> NewKey:
        """A fresh key (not yet in the file) whose version is the next integer after those of
        the file and of ``taken_key_ids`` (``ed25519:0`` for the first)."""
        versions = [str(k.version) for k in self._keys]
        versions += [key_id.partition(":")[2] for key_id in taken_key_ids]
        numbers = [int(v) for v in versions if v.isdigit()]
        return NewKey(signedjson.key.generate_signing_key(str(max(numbers, default=-1) + 1)))

    def create(self, new: NewKey) -> bool:
        """Create the key file holding only ``new``, unless it exists: then read that file
        instead. True when this call created it.

        The file is written under a unique temporary name and linked to its name, which fails
        when it exists: processes starting together on a fresh deployment end up with one key,
        and none ever reads a half-written file.
        """
        created = _create_exclusive(self.path, [new.signing_key])
        self.load()
        return created

    def install(self, new: NewKey) -> None:
        """Make ``new`` the current key, keeping the old ones in the file: they still sign the
        onbind notifications of invites stored under them."""
        keys = [new.signing_key, *self._loaded()]
        _write_keys(self.path, keys)
        self._keys = keys

    def rotate(self) -> PublicKey:
        """Make a new current key (next integer version) and write the file."""
        new = self.generate()
        self.install(new)
        return new.public


@dataclass(frozen=True)
class NewKey:
    """A generated signing key that is not in the key file yet."""

    signing_key: Any

    @property
    def public(self) -> PublicKey:
        """Its id and public key."""
        return public_key_of(self.signing_key)


def key_id_of(key: Any) -> str:
    """The id (``ed25519:<version>``) of a signedjson signing key."""
    return f"{key.alg}:{key.version}"


def public_key_of(key: Any) -> PublicKey:
    """A signedjson signing key's id and unpadded base64 public key."""
    return PublicKey(key_id_of(key), encode_base64(key.verify_key.encode()))


def read_key_file(path: Path) -> list[Any] | None:
    """The signedjson keys of a key file, current first; None when there is no file."""
    if not os.path.lexists(path):
        return None
    try:
        with path.open(encoding="utf-8") as f:
            return list(signedjson.key.read_signing_keys(f))
    except (OSError, ValueError) as e:
        raise KeyFileError(f"keys: cannot read signing key file {path}: {e}") from e


def write_key_file(path: Path, keys: list[Any]) -> None:
    """Replace the key file with ``keys`` (current first), atomically, readable only by its
    owner."""
    _write_keys(path, keys)


def _write_temporary(path: Path, keys: list[Any]) -> Path:
    """Write ``keys`` to a new file (0600) with a unique name beside ``path``; its path."""
    make_private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            signedjson.key.write_signing_keys(f, keys)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_keys(path: Path, keys: list[Any]) -> None:
    """Replace the key file atomically, readable only by its owner."""
    try:
        tmp = _write_temporary(path, keys)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise KeyFileError(f"keys: cannot write signing key file {path}: {e.strerror}") from e


def _create_exclusive(path: Path, keys: list[Any]) -> bool:
    """Create the key file unless it exists; False when it did (another process made it)."""
    try:
        tmp = _write_temporary(path, keys)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise KeyFileError(f"keys: cannot create signing key file {path}: {e.strerror}") from e
    return True
