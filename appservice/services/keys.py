"""Public keys: serving ours and telling whether a key is (still) valid; the key file checked
against the keys this deployment published.

The database records the public half of every key the deployment ever used; the key file holds
the private halves. At start they must agree: a key file replaced or lost (and silently made
anew) would sign with a key nobody can verify while ``pubkey/isvalid`` still vouches for the old
one. So a key id whose key differs, or a missing file where keys were published, stops start-up.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from unpaddedbase64 import decode_base64, encode_base64

from appservice.clock import Clock
from appservice.crypto.signing import KeyFileError, KeyRing, NewKey, PublicKey
from appservice.db.signing_keys import SigningKeyStore, StoredSigningKey
from appservice.errors import MatrixError

log = logging.getLogger(__name__)

REPLACE_LOST = "keys rotate --replace-lost-key"


class KeyConflictError(KeyFileError):
    """The key file does not hold the keys this deployment published (in the database)."""


def lost_key_file(path: Path, stored: Sequence[StoredSigningKey]) -> KeyConflictError:
    """The error for a key file missing where the database records published keys."""
    ids = ", ".join(key.key_id for key in stored)
    return KeyConflictError(
        f"keys.signing_key_path: no signing key file at {path}, but the database records keys "
        f"this deployment published ({ids}); restore the file from a backup (all instances use "
        f"the same key file), or if it is lost for good run `{REPLACE_LOST}` to make a new key"
    )


def check_key_file(
    path: Path, in_file: Sequence[PublicKey], stored: Sequence[StoredSigningKey]
) -> None:
    """Refuse (:class:`KeyConflictError`) a key file whose keys differ from the published ones
    with the same id, or that holds a published key under another id."""
    by_id = {key.key_id: key for key in stored}
    by_public = {key.public_key: key for key in stored}
    for key in in_file:
        recorded = by_id.get(key.key_id)
        if recorded is not None and recorded.public_key != key.public_key:
            raise KeyConflictError(
                f"keys.signing_key_path: {path} holds another {key.key_id} than the one this "
                "deployment published (recorded in the database): the file was replaced or "
                "belongs to another deployment or instance; restore this deployment's key file "
                "from a backup (all instances use the same key file), or if it is lost for good "
                f"move {path} away and run `{REPLACE_LOST}`"
            )
        other = by_public.get(key.public_key)
        if recorded is None and other is not None:
            raise KeyConflictError(
                f"keys.signing_key_path: {path} names a key {key.key_id} that the database "
                f"records as {other.key_id}: the file was edited; restore it from a backup"
            )


@dataclass(frozen=True)
class ListedKey:
    """A key as ``keys show`` lists it: ``valid``, ``revoked``, or ``unpublished`` (in the key
    file, recorded when a server starts)."""

    key_id: str
    public_key: str
    state: str
    current: bool


def list_keys(
    path: Path, in_file: Sequence[PublicKey] | None, stored: Sequence[StoredSigningKey]
) -> list[ListedKey]:
    """The keys of the key file (None: there is none) and of the database, checked against each
    other; empty when there is no key yet."""
    if in_file is None:
        if stored:
            raise lost_key_file(path, stored)
        return []
    check_key_file(path, in_file, stored)
    current = in_file[0].key_id
    listed = [
        ListedKey(key.key_id, key.public_key, "revoked" if key.revoked_ts else "valid", False)
        for key in stored
    ]
    recorded = {key.key_id for key in stored}
    listed += [
        ListedKey(key.key_id, key.public_key, "unpublished", False)
        for key in reversed(in_file)
        if key.key_id not in recorded
    ]
    return [
        ListedKey(key.key_id, key.public_key, key.state, key.key_id == current) for key in listed
    ]


def normalise_public_key(public_key: str) -> str | None:
    """Standard unpadded base64 of a key given in the standard or URL-safe alphabet."""
    try:
        raw = decode_base64(public_key.replace("-", "+").replace("_", "/").rstrip("="))
    except (binascii.Error, ValueError):
        return None
    return encode_base64(raw) if len(raw) == 32 else None


async def _no_ephemeral_keys(_public_key: str) -> bool:
    return False


class KeyService:
    """Long-term keys of all instances, known through the database."""

    def __init__(self, keyring: KeyRing, store: SigningKeyStore, clock: Clock) -> None:
        self._keyring = keyring
        self._store = store
        self._clock = clock
        self._ephemeral_check: Callable[[str], Awaitable[bool]] = _no_ephemeral_keys

    async def start(self) -> None:
        """Load the key file, checked against the published keys, and publish its keys.

        A missing key file is created (``ed25519:0``) only on a fresh deployment, whose
        database records no key; several instances starting at once end up with one key.
        """
        ring = self._keyring
        stored = await self._store.all()
        if ring.exists():
            ring.load()
        elif stored:
            raise lost_key_file(ring.path, stored)
        elif ring.create(ring.generate()):
            log.info("created the signing key file %s (%s)", ring.path, ring.current.key_id)
        check_key_file(ring.path, ring.public_keys, stored)
        for key in reversed(ring.public_keys):
            await self._publish(key)
        in_file = {key.key_id for key in ring.public_keys}
        missing = [k.key_id for k in stored if k.revoked_ts is None and k.key_id not in in_file]
        if missing:
            log.warning(
                "keys: %s lacks the valid keys %s (a key file from before a `keys rotate`, or not "
                "copied to this host?): invites stored under them cannot be completed here",
                ring.path,
                ", ".join(missing),
            )

    async def _publish(self, key: PublicKey) -> None:
        """Record ``key`` unless its id is recorded; refuse when another key is recorded under
        its id (another instance with another key file recorded its key first)."""
        recorded = await self._store.register(key.key_id, key.public_key, self._clock.now_ms())
        stored = [recorded] if recorded is not None else []
        if recorded is None and (other := await self._store.by_public_key(key.public_key)):
            stored.append(other)
        check_key_file(self._keyring.path, [key], stored)

    async def published(self) -> list[StoredSigningKey]:
        """Every key of the deployment recorded in the database, oldest first."""
        return await self._store.all()

    async def rotate(self) -> PublicKey:
        """Make a new current key (call :meth:`start` first); its id is recorded before the file
        is written, so two rotations at once cannot give one id two keys."""
        new = self._keyring.generate(key.key_id for key in await self._store.all())
        await self._publish(new.public)
        try:
            self._keyring.install(new)
        except KeyFileError:
            await self._forget(new)
            raise
        return new.public

    async def replace_lost_key_file(self) -> PublicKey:
        """Make a new key file where the old one is lost: its key takes the next unused id, and
        the lost keys stay recorded (valid unless revoked: signatures made with them stay
        verifiable)."""
        ring = self._keyring
        if ring.exists():
            raise KeyFileError(
                f"keys.signing_key_path: {ring.path} exists; --replace-lost-key only makes a "
                "new key file where it is lost (move the file away first if it is the wrong one)"
            )
        new = ring.generate(key.key_id for key in await self._store.all())
        await self._publish(new.public)
        if not ring.create(new):
            await self._forget(new)
            raise KeyFileError(
                f"keys.signing_key_path: {ring.path} was created by another process meanwhile; "
                "run the command again"
            )
        return new.public

    async def _forget(self, new: NewKey) -> None:
        """Revoke a key recorded for a file that could not be written."""
        await self._store.revoke(new.public.key_id, self._clock.now_ms())

    async def revoke(self, key_id: str) -> bool:
        """Revoke one key; False when there is no such key still valid."""
        return await self._store.revoke(key_id, self._clock.now_ms())

    async def public_key(self, key_id: str) -> str:
        """The public key for ``key_id`` (404 M_NOT_FOUND when unknown)."""
        # No key id holds a NUL (PostgreSQL text cannot): unknown, without a query (which
        # PostgreSQL would refuse).
        stored = None if "\x00" in key_id else await self._store.by_id(key_id)
        if stored is None:
            raise MatrixError(404, "M_NOT_FOUND", f"The public key {key_id} was not found")
        return stored.public_key

    async def is_valid(self, public_key: str) -> bool:
        """Whether ``public_key`` is one of our long-term keys that was not revoked."""
        normalised = normalise_public_key(public_key)
        if normalised is None:
            return False
        stored = await self._store.by_public_key(normalised)
        return stored is not None and stored.revoked_ts is None

    def set_ephemeral_check(self, check: Callable[[str], Awaitable[bool]]) -> None:
        """Where ephemeral keys are checked (the invites, which own them)."""
        self._ephemeral_check = check

    async def ephemeral_is_valid(self, public_key: str) -> bool:
        """Whether ``public_key`` is the ephemeral key of a pending invite, or of a resolved one
        whose onbind is being accepted (see ``InviteService.ephemeral_key_valid``)."""
        return await self._ephemeral_check(public_key)
