"""Identity-server accounts: OpenID registration, token authentication, logout."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence

from appservice.clock import Clock
from appservice.config import RateLimit
from appservice.crypto.hashing import token_hash
from appservice.db.accounts import Account, AccountStore
from appservice.errors import MatrixError, invalid_param, unauthorized
from appservice.federation.discovery import FederationError, is_valid_server_name
from appservice.federation.openid import OpenIdError
from appservice.services.ratelimits import RateLimiter

log = logging.getLogger(__name__)

TOKEN_CACHE_TTL_S = 30.0
TOKEN_CACHE_SIZE = 100_000

# (server_name, openid_access_token) -> the Matrix user ID the homeserver vouches for; raises
# OpenIdError when the token is refused and FederationError when the homeserver is unreachable.
OpenIdVerifier = Callable[[str, str], Awaitable[str]]


class AccountService:
    """Issues and checks identity-server access tokens."""

    def __init__(
        self,
        store: AccountStore,
        verify_openid: OpenIdVerifier,
        clock: Clock,
        allowed_homeservers: Sequence[str] = (),
        *,
        ratelimiter: RateLimiter,
        register_limit: RateLimit,
    ) -> None:
        self._store = store
        self._ratelimiter = ratelimiter
        self._register_limit = register_limit
        self._verify_openid = verify_openid
        self._clock = clock
        self._allowed = frozenset(allowed_homeservers)
        # token hash -> (account, when cached): most requests then need no database round trip.
        # A logout on another instance takes effect here within TOKEN_CACHE_TTL_S.
        self._cache: dict[str, tuple[Account, float]] = {}

    async def register(self, openid_token: str, server_name: str, requester_ip: str) -> str:
        """Exchange an OpenID token for a new access token of the user it identifies; at most
        ``ratelimits.register_per_ip`` attempts per client IP, counted before the homeserver is
        asked (a refused or failed attempt counts too)."""
        if not is_valid_server_name(server_name):
            raise invalid_param("matrix_server_name is not a valid server name")
        self.require_allowed_homeserver(server_name)
        await self._ratelimiter.hit("register_per_ip", requester_ip, self._register_limit)
        # The caller is not authenticated and chooses the server: the answer says only whether
        # the token was refused or the server could not be asked, never why (a connection error
        # names hosts, ports and what listens there); the reason goes to the log.
        try:
            user_id = await self._verify_openid(server_name, openid_token)
        except OpenIdError as e:
            # A refused or malformed token is the client's doing; anything else the server's.
            level = logging.INFO if e.status in (None, 401) else logging.WARNING
            log.log(level, "OpenID check with %s failed: %s", server_name, e)
            if e.status is None or e.status < 500:
                raise MatrixError(401, "M_UNKNOWN_TOKEN", "OpenID token rejected") from e
            raise MatrixError(
                502, "M_UNKNOWN", f"Could not verify the OpenID token with {server_name}"
            ) from e
        except FederationError as e:
            log.warning("OpenID check with %s failed: %s", server_name, e)
            raise MatrixError(
                502, "M_UNKNOWN", f"Could not verify the OpenID token with {server_name}"
            ) from e
        token = secrets.token_urlsafe(32)
        await self._store.add(token_hash(token), user_id, self._clock.now_ms())
        log.info("registered an account for %s", user_id)
        return token

    def require_allowed_homeserver(self, server_name: str) -> None:
        """403 M_FORBIDDEN unless ``accounts.allowed_homeservers`` lets in ``server_name`` (for
        registration, and for the v1 calls that name a user without an account)."""
        if self._allowed and server_name not in self._allowed:
            raise MatrixError(
                403, "M_FORBIDDEN", f"Users of {server_name} may not use this identity server"
            )

    async def authenticate(self, token: str | None) -> Account:
        """The account of an access token (401 M_UNAUTHORIZED when missing or unknown)."""
        if not token:
            raise unauthorized("Missing access token")
        key = token_hash(token)
        now = self._clock.time()
        cached = self._cache.get(key)
        if cached is not None and now - cached[1] < TOKEN_CACHE_TTL_S:
            return cached[0]
        account = await self._store.get(key)
        if account is None:
            self._cache.pop(key, None)
            raise unauthorized("Unrecognised access token")
        if len(self._cache) >= TOKEN_CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = (account, now)
        return account

    async def logout(self, token: str | None) -> None:
        """Invalidate an access token (401 M_UNKNOWN_TOKEN when unknown)."""
        if token:
            self._cache.pop(token_hash(token), None)
        if not token or not await self._store.delete(token_hash(token)):
            raise MatrixError(401, "M_UNKNOWN_TOKEN", "Unrecognised access token")
