"""The invite proxy: the client-server endpoints that can make a 3PID invite, routed here by the
operator's reverse proxy, checked by the invite policy and forwarded to the homeserver.

Synapse serves them under ``api/v1``, ``r0``, ``v3`` and ``unstable``, as ``POST`` and as ``PUT``
with a transaction ID, so all of those are routed here; otherwise one spelling would bypass the
policy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiohttp import web

from appservice.api.context import ApiContext
from appservice.api.http import CORS_HEADERS
from appservice.services.invite_policy import (
    HomeserverAnswer,
    InvitePolicyService,
    ThreepidInvite,
    UpstreamBroken,
    invite_in_body,
    invites_in_create_room,
)

log = logging.getLogger(__name__)

VERSIONS = ("api/v1", "r0", "v3", "unstable")
# Query parameters that say who the caller is (an appservice acts as ``user_id``).
_IDENTITY_QUERY = ("access_token", "user_id")


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the proxied endpoints (only when the server has an invite policy service)."""
    policy = ctx.invite_policy
    if policy is None:
        return

    async def invite(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        found = invite_in_body(body)
        return await _proxy(
            request, policy, body, request.match_info["room_id"], [found] if found else []
        )

    async def create_room(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return await _proxy(request, policy, body, "a new room", invites_in_create_room(body))

    for version in VERSIONS:
        prefix = f"/_matrix/client/{version}"
        router.add_post(f"{prefix}/rooms/{{room_id}}/invite", invite)
        router.add_put(f"{prefix}/rooms/{{room_id}}/invite/{{txn_id}}", invite)
        router.add_post(f"{prefix}/createRoom", create_room)
        router.add_put(f"{prefix}/createRoom/{{txn_id}}", create_room)


async def _proxy(
    request: web.Request,
    policy: InvitePolicyService,
    body: bytes,
    room: str,
    invites: Sequence[ThreepidInvite],
) -> web.StreamResponse:
    if invites:
        query = [(k, v) for k, v in request.query.items() if k in _IDENTITY_QUERY]
        try:
            sender = await policy.whoami(request.headers.getall("Authorization", []), query)
        except HomeserverAnswer as answer:
            headers = [(k, v) for k, v in answer.headers if k.lower() != "content-length"]
            return _with_cors(web.Response(status=answer.status, body=answer.body, headers=headers))
        await policy.check(sender, room, invites)
    async with policy.forward(
        request.method, request.raw_path, request.headers.items(), body
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
        for name, value in upstream.headers:
            response.headers.add(name, value)
        _with_cors(response)
        await response.prepare(request)
        try:
            async for chunk in upstream.chunks:
                await response.write(chunk)
        except UpstreamBroken as e:
            log.warning("invite proxy: %s", e)
            # The status is sent already: cutting the connection is how the client learns.
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response


def _with_cors(response: web.StreamResponse) -> web.StreamResponse:
    # Headers cannot change once a streamed answer is under way, so they are set before; the
    # homeserver's own CORS headers win.
    for name, value in CORS_HEADERS.items():
        if name not in response.headers:
            response.headers[name] = value
    return response
