"""The federation HTTP client: JSON requests to homeservers, resolved by server discovery.

One :class:`FederationClient` owns one aiohttp session. Every connection, including the
well-known fetches of server discovery, goes through the SSRF guard, verifies TLS against the
system CAs plus an optional extra CA file, and runs under a total timeout. Failures raise
:class:`FederationError` with a message that names the server and the kind of failure but never
the query string (which may hold an OpenID access token) or the request body.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from appservice.federation.discovery import (
    WELL_KNOWN_PATH,
    DnsSrvResolver,
    FederationError,
    ResolvedServer,
    ServerDiscovery,
    SrvResolver,
    WellKnownResponse,
)
from appservice.federation.guard import AddressGuard, AddressNotAllowedError, GuardedResolver

DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
_WELL_KNOWN_MAX_BYTES = 64 * 1024
_MAX_REDIRECTS = 5
# SRV can list many targets; trying a few bounds the total time of one call.
_MAX_ENDPOINTS_TRIED = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class _ConnectFailed(FederationError):
    """No connection was established, so the next endpoint may be tried."""


def _parse_json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _check_path(path: str) -> None:
    if (
        not path.startswith("/")
        or not path.isascii()
        or not path.isprintable()
        or any(c in path for c in "?# ")
    ):
        raise ValueError("path must be an absolute, percent-encoded path without query")


class FederationClient:
    """Makes JSON requests to other Matrix servers.

    ``overrides`` maps server names to base URLs (see :class:`ServerDiscovery`).
    ``allowed_networks`` lists CIDRs that may be reached even though they are not public
    (for example ``["127.0.0.0/8", "::1/128"]`` for a homeserver on loopback); override URLs are
    guarded too. ``ca_file`` adds a CA bundle to the system CAs. ``verify_tls=False`` disables
    certificate verification (development only). ``timeout_s`` bounds every HTTP request and DNS
    lookup. ``srv_resolver`` replaces DNS SRV lookups (tests). ``well_known_port`` is the port of
    well-known fetches (443 per the spec; tests change it).

    The aiohttp session is created on first use inside the running loop; call :meth:`close`.
    """

    def __init__(
        self,
        overrides: Mapping[str, str] | None = None,
        allowed_networks: Sequence[str] = (),
        ca_file: str | None = None,
        verify_tls: bool = True,
        timeout_s: float = 10.0,
        srv_resolver: SrvResolver | None = None,
        *,
        well_known_port: int = 443,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        user_agent: str = "matrix-identity-appservice",
    ) -> None:
        self._guard = AddressGuard(allowed_networks)
        self._ssl_context = ssl.create_default_context()
        if ca_file:
            self._ssl_context.load_verify_locations(cafile=ca_file)
        if not verify_tls:
            self._ssl_context.check_hostname = False
            self._ssl_context.verify_mode = ssl.CERT_NONE
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._timeout_s = timeout_s
        self._max_response_bytes = max_response_bytes
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.discovery = ServerDiscovery(
            self._fetch_well_known,
            srv_resolver or DnsSrvResolver(timeout_s),
            overrides,
            well_known_port=well_known_port,
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise FederationError("federation client is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self._guard),
                ssl=self._ssl_context,
                limit=100,
                limit_per_host=10,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": self._user_agent},
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        """Close the HTTP session; later requests raise :class:`FederationError`."""
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def get_json(
        self, server_name: str, path: str, query: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """``GET`` ``path`` (percent-encoded) on ``server_name``.

        Returns the status and the parsed JSON body (``None`` if the body is not JSON).
        """
        return await self.request_json("GET", server_name, path, query=query)

    async def post_json(
        self,
        server_name: str,
        path: str,
        body: Any,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """``POST`` ``body`` as JSON to ``path`` on ``server_name``; see :meth:`get_json`."""
        return await self.request_json("POST", server_name, path, body=body, headers=headers)

    async def request_json(
        self,
        method: str,
        server_name: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send a request (with a JSON body unless ``body`` is ``None``) and parse the answer.

        Redirects are not followed. Raises :class:`FederationError` when no HTTP response was
        obtained or it was larger than the size limit.
        """
        _check_path(path)
        resolved = await self.discovery.resolve(server_name)
        # Host is set below so that callers cannot change where the request is routed.
        request_headers = {k: v for k, v in (headers or {}).items() if k.lower() != "host"}
        data: bytes | None = None
        if body is not None:
            data = json.dumps(
                body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode("utf-8")
            request_headers["Content-Type"] = "application/json"
        request_headers["Host"] = resolved.host_header
        last_error: FederationError | None = None
        for endpoint in resolved.endpoints[:_MAX_ENDPOINTS_TRIED]:
            url = self._url(resolved, endpoint.host, endpoint.port, path, query)
            try:
                status, _, raw = await self._exchange(
                    method,
                    url,
                    description=f"{method} {path} on {server_name}",
                    headers=request_headers,
                    data=data,
                    server_hostname=resolved.tls_name,
                    limit=self._max_response_bytes,
                )
            except _ConnectFailed as exc:
                last_error = exc
                continue
            return status, _parse_json(raw)
        assert last_error is not None
        raise last_error

    @staticmethod
    def _url(
        resolved: ResolvedServer,
        host: str,
        port: int,
        path: str,
        query: Mapping[str, str] | None,
    ) -> URL:
        url = URL.build(scheme=resolved.scheme, host=host, port=port).with_path(
            resolved.base_path + path, encoded=True
        )
        return url.with_query(query) if query else url

    async def _fetch_well_known(self, hostname: str, port: int) -> WellKnownResponse:
        """Fetch ``/.well-known/matrix/server``, following HTTPS redirects (guarded)."""
        url = URL.build(scheme="https", host=hostname, port=port).with_path(WELL_KNOWN_PATH)
        seen = {url}
        for _ in range(_MAX_REDIRECTS + 1):
            status, headers, raw = await self._exchange(
                "GET",
                url,
                description=f"well-known lookup for {hostname}",
                headers={},
                data=None,
                server_hostname=None,
                limit=_WELL_KNOWN_MAX_BYTES,
            )
            location = headers.get("Location")
            if status not in _REDIRECT_STATUSES or not location:
                return WellKnownResponse(status, raw, headers.get("Cache-Control"))
            try:
                url = url.join(URL(location))
            except ValueError:
                raise FederationError(f"well-known lookup for {hostname}: bad redirect") from None
            if url.scheme != "https" or url in seen:
                raise FederationError(
                    f"well-known lookup for {hostname}: redirect loop or non-HTTPS redirect"
                )
            seen.add(url)
        raise FederationError(f"well-known lookup for {hostname}: too many redirects")

    async def _exchange(
        self,
        method: str,
        url: URL,
        *,
        description: str,
        headers: Mapping[str, str],
        data: bytes | None,
        server_hostname: str | None,
        limit: int,
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """One guarded request; returns status, headers and the body (at most ``limit`` bytes)."""
        target = f"{url.host_port_subcomponent}"
        try:
            self._guard.check_host(url.raw_host or "")
        except AddressNotAllowedError:
            raise _ConnectFailed(
                f"{description}: refused to connect to {target}, address not allowed"
            ) from None
        session = self._get_session()
        try:
            async with session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                server_hostname=server_hostname if url.scheme == "https" else None,
                timeout=self._timeout,
            ) as response:
                raw = await self._read_limited(response, limit, description)
                return response.status, response.headers, raw
        # Exceptions are re-raised "from None": aiohttp messages can contain the full URL,
        # including an access token in the query string.
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, AddressNotAllowedError):
                raise _ConnectFailed(
                    f"{description}: refused to connect to {target}, "
                    "it resolves only to addresses that are not allowed"
                ) from None
            raise _ConnectFailed(f"{description}: could not resolve {url.raw_host}") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _ConnectFailed(
                f"{description}: TLS certificate of {target} is not valid for "
                f"{server_hostname or url.raw_host}: {_ssl_reason(exc.certificate_error)}"
            ) from None
        except aiohttp.ClientConnectorSSLError as exc:
            raise _ConnectFailed(
                f"{description}: TLS handshake with {target} failed: {_ssl_reason(exc.os_error)}"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            errno = exc.os_error.errno
            reason = os.strerror(errno) if errno else type(exc.os_error).__name__
            raise _ConnectFailed(
                f"{description}: could not connect to {target}: {reason}"
            ) from None
        except TimeoutError:
            raise FederationError(
                f"{description}: timed out after {self._timeout_s:g} s ({target})"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise FederationError(
                f"{description}: request to {target} failed ({type(exc).__name__})"
            ) from None

    @staticmethod
    async def _read_limited(
        response: aiohttp.ClientResponse, limit: int, description: str
    ) -> bytes:
        too_large = FederationError(f"{description}: response larger than {limit} bytes")
        if response.content_length is not None and response.content_length > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)


def _ssl_reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return error.verify_message
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason
    return type(error).__name__
