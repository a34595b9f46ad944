"""``/v2/account``: register with an OpenID token, who am I, logout."""

from __future__ import annotations

from aiohttp import web

from appservice.api.context import ApiContext
from appservice.api.http import (
    access_token,
    client_ip,
    int_field,
    json_body,
    json_response,
    require_fields,
    string_field,
)
from appservice.errors import invalid_param

PREFIX = "/_matrix/identity/v2/account"


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the handlers of this module."""

    async def register(request: web.Request) -> web.Response:
        body = await json_body(request)
        # Only what is checked is required: the token, verified with the homeserver. Clients
        # and tools that send just {access_token, matrix_server_name} are served (as by
        # sydent); token_type defaults to Bearer and expires_in is checked only when given.
        require_fields(body, "access_token", "matrix_server_name")
        openid_token = string_field(body, "access_token")
        server_name = string_field(body, "matrix_server_name")
        if body.get("token_type") is not None and string_field(body, "token_type") != "Bearer":
            raise invalid_param("token_type must be Bearer")
        if body.get("expires_in") is not None:
            int_field(body, "expires_in")
        token = await ctx.accounts.register(
            openid_token, server_name, client_ip(request, ctx.trusted_proxies)
        )
        return json_response({"token": token})

    async def whoami(request: web.Request) -> web.Response:
        return json_response({"user_id": await ctx.user_id(request)})

    async def logout(request: web.Request) -> web.Response:
        await json_body(request, optional=True)
        await ctx.accounts.logout(access_token(request))
        return json_response({})

    router.add_post(f"{PREFIX}/register", register)
    router.add_get(PREFIX, whoami)
    router.add_post(f"{PREFIX}/logout", logout)
