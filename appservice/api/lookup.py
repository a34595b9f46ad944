"""``/v2/hash_details`` and ``/v2/lookup``."""

from __future__ import annotations

from aiohttp import web

from appservice.api.context import ApiContext
from appservice.api.http import (
    json_body,
    json_response,
    require_fields,
    string_field,
    string_list_field,
)

PREFIX = "/_matrix/identity/v2"


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the handlers of this module."""

    async def hash_details(request: web.Request) -> web.Response:
        await ctx.user_id(request)
        return json_response(await ctx.lookup.hash_details())

    async def lookup(request: web.Request) -> web.Response:
        await ctx.user_id(request)
        body = await json_body(request)
        require_fields(body, "algorithm", "pepper", "addresses")
        algorithm = string_field(body, "algorithm")
        pepper = string_field(body, "pepper")
        addresses = string_list_field(body, "addresses")
        mappings = await ctx.lookup.lookup(algorithm, pepper, addresses)
        return json_response({"mappings": mappings})

    router.add_get(f"{PREFIX}/hash_details", hash_details)
    router.add_post(f"{PREFIX}/lookup", lookup)
