"""The SMS delegate paths: what a homeserver calls when its ``account_threepid_delegates.msisdn``
names this server (Synapse cannot send SMS itself).

- ``POST /_matrix/identity/api/v1/validate/msisdn/requestToken``
  ``{client_secret, country, phone_number, send_attempt, next_link?}`` → ``{sid}``
- ``POST /_matrix/identity/api/v1/validate/msisdn/submitToken`` ``{sid, client_secret, token}``
  → ``{success: true}`` (the user gives the code to the homeserver, which relays it)
- ``GET /_matrix/identity/api/v1/3pid/getValidated3pid?sid=&client_secret=``
  → ``{medium, address, validated_at}`` (400 ``M_SESSION_NOT_VALIDATED`` before)

They take no access token and no terms: the homeserver is the caller. The sessions are the v2
ones (``SessionService``: attempt limit, expiry, ``send_attempt``), so a number validated here
can be bound with ``/v2/3pid/bind`` and the same sid.

**This module is the single place that registers these three routes**, for the delegate
(``api.msisdn_delegate.enabled``, on by default) and for the general v1 API
(``api.v1_enabled``, off by default) alike: ``api/v1.py`` must not register them again. They
are served when either switch is on; otherwise they are unknown (404 ``M_UNRECOGNIZED``).
A caller is served *as the delegate* when the delegate is on and its address (the peer, or
X-Forwarded-For from ``listen.trusted_proxies``) is in ``api.msisdn_delegate.allowed_networks``
(empty: any address); requestToken then counts ``ratelimits.msisdn_delegate_per_number`` and
the higher ``ratelimits.msisdn_delegate_per_ip`` (a whole homeserver's budget). Any other
caller is served as a v1 client (the ``request_token_*`` limits of v2) when ``api.v1_enabled``
is on, and refused with 403 ``M_FORBIDDEN`` when it is not.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

from aiohttp import web

from appservice.api.context import ApiContext
from appservice.api.http import (
    IPNetwork,
    client_ip,
    int_field,
    json_body,
    json_response,
    optional_string_field,
    require_fields,
    string_field,
)
from appservice.api.validation import submit_token_answer, validated_threepid_answer
from appservice.errors import forbidden

log = logging.getLogger(__name__)

PREFIX = "/_matrix/identity/api/v1"
REQUEST_TOKEN = f"{PREFIX}/validate/msisdn/requestToken"
SUBMIT_TOKEN = f"{PREFIX}/validate/msisdn/submitToken"
GET_VALIDATED = f"{PREFIX}/3pid/getValidated3pid"


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the three paths when the delegate or the general v1 API is on."""
    if not (ctx.msisdn_delegate_enabled or ctx.v1_enabled):
        return

    def as_delegate(request: web.Request) -> tuple[bool, str]:
        """(whether the caller is served as the delegate, its address); 403 M_FORBIDDEN for a
        caller that is neither an allowed homeserver nor, with v1 on, a v1 client."""
        ip = client_ip(request, ctx.trusted_proxies)
        if ctx.msisdn_delegate_enabled:
            networks = ctx.msisdn_delegate_networks
            if not networks or _in_networks(ip, networks):
                return True, ip
        if ctx.v1_enabled:
            return False, ip
        log.info("msisdn delegate: %s refused (not in allowed_networks)", ip)
        raise forbidden("This address may not use the phone number delegate")

    async def request_token(request: web.Request) -> web.Response:
        delegate, ip = as_delegate(request)
        body = await json_body(request)
        require_fields(body, "client_secret", "country", "phone_number", "send_attempt")
        sid = await ctx.sessions.request_msisdn_token(
            client_secret=string_field(body, "client_secret"),
            country=string_field(body, "country"),
            phone_number=string_field(body, "phone_number"),
            send_attempt=int_field(body, "send_attempt"),
            next_link=optional_string_field(body, "next_link"),
            requester_ip=ip,
            delegate=delegate,
        )
        return json_response({"sid": sid})

    async def submit_token(request: web.Request) -> web.Response:
        as_delegate(request)
        body = await json_body(request)
        return await submit_token_answer(ctx, body)

    async def get_validated_threepid(request: web.Request) -> web.Response:
        as_delegate(request)
        return await validated_threepid_answer(ctx, request)

    router.add_post(REQUEST_TOKEN, request_token)
    router.add_post(SUBMIT_TOKEN, submit_token)
    router.add_get(GET_VALIDATED, get_validated_threepid)


def _in_networks(address: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether ``address`` (an IPv4-mapped IPv6 address counts as its IPv4 one, as a dual-stack
    listener reports IPv4 peers) is in one of ``networks``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)
