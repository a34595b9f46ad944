"""``/v2/validate/{email,msisdn}/*`` and ``/v2/3pid/getValidated3pid``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from appservice.api.context import ApiContext
from appservice.api.http import (
    Handler,
    client_ip,
    html_response,
    int_field,
    json_body,
    json_response,
    optional_string_field,
    query_param,
    require_fields,
    string_field,
)
from appservice.errors import MatrixError

PREFIX = "/_matrix/identity/v2"


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the handlers of this module."""

    async def request_email_token(request: web.Request) -> web.Response:
        await ctx.user_id(request)
        body = await json_body(request)
        require_fields(body, "client_secret", "email", "send_attempt")
        sid = await ctx.sessions.request_email_token(
            client_secret=string_field(body, "client_secret"),
            email=string_field(body, "email"),
            send_attempt=int_field(body, "send_attempt"),
            next_link=optional_string_field(body, "next_link"),
            requester_ip=client_ip(request, ctx.trusted_proxies),
        )
        return json_response({"sid": sid})

    async def request_msisdn_token(request: web.Request) -> web.Response:
        await ctx.user_id(request)
        body = await json_body(request)
        require_fields(body, "client_secret", "country", "phone_number", "send_attempt")
        sid = await ctx.sessions.request_msisdn_token(
            client_secret=string_field(body, "client_secret"),
            country=string_field(body, "country"),
            phone_number=string_field(body, "phone_number"),
            send_attempt=int_field(body, "send_attempt"),
            next_link=optional_string_field(body, "next_link"),
            requester_ip=client_ip(request, ctx.trusted_proxies),
        )
        return json_response({"sid": sid})

    async def submit_token(request: web.Request) -> web.Response:
        await ctx.user_id(request)
        body = await json_body(request)
        return await submit_token_answer(ctx, body)

    async def get_validated_threepid(request: web.Request) -> web.Response:
        await ctx.user_id(request)
        return await validated_threepid_answer(ctx, request)

    submit_token_link = submit_token_link_handler(ctx)
    for medium, request_token in (
        ("email", request_email_token),
        ("msisdn", request_msisdn_token),
    ):
        router.add_post(f"{PREFIX}/validate/{medium}/requestToken", request_token)
        router.add_post(f"{PREFIX}/validate/{medium}/submitToken", submit_token)
        router.add_get(f"{PREFIX}/validate/{medium}/submitToken", submit_token_link)
    router.add_get(f"{PREFIX}/3pid/getValidated3pid", get_validated_threepid)


async def submit_token_answer(ctx: ApiContext, args: dict[str, Any]) -> web.Response:
    """Check a session's token given as ``sid``, ``client_secret`` and ``token`` (a v2 JSON body,
    or the v1 and SMS-delegate forms): ``{"success": true}``."""
    require_fields(args, "sid", "client_secret", "token")
    await ctx.sessions.submit_token(
        string_field(args, "sid"),
        string_field(args, "client_secret"),
        string_field(args, "token"),
    )
    return json_response({"success": True})


async def validated_threepid_answer(ctx: ApiContext, request: web.Request) -> web.Response:
    """The validated 3PID of the session named by the query's ``sid`` and ``client_secret``."""
    threepid = await ctx.sessions.validated_threepid(
        query_param(request, "sid"), query_param(request, "client_secret")
    )
    return json_response(
        {
            "medium": threepid.medium,
            "address": threepid.address,
            "validated_at": threepid.validated_at,
        }
    )


def submit_token_link_handler(ctx: ApiContext) -> Handler:
    """``GET .../submitToken``, the link in the email (also the legacy v1 path's): no access
    token, answers a web page (or a redirect to the session's next_link)."""

    async def submit_token_link(request: web.Request) -> web.StreamResponse:
        try:
            result = await ctx.sessions.submit_token(
                query_param(request, "sid"),
                query_param(request, "client_secret"),
                query_param(request, "token"),
            )
        except MatrixError as e:
            return _page(ctx, "validation_failure.html", e.status, reason=e.error)
        if result.next_link is not None and ctx.sessions.follows_next_link(result.next_link):
            raise web.HTTPFound(result.next_link)
        return _page(ctx, "validation_success.html", 200)

    return submit_token_link


def _page(ctx: ApiContext, name: str, status: int, **variables: Any) -> web.Response:
    return html_response(ctx.render_page(name, **variables), status)
