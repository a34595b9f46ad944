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
from appservice.errors import MatrixError
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
# The request Content-Encodings aiohttp decodes (one header, any case); the body we read, check
# and forward is then the decoded one.
_DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the proxied endpoints (only when the server has an invite policy service)."""
    policy = ctx.invite_policy
    if policy is None:
        return

    async def invite(request: web.Request) -> web.StreamResponse:
        _check_content_encoding(request)
        body = await request.read()
        found = invite_in_body(body)
        return await _proxy(
            request, policy, body, request.match_info["room_id"], [found] if found else []
        )

    async def create_room(request: web.Request) -> web.StreamResponse:
        _check_content_encoding(request)
        body = await request.read()
        return await _proxy(request, policy, body, "a new room", invites_in_create_room(body))

    for version in VERSIONS:
        prefix = f"/_matrix/client/{version}"
        router.add_post(f"{prefix}/rooms/{{room_id}}/invite", invite)
        router.add_put(f"{prefix}/rooms/{{room_id}}/invite/{{txn_id}}", invite)
        router.add_post(f"{prefix}/createRoom", create_room)
        router.add_put(f"{prefix}/createRoom/{{txn_id}}", create_room)


def _check_content_encoding(request: web.Request) -> None:
    """415 for a body aiohttp does not decode (an unknown or repeated Content-Encoding): it
    could not be checked for 3PID invites, and homeservers do not decode request bodies."""
    encodings = request.headers.getall("Content-Encoding", [])
    if not encodings:
        return
    value = encodings[0].strip().lower() if encodings[0].isascii() else ""
    if len(encodings) > 1 or value not in _DECODED_ENCODINGS | {"identity"}:
        raise MatrixError(415, "M_UNRECOGNIZED", "Unsupported Content-Encoding")


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
    # The body is forwarded as read, decoded: without its Content-Encoding (the homeserver would
    # decode it again or refuse it) and with a Content-Length of its own (forward() sets it).
    headers = [(k, v) for k, v in request.headers.items() if k.lower() != "content-encoding"]
    async with policy.forward(request.method, request.raw_path, headers, body) as upstream:
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
