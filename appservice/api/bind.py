"""``/v2/3pid/bind`` and ``/v2/3pid/unbind`` (also the legacy v1 unbind path)."""

from __future__ import annotations

from aiohttp import web

from appservice.api.context import ApiContext
from appservice.api.http import json_body, json_response, require_fields, string_field
from appservice.errors import bad_json

PREFIX = "/_matrix/identity/v2"


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the handlers of this module."""

    async def bind(request: web.Request) -> web.Response:
        user_id = await ctx.user_id(request)
        body = await json_body(request)
        require_fields(body, "sid", "client_secret", "mxid")
        association = await ctx.bindings.bind(
            string_field(body, "sid"),
            string_field(body, "client_secret"),
            string_field(body, "mxid"),
            caller=user_id,
        )
        return json_response(association)

    async def unbind(request: web.Request) -> web.Response:
        body = await json_body(request)
        require_fields(body, "mxid", "threepid")
        threepid = body["threepid"]
        if not isinstance(threepid, dict):
            raise bad_json("threepid must be an object with medium and address")
        require_fields(threepid, "medium", "address")
        has_session = "sid" in body and "client_secret" in body
        await ctx.bindings.unbind(
            mxid=string_field(body, "mxid"),
            medium=string_field(threepid, "medium"),
            address=string_field(threepid, "address"),
            sid=string_field(body, "sid") if has_session else None,
            client_secret=string_field(body, "client_secret") if has_session else None,
            authorization=request.headers.get("Authorization"),
            method=request.method,
            uri=request.raw_path,
            body=body,
        )
        return json_response({})

    router.add_post(f"{PREFIX}/3pid/bind", bind)
    router.add_post(f"{PREFIX}/3pid/unbind", unbind)
    # Authenticated like the v2 path, so served whatever api.v1_enabled says (older homeservers
    # unbind through it).
    router.add_post("/_matrix/identity/api/v1/3pid/unbind", unbind)
