"""The ``static`` store: 3PIDs and roles listed in the configuration."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from appservice.config.loader import ConfigError
from appservice.config.model import StaticStoreConfig
from appservice.identity_stores.base import StoreEntry, Threepid
from appservice.threepid import canonical_address


class StaticStore:
    """Answers from ``stores.static``; listable, so hashed lookups find its entries too."""

    name = "static"
    listable = True

    def __init__(self, config: StaticStoreConfig) -> None:
        self._mxids: dict[Threepid, str] = {}
        for i, entry in enumerate(config.threepids):
            address = canonical_address(entry.medium, entry.address)
            if address is None:
                raise ConfigError(
                    f'stores.static.threepids[{i}].address: "{entry.address}" is not a valid '
                    f"{entry.medium}"
                )
            self._mxids[(entry.medium, address)] = entry.mxid
        self._roles = {mxid: frozenset(roles) for mxid, roles in config.roles.items()}

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def find(self, threepids: Sequence[Threepid]) -> dict[Threepid, str]:
        """The configured Matrix ID of each listed 3PID."""
        return {t: self._mxids[t] for t in threepids if t in self._mxids}

    async def entries(self) -> AsyncIterator[StoreEntry]:
        """Every configured 3PID."""
        for (medium, address), mxid in self._mxids.items():
            yield StoreEntry(medium, address, mxid)

    async def roles(self, mxid: str) -> frozenset[str]:
        """The configured roles of ``mxid``."""
        return self._roles.get(mxid, frozenset())
