"""Looking up Matrix IDs by 3PID: hashed v2 lookups and the signed legacy v1 lookups."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from appservice.clock import Clock
from appservice.config import LookupConfig, RateLimit
from appservice.crypto.hashing import lookup_hash, new_pepper
from appservice.crypto.signing import KeyRing
from appservice.db.bindings import Binding, BindingStore
from appservice.db.lookup_peppers import LookupHashes, PepperState, PepperStore
from appservice.db.server_state import ServerStateStore
from appservice.db.store_threepids import StoreThreepidStore
from appservice.errors import MatrixError, invalid_param
from appservice.identity_stores import IdentityStores, Threepid
from appservice.metrics import Metrics
from appservice.services.ratelimits import RateLimiter
from appservice.threepid import MEDIUMS, canonical_address

# Where the first pepper was kept before rotation (migration 0014): generation 0 of lookup_pepper.
PEPPER_KEY = "lookup_pepper"
# How long an instance answers from the pepper state it read last (seconds, monotonic): a rotation
# reaches every instance within this (a pepper it does not know makes it read at once).
PEPPER_STATE_TTL_S = 1.0
# How long a signed association from an identity store is declared valid (v1 lookups): stores
# change without telling us, so it is short.
STORE_ASSOCIATION_VALIDITY_MS = 24 * 3600 * 1000
# What a sha256 lookup sends: the URL-safe unpadded base64 of a SHA-256 digest. Anything else
# matches nothing, so it is not asked of the database (on PostgreSQL a NUL would be an error).
_SHA256_HASH = re.compile(r"[A-Za-z0-9_-]{43}")


async def ensure_pepper(state: ServerStateStore, peppers: PepperStore, clock: Clock) -> None:
    """Create the pepper state on first use: generation 0 is the pepper kept in ``server_state``
    before rotation existed, or a new one."""
    first = await state.get_or_create(PEPPER_KEY, new_pepper())
    await peppers.ensure(first, clock.now_ms())


class LookupService:
    """Answers lookups from the bindings table, then from the identity stores in their order.

    Every lookup goes through lookup hashes: the bindings' index first, then the copy of the
    listable stores (``store_threepids``) for the hashes still unknown; plain-text lookups also
    ask the stores that cannot be listed.
    """

    def __init__(
        self,
        bindings: BindingStore,
        state: ServerStateStore,
        keyring: KeyRing,
        server_name: str,
        config: LookupConfig,
        clock: Clock,
        stores: IdentityStores | None = None,
        copies: StoreThreepidStore | None = None,
        *,
        ratelimiter: RateLimiter,
        v1_limit: RateLimit,
        peppers: PepperStore,
        metrics: Metrics | None = None,
    ) -> None:
        self._bindings = bindings
        self._metrics = metrics if metrics is not None else Metrics()
        self._ratelimiter = ratelimiter
        self._v1_limit = v1_limit
        self._stores = stores or IdentityStores(())
        self._copies = copies
        self._state = state
        self._keyring = keyring
        self._server_name = server_name
        self._config = config
        self._clock = clock
        self._peppers = peppers
        self._pepper_state: PepperState | None = None
        self._pepper_read_at = 0.0

    async def start(self) -> None:
        """Load the pepper shared by all instances (created on first start)."""
        await ensure_pepper(self._state, self._peppers, self._clock)
        await self.refresh_pepper()

    async def refresh_pepper(self) -> PepperState:
        """Read the pepper state from the database now."""
        self._pepper_state = state = await self._peppers.load()
        self._pepper_read_at = time.monotonic()
        return state

    async def pepper_state(self) -> PepperState:
        """The pepper state, read from the database at most :data:`PEPPER_STATE_TTL_S` ago."""
        state = self._pepper_state
        if state is None or time.monotonic() - self._pepper_read_at >= PEPPER_STATE_TTL_S:
            state = await self.refresh_pepper()
        return state

    @property
    def pepper(self) -> str:
        """The current lookup pepper as last read (see :meth:`pepper_state`)."""
        if self._pepper_state is None:
            raise RuntimeError("LookupService.start() was not awaited")
        return self._pepper_state.pepper

    def hash_of(self, medium: str, address: str) -> str:
        """The lookup hash of a canonical 3PID under the current pepper (as last read)."""
        return lookup_hash(address, medium, self.pepper)

    async def hashes_of(self, medium: str, address: str) -> LookupHashes:
        """What a binding of a canonical 3PID stores: its hash under each pepper in use."""
        return (await self.pepper_state()).hashes(medium, address)

    async def hash_details(self) -> dict[str, Any]:
        """The ``GET /hash_details`` body."""
        state = await self.pepper_state()
        return {"algorithms": list(self._config.algorithms), "lookup_pepper": state.pepper}

    async def _slot_of(self, algorithm: str, pepper: str) -> tuple[PepperState, int]:
        """The state and the hash slot that answers a lookup with ``pepper``: the current
        pepper's, or the previous one's during its grace; else 400 M_INVALID_PEPPER."""
        state = await self.pepper_state()
        for attempt in range(2):
            if pepper == state.pepper:
                return state, state.generation % 2
            if pepper == state.previous_pepper and state.previous_answered(self._clock.now_ms()):
                return state, (state.generation + 1) % 2
            if attempt == 0:  # maybe another instance switched a moment ago
                state = await self.refresh_pepper()
        raise MatrixError(
            400,
            "M_INVALID_PEPPER",
            "Unknown or invalid pepper",
            algorithm=algorithm,
            lookup_pepper=state.pepper,
        )

    async def lookup(self, algorithm: str, pepper: str, addresses: Sequence[str]) -> dict[str, str]:
        """``POST /lookup``: map each address (as sent) that has a binding to its Matrix ID."""
        if algorithm not in self._config.algorithms:
            raise invalid_param(f"Unsupported algorithm {algorithm!r}")
        state, slot = await self._slot_of(algorithm, pepper)
        if len(addresses) > self._config.max_addresses:
            raise invalid_param(
                f"Too many addresses: {len(addresses)} (at most {self._config.max_addresses})"
            )
        if algorithm == "sha256":
            # The addresses are the hashes, so what the index finds is the answer as it stands;
            # a repeated address is matched (and answered) once.
            found = await self._mxids_by_hash(list(filter(_SHA256_HASH.fullmatch, addresses)), slot)
        else:
            # "none": "<address> <medium>" in plain text; hash it ourselves to use the same index.
            plain: dict[Any, tuple[str, str]] = {}
            for entry in addresses:
                address, _, medium = entry.rpartition(" ")
                plain[entry] = (medium, address)
            found = dict(await self._find_plain(plain, state))
        self._count(len(set(addresses)), len(found))
        return found

    def _count(self, asked: int, found: int) -> None:
        """One lookup request: ``asked`` distinct addresses, ``found`` of them bound."""
        metrics = self._metrics
        metrics.lookup_requests.inc()
        metrics.lookup_addresses.inc(asked)
        metrics.lookup_hits.inc(found)
        metrics.lookup_misses.inc(asked - found)

    def signed_association(self, binding: Binding) -> dict[str, Any]:
        """A binding as the signed association object of the spec."""
        return self._keyring.sign(
            {
                "address": binding.address,
                "medium": binding.medium,
                "mxid": binding.mxid,
                "not_before": binding.not_before,
                "not_after": binding.not_after,
                "ts": binding.created_ts,
            },
            self._server_name,
        )

    async def lookup_one_signed(
        self, medium: str, address: str, requester_ip: str
    ) -> dict[str, Any]:
        """Legacy v1 ``GET /lookup``: the signed association, or ``{}`` when there is none.

        Unauthenticated, so counted against ``ratelimits.v1_lookup_per_ip`` first."""
        await self._ratelimiter.hit("v1_lookup_per_ip", requester_ip, self._v1_limit)
        association = await self._one_signed(medium, address)
        self._count(1, 1 if association else 0)
        return association

    async def _one_signed(self, medium: str, address: str) -> dict[str, Any]:
        canonical = canonical_address(medium, address) if medium in MEDIUMS else None
        if canonical is None:
            return {}
        now = self._clock.now_ms()
        binding = await self._bindings.get(medium, canonical)
        if binding is not None and binding.not_before <= now < binding.not_after:
            return self.signed_association(binding)
        if binding is None:
            found = await self._find_plain({0: (medium, canonical)}, await self.pepper_state())
            if found:
                # An identity store's answer, signed like a binding but valid only briefly.
                return self.signed_association(
                    Binding(
                        medium,
                        canonical,
                        found[0][1],
                        now,
                        now,
                        now + STORE_ASSOCIATION_VALIDITY_MS,
                    )
                )
        return {}

    async def bulk_lookup(
        self, threepids: Sequence[tuple[str, str]], requester_ip: str
    ) -> list[list[str]]:
        """Legacy v1 ``POST /bulk_lookup``: ``[medium, address, mxid]`` for each bound 3PID.

        Unauthenticated, so each 3PID asked for counts against ``ratelimits.v1_lookup_per_ip``
        first (a request larger than that limit could never pass: 400)."""
        most = min(self._config.max_addresses, self._v1_limit.limit)
        if len(threepids) > most:
            raise invalid_param(f"Too many 3PIDs: {len(threepids)} (at most {most})")
        await self._ratelimiter.hit(
            "v1_lookup_per_ip", requester_ip, self._v1_limit, max(1, len(threepids))
        )
        found = await self._find_plain(dict(enumerate(threepids)), await self.pepper_state())
        self._count(len(threepids), len(found))
        return [[*threepids[i], mxid] for i, mxid in found]

    async def _find_plain(
        self, threepids: dict[Any, tuple[str, str]], state: PepperState
    ) -> list[tuple[Any, str]]:
        """(key, mxid) for each key whose (medium, address) is bound; addresses are
        canonicalised and hashed here, so plain lookups use the same index as hashed ones."""
        by_hash: dict[str, list[Any]] = {}
        canonical_of: dict[str, Threepid] = {}
        for key, (medium, address) in threepids.items():
            canonical = canonical_address(medium, address) if medium in MEDIUMS else None
            if canonical is not None:
                h = lookup_hash(canonical, medium, state.pepper)
                by_hash.setdefault(h, []).append(key)
                canonical_of[h] = (medium, canonical)
        found = await self._mxids_by_hash(list(by_hash), state.generation % 2)
        if self._stores.live and len(found) < len(by_hash):
            missing = {canonical_of[h]: h for h in by_hash if h not in found}
            for threepid, mxid in (await self._stores.find_live(list(missing))).items():
                found[missing[threepid]] = mxid
        return [(key, mxid) for h, mxid in found.items() for key in by_hash[h]]

    async def _mxids_by_hash(self, hashes: Sequence[str], slot: int) -> dict[str, str]:
        """Bindings first; the hashes they do not know, from the copied stores, in order."""
        found = await self._bindings.mxids_by_hash(hashes, slot)
        if self._copies is None or not self._stores.listable or len(found) == len(hashes):
            return found
        missing = list(dict.fromkeys(h for h in hashes if h not in found))
        if not missing:
            return found
        matches = await self._copies.matches_by_hash(missing, slot)
        found.update(self._stores.first_by_order((m.lookup_hash, m.store, m.mxid) for m in matches))
        return found
