"""Shared HTTP plumbing: Matrix error responses, CORS, JSON bodies, access tokens."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from itertools import repeat
from typing import Any
from urllib.parse import unquote_plus

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from appservice.errors import MatrixError, bad_json, invalid_param, missing_params
from appservice.logs import REQUEST_ID, install_record_factory, new_request_id

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Origin, X-Requested-With, Content-Type, Accept, Authorization",
}

# The web pages (the validation result): nothing to run, frame, submit or load. The built-in
# templates style themselves with an inline <style> element; an operator's may add data: images.
PAGE_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "frame-ancestors 'none'; form-action 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_STATUS_ERRCODES = {
    404: ("M_UNRECOGNIZED", "Unrecognized request"),
    405: ("M_UNRECOGNIZED", "Unrecognized request method"),
    413: ("M_TOO_LARGE", "Request body too large"),
}


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response (compact, UTF-8)."""
    return web.Response(
        body=encode_json(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def encode_json(body: Any) -> bytes:
    """Compact UTF-8 JSON, through orjson (a 1,000-entry lookup answer in a tenth of the time
    of the standard library's encoder)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        # orjson refuses what the standard library accepts: non-string keys, integers beyond
        # 64 bits. Such a body is rare and small.
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def error_response(error: MatrixError) -> web.Response:
    """The JSON response of a Matrix error."""
    return json_response(error.body(), error.status, error.headers)


def html_response(text: str, status: int = 200) -> web.Response:
    """A web page (UTF-8 HTML) with :data:`PAGE_SECURITY_HEADERS`."""
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers=PAGE_SECURITY_HEADERS,
    )


@web.middleware
async def matrix_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer preflights, turn every failure into a Matrix error and add CORS headers."""
    if request.method == "OPTIONS":
        response: web.StreamResponse = web.Response(status=200)
    else:
        try:
            response = await handler(request)
        except MatrixError as e:
            response = error_response(e)
        except web.HTTPException as e:
            if e.status in _STATUS_ERRCODES:
                errcode, message = _STATUS_ERRCODES[e.status]
                headers: dict[str, str] = {}
                if isinstance(e, web.HTTPMethodNotAllowed):
                    # RFC 9110: a 405 lists the resource's methods; preflights are answered
                    # everywhere (above).
                    headers["Allow"] = ", ".join(sorted(e.allowed_methods | {"OPTIONS"}))
                response = error_response(MatrixError(e.status, errcode, message, headers=headers))
            elif e.status >= 400:
                response = error_response(MatrixError(e.status, "M_UNKNOWN", e.reason))
            else:  # a redirect, which aiohttp sends from the exception itself
                e.headers.update(CORS_HEADERS)
                raise
        except web.RequestPayloadError as e:
            # A body aiohttp could not decode (broken chunks, bad gzip): the client's doing.
            log.warning(
                "malformed HTTP request body from %s: %s", request.remote, _parse_error_reason(e)
            )
            response = error_response(MatrixError(400, "M_UNKNOWN", "Malformed request body"))
        except Exception as e:
            if isinstance(e, ConnectionResetError) and _client_gone(request):
                # The client left mid-request (a body cut short): nothing to answer or fix.
                log.info(
                    "%s closed the connection during %s %s",
                    request.remote,
                    request.method,
                    request.path,
                )
            else:
                log.exception("unhandled error in %s %s", request.method, request.path)
            response = error_response(MatrixError(500, "M_UNKNOWN", "Internal server error"))
    response.headers.update(CORS_HEADERS)
    return response


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def json_body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object (400 M_NOT_JSON / M_BAD_JSON otherwise)."""
    raw = await request.read()
    if not raw.strip() and optional:
        return {}
    try:
        # orjson rejects what the spec's JSON does not allow: NaN and Infinity, invalid UTF-8
        # and lone surrogates, nesting deeper than 1,024.
        body = orjson.loads(raw)
    except ValueError as e:
        raise MatrixError(400, "M_NOT_JSON", "Content not JSON") from e
    if not isinstance(body, dict):
        raise bad_json("The body must be a JSON object")
    return body


def require_fields(body: dict[str, Any], *names: str) -> None:
    """400 M_MISSING_PARAMS naming every absent field."""
    missing = [name for name in names if name not in body or body[name] is None]
    if missing:
        raise missing_params(*missing)


def string_field(body: dict[str, Any], name: str) -> str:
    """A required string field."""
    require_fields(body, name)
    value = body[name]
    if not isinstance(value, str):
        raise bad_json(f"{name} must be a string")
    return value


def optional_string_field(body: dict[str, Any], name: str) -> str | None:
    """An optional string field; absent, null or empty is None."""
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad_json(f"{name} must be a string")
    return value


# The integers Matrix's canonical JSON allows; beyond them a value overflows the databases'
# 64-bit columns (or means nothing a client could have counted to).
MAX_JSON_INT = 2**53 - 1


def int_field(body: dict[str, Any], name: str, *, minimum: int = -MAX_JSON_INT) -> int:
    """A required integer field in ``[minimum, 2**53 - 1]`` (400 M_INVALID_PARAM outside)."""
    require_fields(body, name)
    value = body[name]
    range_error = f"{name} must be an integer from {minimum} to {MAX_JSON_INT}"
    if isinstance(value, float) and value.is_integer() and abs(value) > MAX_JSON_INT:
        # orjson reads an integer literal beyond 64 bits as a float: out of range, not "no
        # integer".
        raise invalid_param(range_error)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_json(f"{name} must be an integer")
    if not minimum <= value <= MAX_JSON_INT:
        raise invalid_param(range_error)
    return value


def string_list_field(body: dict[str, Any], name: str) -> list[str]:
    """A required list of strings."""
    require_fields(body, name)
    value = body[name]
    # map() keeps the per-item check in C: up to 10,000 addresses arrive in one lookup.
    if not isinstance(value, list) or not all(map(isinstance, value, repeat(str))):
        raise bad_json(f"{name} must be a list of strings")
    return value


def query_param(request: web.Request, name: str) -> str:
    """A required query parameter (400 M_MISSING_PARAMS when absent)."""
    value = request.query.get(name)
    if value is None:
        raise missing_params(name)
    return value


def access_token(request: web.Request) -> str | None:
    """The access token from ``Authorization: Bearer`` or, as Synapse still sends it, the query."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return request.query.get("access_token") or None


# A query parameter whose decoded, lower-cased name contains one of these is a secret
# (access_token, id_access_token, token, client_secret, private_key, ...).
_SECRET_NAME_PARTS = ("token", "secret", "password", "private")
_QUERY_SEPARATORS = re.compile(r"([&;])")


def _is_secret_name(name: str) -> bool:
    # Decoded as the server decodes it ("%5F", "%5f", "+"), and again while that changes
    # something: too much redacted is harmless, a token in the log is not.
    for _ in range(5):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    folded = name.casefold()
    return any(part in folded for part in _SECRET_NAME_PARTS)


def redact_query(path_qs: str) -> str:
    """``path_qs`` with the value of every secret query parameter replaced by ``<redacted>``."""
    path, question_mark, query = path_qs.partition("?")
    if not question_mark:
        return path_qs
    # Split on ";" too: more than the server splits on, so never less redacted.
    parts = _QUERY_SEPARATORS.split(query)
    for i in range(0, len(parts), 2):
        name, equals, _ = parts[i].partition("=")
        if equals and _is_secret_name(name):
            parts[i] = f"{name}=<redacted>"
    return f"{path}?{''.join(parts)}"


class MalformedRequestFilter(logging.Filter):
    """Turns aiohttp's record of a request it could not parse (an ERROR with a traceback, which
    anyone can cause at will) into one WARNING line with the peer and the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError) and record.levelno > logging.WARNING:
            # aiohttp reading past a body it could not decode: the request was answered and
            # reported already (here or by matrix_middleware).
            return False
        if isinstance(exc, HttpProcessingError) and record.levelno > logging.WARNING:
            # aiohttp logs "Error handling request from %s" with the peer as the only argument.
            args = record.args if isinstance(record.args, tuple) else ()
            peer = args[0] if len(args) == 1 else "an unknown peer"
            record.msg = "malformed HTTP request from %s: %s"
            record.args = (peer, _parse_error_reason(exc))
            record.levelno, record.levelname = (
                logging.WARNING,
                logging.getLevelName(logging.WARNING),
            )
            record.exc_info = record.exc_text = None
        return True


def _parse_error_reason(exc: Exception) -> str:
    # aiohttp's message spans lines: the reason, the offending line as a bytes repr (printable
    # ASCII already), a caret under the bad character.
    if isinstance(exc, web.RequestPayloadError) and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__
    message = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    lines = [line.strip() for line in str(message).splitlines()]
    text = " ".join(line for line in lines if line and line.strip("^ ")) or type(exc).__name__
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= 200 else text[:199] + "…"


# The aiohttp server logger of our listeners (pass as ``logger=`` to ``web.AppRunner``).
SERVER_LOG = logging.getLogger(f"{__name__}.server")
SERVER_LOG.addFilter(MalformedRequestFilter())


class RedactingAccessLogger(AbstractAccessLogger):
    """One line per request, with secrets in the query string replaced; the request's id, route
    template, method, status and duration go as fields too (for JSON lines)."""

    @property
    def enabled(self) -> bool:
        """Whether the line would be written (``logging.levels: {aiohttp.access: WARNING}``
        turns it off): aiohttp then skips the call, and its timing, altogether."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = redact_query(request.path_qs)
        duration_ms = round(time * 1000, 1)
        request_id = request.get(REQUEST_ID_KEY)
        token = REQUEST_ID.set(request_id) if request_id else None
        try:
            self.logger.info(
                "%s %s %s %d %.1fms",
                request.remote,
                request.method,
                path,
                response.status,
                duration_ms,
                extra={
                    "remote": request.remote,
                    "method": request.method,
                    "path": path,
                    "route": route_template(request),
                    "status": response.status,
                    "duration_ms": duration_ms,
                },
            )
        finally:
            if token is not None:
                REQUEST_ID.reset(token)


def route_template(request: web.BaseRequest) -> str | None:
    """The matched route's path template (``/_matrix/identity/v2/pubkey/{keyId}``), None when
    no route matched: the same for every request of an endpoint, without its parameters."""
    try:
        match_info = getattr(request, "match_info", None)
    except AssertionError:  # aiohttp's own answer to a request it could not parse: no routing
        return None
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None:
        return None
    return str(resource.canonical)


REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_KEY = web.RequestKey("request_id", str)


class RequestTracker:
    """Gives each request an id, in the log context of its handling and the ``X-Request-ID``
    response header, and counts the requests in flight (what a shutdown waits for)."""

    def __init__(self) -> None:
        install_record_factory()  # every log record carries the id of its request
        self.in_flight = 0
        # Handlers cancelled (a client gone, or a shutdown that stopped waiting).
        self.cancelled = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The outermost middleware of a web app."""
        request_id = new_request_id()
        # aiohttp runs each request in a task of its own (a copy of the context), so the id
        # stays with this request, its access log line included, and is gone after it.
        REQUEST_ID.set(request_id)
        request[REQUEST_ID_KEY] = request_id
        self.in_flight += 1
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        except web.HTTPException as e:  # a redirect, sent from the exception itself
            e.headers[REQUEST_ID_HEADER] = request_id
            raise
        finally:
            self.in_flight -= 1
        response.headers[REQUEST_ID_HEADER] = request_id
        return response


def client_ip(request: web.Request, trusted_proxies: Sequence[IPNetwork]) -> str:
    """The client's address: the peer, or from X-Forwarded-For when the peer is a trusted proxy.

    The header is read right to left, skipping trusted proxies, so a client cannot spoof it by
    sending its own X-Forwarded-For.
    """
    peer = request.remote or ""

    def trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in trusted_proxies)

    if not trusted(peer):
        return peer
    hops = [
        hop.strip()
        for header in request.headers.getall("X-Forwarded-For", [])
        for hop in header.split(",")
    ]
    for hop in reversed(hops):
        if not trusted(hop):
            return hop
    return peer
