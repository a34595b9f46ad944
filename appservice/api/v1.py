"""The legacy ``/_matrix/identity/api/v1`` endpoints that homeservers and old clients still call.

The key endpoints are always served: ``key_validity_url`` values naming the v1 paths live on in
rooms' invite events (from older servers, or imported from sydent), and a homeserver asks them
when the invitee joins. ``3pid/unbind`` is always served too, by ``bind.py`` (it is authorised
like v2's). Everything else only with ``api.v1_enabled`` (off by default: v1 has no
authentication), else 404 ``M_UNRECOGNIZED``:

- ``GET /`` (status), ``GET /lookup``, ``POST /bulk_lookup`` (limited per client IP),
- ``POST /validate/email/requestToken``, ``POST`` and ``GET /validate/email/submitToken``,
  ``GET /validate/msisdn/submitToken`` (the email/SMS link),
- ``POST /3pid/bind``, ``POST /store-invite``, ``POST /sign-ed25519``.

The msisdn ``requestToken``/``submitToken`` (POST) and ``3pid/getValidated3pid`` belong to
``msisdn_delegate.py``, which registers them for the delegate and for v1 alike.

Each calls the v2 service without an account: no access token and no terms; the per-IP and
per-address rate limits, validation and session rules are v2's. The POST bodies are v2's; as v1
servers (sydent) did, a handler also takes its parameters from an
``application/x-www-form-urlencoded`` body (old homeservers posted store-invite that way) and
from the query string, for the fields the body does not have (Element posts ``{mxid}`` or nothing
to the invite email's ``signurl``, which carries the token and the key). docs/v1-api.md has the
table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from appservice.api import keys
from appservice.api.context import ApiContext
from appservice.api.http import (
    client_ip,
    int_field,
    json_body,
    json_response,
    optional_string_field,
    query_param,
    require_fields,
    string_field,
)
from appservice.api.invites import store_invite_request
from appservice.api.validation import submit_token_answer, submit_token_link_handler
from appservice.errors import bad_json, invalid_param
from appservice.threepid import user_id_server

PREFIX = "/_matrix/identity/api/v1"
FORM = "application/x-www-form-urlencoded"
# More parameters than any v1 endpoint has, with room for the extras store-invite may get.
_MAX_FIELDS = 100


def _single_values(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A parameter given twice is ambiguous: 400 M_INVALID_PARAM rather than a guess."""
    values: dict[str, str] = {}
    for name, value in pairs:
        if name in values:
            raise invalid_param(f"{name} is given more than once")
        values[name] = value
    return values


async def v1_args(request: web.Request) -> dict[str, Any]:
    """The parameters of a v1 request: the JSON object body (as v2), or a form body, with the
    query string's parameters for the names the body does not have. An empty body or JSON
    ``null`` means: the query string only."""
    raw = await request.read()
    stripped = raw.strip()
    body: dict[str, Any] = {}
    if request.content_type == FORM and not stripped.startswith(b"{"):
        try:
            pairs = parse_qsl(
                raw.decode("utf-8"),
                keep_blank_values=True,
                max_num_fields=_MAX_FIELDS,
                errors="strict",
            )
        except UnicodeDecodeError as e:
            raise invalid_param("Form parameters must be UTF-8") from e
        except ValueError as e:  # more fields than _MAX_FIELDS
            raise invalid_param("Too many form parameters") from e
        body = _single_values(pairs)
    elif stripped and stripped != b"null":
        body = await json_body(request)
    if len(request.query) > _MAX_FIELDS:
        raise invalid_param("Too many query parameters")
    return {**_single_values(request.query.items()), **body}


def _form_int(args: dict[str, Any], name: str) -> int:
    """An integer parameter, which a form or query string gives as digits."""
    value = args.get(name)
    if isinstance(value, str) and 0 < len(value) <= 20 and value.isascii() and value.isdigit():
        args[name] = int(value)
    return int_field(args, name)


def add_routes(router: web.UrlDispatcher, ctx: ApiContext) -> None:
    """Register the v1 handlers (unauthenticated, as v1 was)."""

    def user_server(user_id: str, name: str) -> str:
        """The homeserver of a user ID the caller names; it must be one whose users may use
        this server (``accounts.allowed_homeservers``), as v2 registration requires."""
        server = user_id_server(user_id)
        if server is None:
            raise invalid_param(f"{name} must be a Matrix user ID")
        ctx.accounts.require_allowed_homeserver(server)
        return server

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

    async def request_email_token(request: web.Request) -> web.Response:
        args = await v1_args(request)
        require_fields(args, "client_secret", "email", "send_attempt")
        sid = await ctx.sessions.request_email_token(
            client_secret=string_field(args, "client_secret"),
            email=string_field(args, "email"),
            send_attempt=_form_int(args, "send_attempt"),
            next_link=optional_string_field(args, "next_link"),
            requester_ip=client_ip(request, ctx.trusted_proxies),
        )
        return json_response({"sid": sid})

    async def submit_email_token(request: web.Request) -> web.Response:
        args = await v1_args(request)
        return await submit_token_answer(ctx, args)

    async def bind(request: web.Request) -> web.Response:
        args = await v1_args(request)
        require_fields(args, "sid", "client_secret", "mxid")
        mxid = string_field(args, "mxid")
        user_server(mxid, "mxid")
        # No account: the validated session (its client_secret) is the only proof, and the
        # 3PID is bound to the mxid given, as v1 did.
        association = await ctx.bindings.bind(
            string_field(args, "sid"), string_field(args, "client_secret"), mxid, caller=None
        )
        return json_response(association)

    async def store_invite(request: web.Request) -> web.Response:
        invite = store_invite_request(await v1_args(request))
        user_server(invite.sender, "sender")
        answer = await ctx.invites.store_invite(
            invite, caller=None, requester_ip=client_ip(request, ctx.trusted_proxies)
        )
        return json_response(answer)

    async def sign_ed25519(request: web.Request) -> web.Response:
        args = await v1_args(request)
        require_fields(args, "mxid", "token", "private_key")
        signed = await ctx.invites.sign_ed25519(
            string_field(args, "mxid"),
            string_field(args, "token"),
            string_field(args, "private_key"),
        )
        return json_response(signed)

    if ctx.v1_enabled:
        router.add_get(PREFIX, status)
        router.add_get(f"{PREFIX}/lookup", lookup)
        router.add_post(f"{PREFIX}/bulk_lookup", bulk_lookup)
        router.add_post(f"{PREFIX}/validate/email/requestToken", request_email_token)
        router.add_post(f"{PREFIX}/validate/email/submitToken", submit_email_token)
        submit_token_link = submit_token_link_handler(ctx)
        router.add_get(f"{PREFIX}/validate/email/submitToken", submit_token_link)
        # The msisdn requestToken and POST submitToken are msisdn_delegate.py's.
        router.add_get(f"{PREFIX}/validate/msisdn/submitToken", submit_token_link)
        router.add_post(f"{PREFIX}/3pid/bind", bind)
        router.add_post(f"{PREFIX}/store-invite", store_invite)
        router.add_post(f"{PREFIX}/sign-ed25519", sign_ed25519)
    keys.add_routes(router, ctx, PREFIX)
