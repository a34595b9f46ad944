"""The legacy ``/_matrix/identity/api/v1`` endpoints that homeservers and old clients still call.

The key endpoints are always served: ``key_validity_url`` values naming the v1 paths live on in
rooms' invite events (from older servers, or imported from sydent), and a homeserver asks them
when the invitee joins. The plain-text lookups only with ``api.v1_enabled`` (they take no token),
and then limited per client IP. ``3pid/unbind`` is served by ``bind.py``.
"""

from __future__ import annotations

from aiohttp import web

from appservice.api import keys
from appservice.api.context import ApiContext
from appservice.api.http import client_ip, json_body, json_response, query_param, require_fields
from appservice.errors import bad_json

PREFIX = "/_matrix/identity/api/v1"


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the v1 handlers (unauthenticated, as v1 was)."""

    async def status(_request: web.Request) -> web.Response:
        return json_response({})

    async def lookup(request: web.Request) -> web.Response:
        medium = query_param(request, "medium")
        address = query_param(request, "address")
        ip = client_ip(request, ctx.trusted_proxies)
        return json_response(await ctx.lookup.lookup_one_signed(medium, address, ip))

    async def bulk_lookup(request: web.Request) -> web.Response:
        body = await json_body(request)
        require_fields(body, "threepids")
        threepids = body["threepids"]
        if not isinstance(threepids, list) or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(v, str) for v in t)
            for t in threepids
        ):
            raise bad_json("threepids must be a list of [medium, address] pairs")
        found = await ctx.lookup.bulk_lookup(
            [(t[0], t[1]) for t in threepids], client_ip(request, ctx.trusted_proxies)
        )
        return json_response({"threepids": found})

    if ctx.v1_enabled:
        router.add_get(PREFIX, status)
        router.add_get(f"{PREFIX}/lookup", lookup)
        router.add_post(f"{PREFIX}/bulk_lookup", bulk_lookup)
    keys.add_routes(router, ctx, PREFIX)
