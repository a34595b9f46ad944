"""Public keys: serving ours and telling whether a key is (still) valid."""

from __future__ import annotations

import binascii
from collections.abc import Awaitable, Callable

from unpaddedbase64 import decode_base64, encode_base64

from appservice.clock import Clock
from appservice.crypto.signing import KeyRing
from appservice.db.signing_keys import SigningKeyStore
from appservice.errors import MatrixError


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
        """Make this instance's current key known to every instance."""
        current = self._keyring.current
        await self._store.register(current.key_id, current.public_key, self._clock.now_ms())

    async def public_key(self, key_id: str) -> str:
        """The public key for ``key_id`` (404 M_NOT_FOUND when unknown)."""
        stored = await self._store.by_id(key_id)
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
        """Whether ``public_key`` is the ephemeral key of a pending invite."""
        return await self._ephemeral_check(public_key)
