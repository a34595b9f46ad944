"""Binding a validated 3PID to a Matrix ID, and unbinding it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from appservice.clock import Clock
from appservice.db.bindings import Binding, BindingStore
from appservice.db.database import AppDatabase
from appservice.errors import MatrixError, forbidden
from appservice.federation.xmatrix import XMatrixError
from appservice.notifications.connectors import EmailConnector
from appservice.notifications.generator import MessageGenerator
from appservice.notifications.message import NotificationError
from appservice.services.lookup import LookupService
from appservice.services.sessions import SessionService
from appservice.threepid import MEDIUMS, canonical_address, user_id_server

log = logging.getLogger(__name__)

# Associations are valid for a century: they end by unbinding, not by time.
ASSOCIATION_LIFETIME_MS = 100 * 365 * 86_400_000

# (authorization header, method, uri, parsed body) -> the verified origin server; raises
# XMatrixError.
RequestVerifier = Callable[[str, str, str, Any], Awaitable[str]]
# Runs inside the bind transaction.
BindHook = Callable[[Binding], Awaitable[object]]


class BindingService:
    """Creates and removes bindings."""

    def __init__(
        self,
        db: AppDatabase,
        bindings: BindingStore,
        sessions: SessionService,
        lookup: LookupService,
        verify_request: RequestVerifier,
        generator: MessageGenerator,
        email: EmailConnector,
        clock: Clock,
        *,
        notify_unbind: bool = False,
        on_bound: Sequence[BindHook] = (),
        after_bound: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._db = db
        self._bindings = bindings
        self._sessions = sessions
        self._lookup = lookup
        self._verify_request = verify_request
        self._generator = generator
        self._email = email
        self._clock = clock
        self._notify_unbind = notify_unbind
        self._on_bound = list(on_bound)
        self._after_bound = list(after_bound)

    async def bind(
        self, sid: str, client_secret: str, mxid: str, caller: str | None
    ) -> dict[str, Any]:
        """Bind the session's 3PID to ``mxid`` (the caller's own ID); the signed association.

        ``caller`` None: the unauthenticated v1 API, where the validated session is the only
        proof and ``mxid`` is taken as given (it must be a user ID)."""
        if caller is None:
            if user_id_server(mxid) is None:
                raise MatrixError(400, "M_INVALID_PARAM", "mxid must be a Matrix user ID")
        elif mxid != caller:
            raise forbidden("You may only bind 3PIDs to your own Matrix ID")
        threepid = await self._sessions.validated_threepid(sid, client_secret)
        now = self._clock.now_ms()
        binding = Binding(
            medium=threepid.medium,
            address=threepid.address,
            mxid=mxid,
            created_ts=now,
            not_before=now,
            not_after=now + ASSOCIATION_LIFETIME_MS,
        )
        hashes = await self._lookup.hashes_of(binding.medium, binding.address)
        # The binding and what hooks queue for it (onbind notifications) commit together.
        async with self._db.transaction():
            await self._bindings.upsert(binding, hashes)
            for hook in self._on_bound:
                await hook(binding)
        log.info("bound a %s 3PID to %s", binding.medium, mxid)
        for after in self._after_bound:
            after()
        return self._lookup.signed_association(binding)

    async def unbind(
        self,
        *,
        mxid: str,
        medium: str,
        address: str,
        sid: str | None,
        client_secret: str | None,
        authorization: str | None,
        method: str,
        uri: str,
        body: Any,
    ) -> None:
        """Remove a binding, authorised by a validated session or the homeserver's signature."""
        if medium not in MEDIUMS:
            raise MatrixError(400, "M_INVALID_PARAM", f"Unsupported medium {medium!r}")
        canonical = canonical_address(medium, address)
        if canonical is None:
            raise MatrixError(400, "M_INVALID_PARAM", "Invalid address")
        if sid is not None and client_secret is not None:
            threepid = await self._sessions.validated_threepid(sid, client_secret)
            if (threepid.medium, threepid.address) != (medium, canonical):
                raise forbidden("The session does not validate this 3PID")
        elif authorization is not None and authorization.lower().startswith("x-matrix"):
            try:
                origin = await self._verify_request(authorization, method, uri, body)
            except XMatrixError as e:
                if e.public_reason != e.reason:
                    log.warning("unbind refused: %s", e.reason)
                raise forbidden(f"Invalid homeserver signature: {e.public_reason}") from e
            if user_id_server(mxid) != origin:
                raise forbidden(f"{origin} is not the homeserver of {mxid}")
        else:
            raise forbidden(
                "Unbinding needs a validated session (sid, client_secret) or a request "
                "signed by the user's homeserver"
            )
        removed = await self._bindings.delete(medium, canonical, mxid)
        if not removed:
            return
        log.info("unbound a %s 3PID from %s", medium, mxid)
        if self._notify_unbind and medium == "email":
            try:
                await self._email.send_email(self._generator.unbind_email(canonical, mxid=mxid))
            except NotificationError as e:
                log.warning("could not send the unbind notification: %s", e)
