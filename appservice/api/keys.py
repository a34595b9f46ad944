"""``/pubkey``: our public keys and their validity (v2, and v1 when enabled)."""

from __future__ import annotations

from aiohttp import web

from appservice.api.context import ApiContext
from appservice.api.http import json_response, query_param


def add_routes(router: web.UrlDispatcher, ctx: ApiContext, prefix: str) -> None:
    """Register the key handlers under ``prefix`` (the v2 or the legacy v1 base path)."""

    async def ephemeral_is_valid(request: web.Request) -> web.Response:
        valid = await ctx.keys.ephemeral_is_valid(query_param(request, "public_key"))
        return json_response({"valid": valid})

    async def is_valid(request: web.Request) -> web.Response:
        return json_response({"valid": await ctx.keys.is_valid(query_param(request, "public_key"))})

    async def pubkey(request: web.Request) -> web.Response:
        public_key = await ctx.keys.public_key(request.match_info["key_id"])
        return json_response({"public_key": public_key})

    # The fixed paths are registered first so that "isvalid" is not taken for a key id.
    router.add_get(f"{prefix}/pubkey/ephemeral/isvalid", ephemeral_is_valid)
    router.add_get(f"{prefix}/pubkey/isvalid", is_valid)
    router.add_get(f"{prefix}/pubkey/{{key_id}}", pubkey)
