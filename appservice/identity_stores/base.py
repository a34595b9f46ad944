"""What an identity store is: a source that maps 3PIDs to Matrix IDs and Matrix IDs to roles.

Our own bindings are not a store of this kind; they are always consulted first, through their
indexed table. Stores come after them in the configured order (``stores.order``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

# A 3PID as (medium, canonical address), e.g. ("email", "alice@example.org").
Threepid = tuple[str, str]


@dataclass(frozen=True)
class StoreEntry:
    """One 3PID a store knows, with the Matrix ID it belongs to (address canonical)."""

    medium: str
    address: str
    mxid: str


class StoreError(Exception):
    """The store's backend failed (unreachable, timed out, answered nonsense).

    ``str()`` is one line fit for a log and an error message; it names no secret.
    """


class IdentityStore(Protocol):
    """A lookup source. Addresses in and out are canonical (``appservice.threepid``)."""

    @property
    def name(self) -> str:
        """The store's name in ``stores.order`` (synapse, ldap, rest, static)."""
        ...

    @property
    def listable(self) -> bool:
        """Whether ``entries()`` works, so the store is mirrored for hashed lookups."""
        ...

    async def start(self) -> None:
        """Open connections; raise ``StoreError`` when the backend cannot be used at all."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...

    async def find(self, threepids: Sequence[Threepid]) -> dict[Threepid, str]:
        """The Matrix ID of each 3PID the store knows (bulk; a single lookup is a list of one)."""
        ...

    def entries(self) -> AsyncIterator[StoreEntry]:
        """Every 3PID the store knows (only when ``listable``)."""
        ...

    async def roles(self, mxid: str) -> frozenset[str]:
        """The roles of a Matrix user (for the invite policy); empty when it has none."""
        ...
