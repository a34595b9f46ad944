"""What an import carries over from another identity server, whatever its layout.

A reader (``importers.sydent``, ``importers.ma1sd``) turns the other server's files into an
:class:`ImportSource`; ``importers.writer`` writes it into our database and key file. Addresses
are as the other server stored them: the writer puts them in canonical form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import nacl.signing
from unpaddedbase64 import encode_base64


class ImportFailed(Exception):
    """Another server's data that cannot be imported; the message is one line."""


def ed25519_public_key(seed: bytes) -> str:
    """The unpadded base64 public key of a 32-byte ed25519 seed."""
    return encode_base64(bytes(nacl.signing.SigningKey(seed).verify_key))


class ImportedBinding(NamedTuple):
    """One 3PID association (a tuple: a million of them stream through in batches)."""

    medium: str
    address: str
    mxid: str
    ts: int  # when it was made, in ms
    not_before: int
    not_after: int


@dataclass(frozen=True)
class ImportedInvite:
    """A 3PID invite the other server stored and has not delivered yet."""

    source_id: str  # stable within the source (its row id): our invite id derives from it
    token: str
    medium: str
    address: str
    room_id: str
    sender: str
    created_ts: int  # ms; expiry counts from here
    display_name: str = ""  # the redacted address shown in the room; derived when empty
    ephemeral_public_key: str | None = None  # unpadded base64, when the source links one
    ephemeral_private_key: str | None = None  # unpadded base64 seed, when the source kept it
    signing_key_id: str | None = None  # the long-term key the room's invite event lists
    details: dict[str, str] = field(default_factory=dict)  # room_name, sender_display_name, ...


@dataclass(frozen=True)
class ImportedSigningKey:
    """A long-term ed25519 key of the other server, under its key id (``ed25519:<version>``)."""

    key_id: str
    seed: bytes  # 32 bytes: a secret
    current: bool  # the one it signed with last: becomes our current key
    valid: bool = True  # False: it was revoked there, and is imported revoked


@dataclass(frozen=True)
class ImportedEphemeralKey:
    """An ephemeral public key the other server answers ``pubkey/ephemeral/isvalid`` for, not
    linked to one invite (sydent keeps them in a table of their own)."""

    public_key: str  # unpadded base64
    created_ts: int


@dataclass
class ImportSource:
    """Everything one reader found. ``bindings`` is called once and yields batches."""

    name: str  # "sydent", "ma1sd": recorded on every imported row
    binding_count: int  # for progress, before the batches are read
    bindings: Callable[[], Iterator[list[ImportedBinding]]]
    invites: list[ImportedInvite]
    signing_keys: list[ImportedSigningKey]
    ephemeral_keys: list[ImportedEphemeralKey]
    # What was found and deliberately not imported, by kind ("delivered invites": 3).
    skipped: dict[str, int] = field(default_factory=dict)
    # Lines for the operator (ma1sd kept no bindings: configure the matching identity store).
    notes: list[str] = field(default_factory=list)
