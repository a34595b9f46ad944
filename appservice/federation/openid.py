"""OpenID userinfo: exchange a homeserver-issued OpenID token for the user's Matrix ID."""

from __future__ import annotations

from appservice.federation.client import FederationClient
from appservice.federation.discovery import FederationError, is_valid_server_name

USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"
_MAX_TOKEN_LENGTH = 4096
_MAX_USER_ID_BYTES = 255


class OpenIdError(FederationError):
    """The OpenID token could not be exchanged for a user ID.

    ``status`` is the homeserver's HTTP status when it answered (401 for an unknown or expired
    token), ``None`` for invalid input or a malformed answer.
    """

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _user_id_server(user_id: str) -> str | None:
    """The server part of a syntactically valid user ID, else ``None``.

    Historical localparts (any printable ASCII except ``:``) are accepted: the homeserver vouches
    for its own users, and old accounts may predate the stricter grammar.
    """
    if len(user_id.encode("utf-8")) > _MAX_USER_ID_BYTES or not user_id.startswith("@"):
        return None
    localpart, sep, server = user_id[1:].partition(":")
    if not sep or not localpart:
        return None
    if not all("\x21" <= c <= "\x7e" for c in localpart):
        return None
    return server if is_valid_server_name(server) else None


async def fetch_openid_user(client: FederationClient, server_name: str, access_token: str) -> str:
    """Ask ``server_name`` who owns ``access_token`` and return that user's Matrix ID.

    The server name is validated before any network traffic, and the returned ``sub`` must
    belong to exactly ``server_name``. Raises :class:`OpenIdError` for a rejected token or a
    bad answer, and :class:`FederationError` when the homeserver cannot be reached.
    """
    if not is_valid_server_name(server_name):
        raise OpenIdError("invalid matrix_server_name")
    if not access_token or len(access_token) > _MAX_TOKEN_LENGTH or not access_token.isprintable():
        raise OpenIdError("invalid OpenID access token")
    status, body = await client.get_json(
        server_name, USERINFO_PATH, query={"access_token": access_token}
    )
    if status == 401:
        raise OpenIdError("the homeserver did not accept the OpenID token", status)
    if status != 200:
        raise OpenIdError(f"OpenID userinfo failed with HTTP {status}", status)
    sub = body.get("sub") if isinstance(body, dict) else None
    if not isinstance(sub, str):
        raise OpenIdError("OpenID userinfo response has no valid 'sub'", status)
    sub_server = _user_id_server(sub)
    if sub_server is None:
        raise OpenIdError("OpenID userinfo returned an invalid user ID", status)
    if sub_server != server_name:
        raise OpenIdError("OpenID userinfo returned a user of a different server", status)
    return sub
