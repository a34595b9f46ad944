"""Verify a homeserver's ``Authorization: X-Matrix`` request signature.

Used by ``POST /_matrix/identity/v2/3pid/unbind``: Synapse signs that request with its server key.
The header is::

    X-Matrix origin="hs.example",destination="id.example",key="ed25519:abc",sig="<base64>"

and the signature covers the canonical JSON of::

    {"method": "POST", "uri": "/_matrix/identity/v2/3pid/unbind", "origin": "hs.example",
     "destination_is": "id.example", "content": {...}}

Synapse puts ``destination_is`` (the ``id_server`` the client named) where homeserver-to-homeserver
requests have ``destination``; both forms are accepted. The key comes from the origin's
``/_matrix/key/v2/server`` through a :class:`~appservice.federation.server_keys.ServerKeyFetcher`.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from signedjson.sign import SignatureVerifyException, verify_signed_json

from appservice.federation.discovery import FederationError, is_valid_server_name
from appservice.federation.server_keys import (
    ServerKeyFetcher,
    decode_base64_strict,
    is_integer_json,
    is_supported_key_id,
)

SCHEME = "x-matrix"
_MAX_HEADER_LENGTH = 8192
_ED25519_SIGNATURE_LENGTH = 64
_SCHEME_RE = re.compile(r"(?P<scheme>[!-~]+)(?:[ \t]+(?P<params>.*))?", re.DOTALL)
# RFC 9110 token characters (parameter names).
_TOKEN_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", re.ASCII)
# Unquoted values: anything up to a comma or whitespace, so "ed25519:abc" and "hs:8448" work.
_BARE_VALUE_RE = re.compile(r'[^\s,"\\]+')
_OWS = " \t"
# Parameter names (lower case) to the field they fill; "signature" is the spec prose's name.
_KNOWN_PARAMS = {
    "origin": "origin",
    "destination": "destination",
    "key": "key",
    "sig": "sig",
    "signature": "sig",
}


@dataclass(frozen=True)
class XMatrixAuthorization:
    """The parameters of an ``X-Matrix`` Authorization header."""

    origin: str
    destination: str | None
    key: str
    sig: str


class XMatrixError(Exception):
    """The request's X-Matrix authentication is missing or not valid.

    ``reason`` is for the log; ``public_reason`` (the same unless given) is safe to return to the
    client, who may be anyone: it never says why the origin's keys could not be fetched (a
    connection error names hosts, ports and what listens there). ``status`` is the HTTP status to
    answer with (401; the caller chooses the Matrix errcode, such as ``M_UNAUTHORIZED``).
    """

    def __init__(self, reason: str, status: int = 401, *, public_reason: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.public_reason = reason if public_reason is None else public_reason
        self.status = status


def _skip_ows(header: str, pos: int) -> int:
    while pos < len(header) and header[pos] in _OWS:
        pos += 1
    return pos


def _quoted_string(header: str, pos: int) -> tuple[str, int]:
    """Parse the quoted string starting at ``header[pos] == '"'``; returns value and end."""
    chars: list[str] = []
    pos += 1
    while pos < len(header):
        char = header[pos]
        if char == '"':
            return "".join(chars), pos + 1
        if char == "\\":
            pos += 1
            if pos == len(header):
                break
            char = header[pos]
        if not char.isprintable() and char != "\t":
            raise ValueError("control character in a quoted value")
        chars.append(char)
        pos += 1
    raise ValueError("unterminated quoted value")


def parse_x_matrix(header: str) -> XMatrixAuthorization:
    """Parse an ``Authorization`` header value of scheme ``X-Matrix``.

    The scheme and parameter names are case-insensitive, parameters come in any order, values
    are quoted strings (backslash escapes) or bare values (which may contain colons), unknown
    parameters are ignored and ``signature`` is accepted for ``sig``. ``origin``, ``key`` and
    ``sig`` are required and ``origin`` must be a valid server name. Raises :class:`ValueError`
    otherwise (including for a repeated parameter).
    """
    if len(header) > _MAX_HEADER_LENGTH:
        raise ValueError("header too long")
    scheme_match = _SCHEME_RE.fullmatch(header.strip(_OWS))
    if scheme_match is None or scheme_match["scheme"].lower() != SCHEME:
        raise ValueError("not an X-Matrix Authorization header")
    rest = scheme_match["params"] or ""
    params: dict[str, str] = {}
    pos = 0
    while True:
        # Empty list elements (",,") are allowed, as in RFC 9110 lists.
        while True:
            pos = _skip_ows(rest, pos)
            if pos < len(rest) and rest[pos] == ",":
                pos += 1
                continue
            break
        if pos == len(rest):
            break
        name_match = _TOKEN_RE.match(rest, pos)
        if name_match is None:
            raise ValueError("expected a parameter name")
        name = name_match.group().lower()
        pos = _skip_ows(rest, name_match.end())
        if pos == len(rest) or rest[pos] != "=":
            raise ValueError(f"parameter {name[:32]!r} has no value")
        pos = _skip_ows(rest, pos + 1)
        if pos < len(rest) and rest[pos] == '"':
            value, pos = _quoted_string(rest, pos)
        else:
            value_match = _BARE_VALUE_RE.match(rest, pos)
            if value_match is None:
                raise ValueError(f"parameter {name[:32]!r} has no value")
            value, pos = value_match.group(), value_match.end()
            if not value.isprintable():
                raise ValueError("control character in a value")
        pos = _skip_ows(rest, pos)
        if pos < len(rest) and rest[pos] != ",":
            raise ValueError("expected a comma between parameters")
        field = _KNOWN_PARAMS.get(name)
        if field is None:
            continue
        if field in params:
            raise ValueError(f"parameter {field!r} given more than once")
        params[field] = value
    for required in ("origin", "key", "sig"):
        if not params.get(required):
            raise ValueError(f"missing {required!r} parameter")
    if not is_valid_server_name(params["origin"]):
        raise ValueError("origin is not a valid server name")
    return XMatrixAuthorization(
        origin=params["origin"],
        destination=params.get("destination"),
        key=params["key"],
        sig=params["sig"],
    )


async def verify_x_matrix(
    fetcher: ServerKeyFetcher,
    header: str | None,
    method: str,
    uri: str,
    content: Any | None,
    own_names: Collection[str],
) -> str:
    """Verify the X-Matrix ``header`` of a request and return the homeserver that signed it.

    ``method`` is the request method, ``uri`` the path and query exactly as received (aiohttp:
    ``request.raw_path``), ``content`` the parsed JSON body or ``None`` when the request has no
    body, ``own_names`` the names this server answers to (such as ``id.example.com`` and
    ``id.example.com:8090``, exactly as clients give them as ``id_server``).

    The header's ``destination``, when present, must be one of ``own_names``; without it each of
    ``own_names`` is tried. The signature may cover ``destination_is`` (Synapse's form for
    identity servers) or ``destination``. Raises :class:`XMatrixError` (401) when the header is
    missing or malformed, is for another destination, the origin's keys cannot be fetched, or the
    signature does not verify.
    """
    if not header:
        raise XMatrixError("missing X-Matrix Authorization header")
    try:
        auth = parse_x_matrix(header)
    except ValueError as exc:
        raise XMatrixError(f"malformed X-Matrix Authorization header: {exc}") from None
    if auth.destination is not None:
        if auth.destination not in own_names:
            raise XMatrixError("the request is signed for a different destination")
        names: Collection[str] = (auth.destination,)
    else:
        names = own_names
    if not names:
        raise XMatrixError("this server has no name to check the destination against")
    if not is_supported_key_id(auth.key):
        raise XMatrixError("unsupported signing key (only ed25519 keys are supported)")
    try:
        signature_ok = len(decode_base64_strict(auth.sig)) == _ED25519_SIGNATURE_LENGTH
    except ValueError:
        signature_ok = False
    if not signature_ok:
        raise XMatrixError("malformed signature in the X-Matrix Authorization header")
    if content is not None and not is_integer_json(content):
        raise XMatrixError(
            "the request body is not canonical JSON (non-integer number or too deeply nested)"
        )
    try:
        verify_key = await fetcher.verify_key(auth.origin, auth.key)
    except FederationError as exc:
        # "could not fetch the keys of <origin>: <why>" or "<origin> has no current key <id>".
        raise XMatrixError(
            f"could not verify the X-Matrix signature: {exc}",
            public_reason=f"could not verify the X-Matrix signature: no usable key {auth.key} "
            f"of {auth.origin}",
        ) from None
    for name in names:
        for destination_field in ("destination_is", "destination"):
            signed: dict[str, Any] = {
                "method": method,
                "uri": uri,
                "origin": auth.origin,
                destination_field: name,
                "signatures": {auth.origin: {auth.key: auth.sig}},
            }
            if content is not None:
                signed["content"] = content
            try:
                verify_signed_json(signed, auth.origin, verify_key)
            except SignatureVerifyException:
                continue
            except (ValueError, TypeError, RecursionError):
                raise XMatrixError("the request cannot be encoded as canonical JSON") from None
            return auth.origin
    raise XMatrixError(
        "the X-Matrix signature does not match this request (method, URI, body or destination)"
    )
