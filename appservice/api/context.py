"""What the handlers can reach: the services, built once by ``app.py``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from appservice.api.http import IPNetwork, access_token
from appservice.services.accounts import AccountService
from appservice.services.bindings import BindingService
from appservice.services.invite_policy import InvitePolicyService
from appservice.services.invites import InviteService
from appservice.services.keys import KeyService
from appservice.services.lookup import LookupService
from appservice.services.sessions import SessionService
from appservice.services.terms import TermsService


@dataclass(frozen=True)
class ApiContext:
    """The services the public API calls."""

    accounts: AccountService
    terms: TermsService
    lookup: LookupService
    keys: KeyService
    sessions: SessionService
    bindings: BindingService
    invites: InviteService
    health: Callable[[], Awaitable[dict[str, Any]]]
    # Renders a web page template (validation result pages).
    render_page: Callable[..., str]
    trusted_proxies: Sequence[IPNetwork] = ()
    v1_enabled: bool = False
    # The SMS delegate paths (api/msisdn_delegate.py): on, and who may call them (empty: anyone).
    msisdn_delegate_enabled: bool = True
    msisdn_delegate_networks: Sequence[IPNetwork] = ()
    # Checks and forwards the client-server endpoints that can make a 3PID invite.
    invite_policy: InvitePolicyService | None = None

    async def user_id(self, request: web.Request, *, enforce_terms: bool = True) -> str:
        """The authenticated user (401 without a valid token, 403 until the terms are accepted)."""
        account = await self.accounts.authenticate(access_token(request))
        if enforce_terms:
            await self.terms.require_accepted(account.user_id)
        return account.user_id
