"""``/v2/store-invite`` and ``/v2/sign-ed25519``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from appservice.api.context import ApiContext
from appservice.api.http import client_ip, json_body, json_response, require_fields, string_field
from appservice.errors import bad_json
from appservice.services.invites import DETAIL_FIELDS, StoreInviteRequest

PREFIX = "/_matrix/identity/v2"


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the handlers of this module."""

    async def store_invite(request: web.Request) -> web.Response:
        user_id = await ctx.user_id(request)
        body = await json_body(request)
        answer = await ctx.invites.store_invite(
            store_invite_request(body),
            caller=user_id,
            requester_ip=client_ip(request, ctx.trusted_proxies),
        )
        return json_response(answer)

    async def sign_ed25519(request: web.Request) -> web.Response:
        await ctx.user_id(request)
        body = await json_body(request)
        # The invite email's sign_url carries the token and the key in its query (as sydent's
        # signurl): fields the body lacks are taken from there.
        for name in ("mxid", "token", "private_key"):
            if name not in body and name in request.query:
                body[name] = request.query[name]
        require_fields(body, "mxid", "token", "private_key")
        signed = await ctx.invites.sign_ed25519(
            string_field(body, "mxid"),
            string_field(body, "token"),
            string_field(body, "private_key"),
        )
        return json_response(signed)

    router.add_post(f"{PREFIX}/store-invite", store_invite)
    router.add_post(f"{PREFIX}/sign-ed25519", sign_ed25519)


def store_invite_request(body: dict[str, Any]) -> StoreInviteRequest:
    """The store-invite parameters (v2, and v1's), checked for shape."""
    require_fields(body, "medium", "address", "room_id", "sender")
    details: dict[str, str] = {}
    for name in DETAIL_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise bad_json(f"{name} must be a string")
        details[name] = value
    return StoreInviteRequest(
        medium=string_field(body, "medium"),
        address=string_field(body, "address"),
        room_id=string_field(body, "room_id"),
        sender=string_field(body, "sender"),
        details=details,
    )
