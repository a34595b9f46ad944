"""``/v2/terms``: the policies, and accepting them."""

from __future__ import annotations

from aiohttp import web

from appservice.api.context import ApiContext
from appservice.api.http import json_body, json_response, string_list_field

PATH = "/_matrix/identity/v2/terms"


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the handlers of this module."""

    async def get_terms(_request: web.Request) -> web.Response:
        return json_response(ctx.terms.policies())

    async def accept_terms(request: web.Request) -> web.Response:
        user_id = await ctx.user_id(request, enforce_terms=False)
        body = await json_body(request)
        await ctx.terms.accept(user_id, string_list_field(body, "user_accepts"))
        return json_response({})

    router.add_get(PATH, get_terms)
    router.add_post(PATH, accept_terms)
