"""Matrix server discovery: where to connect for a server name, and which name TLS must match.

Implements the server-server API's resolution order:

1. an operator override (``overrides``) wins over everything;
2. an IP literal connects to ``ip:port`` (default 8448);
3. a host name with an explicit port connects there;
4. otherwise ``https://<host>/.well-known/matrix/server`` may delegate to another name, which is
   then resolved by IP literal, explicit port, SRV ``_matrix-fed._tcp`` then ``_matrix._tcp``, or
   port 8448;
5. without delegation the same SRV / 8448 steps apply to the host itself.

The result keeps the connect address (an SRV target) apart from the TLS name and ``Host`` header
(the server name or the delegated name), so the certificate is checked for the right name.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from yarl import URL

from appservice.federation.guard import IPAddress, parse_ip

if TYPE_CHECKING:
    import dns.asyncresolver

logger = logging.getLogger(__name__)

DEFAULT_FEDERATION_PORT = 8448
WELL_KNOWN_PATH = "/.well-known/matrix/server"
WELL_KNOWN_DEFAULT_TTL = 24 * 3600.0
WELL_KNOWN_MAX_TTL = 48 * 3600.0
# A floor so that ``max-age=0`` cannot make every request fetch the well-known file.
WELL_KNOWN_MIN_TTL = 5 * 60.0
# A definitive "no delegation" answer (404, invalid JSON, invalid m.server).
WELL_KNOWN_INVALID_TTL = 3600.0
# Transient failures (network errors, 5xx) are retried with exponential backoff up to an hour.
WELL_KNOWN_RETRY_INITIAL = 120.0
WELL_KNOWN_RETRY_MAX = 3600.0
# How long a previously valid delegation is still used while refreshes fail transiently.
WELL_KNOWN_STALE_GRACE = 24 * 3600.0

_MAX_HOSTNAME_LENGTH = 255
_SERVER_NAME_RE = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,255})(?::(?P<port>[0-9]{1,5}))?",
    re.ASCII,
)
_LABEL_RE = re.compile(r"[A-Za-z0-9-]{1,63}", re.ASCII)


class FederationError(Exception):
    """An outbound federation request failed: bad server name, discovery, network or TLS error.

    The message says what happened; it never contains access tokens or request bodies.
    """


@dataclass(frozen=True)
class ServerName:
    """A parsed server name: ``host`` is a DNS name or an IP address (IPv6 without brackets)."""

    host: str
    port: int | None
    ip: IPAddress | None


def is_valid_hostname(host: str) -> bool:
    """Whether ``host`` is a DNS name usable as (part of) a Matrix server name.

    Stricter than the spec's ``[A-Za-z0-9.-]`` character class: labels must be non-empty, at most
    63 characters and not start or end with ``-``, and the last label must not be all digits
    (which ``getaddrinfo`` would read as a legacy numeric IPv4 form such as ``127.1``).
    """
    if not host or len(host) > _MAX_HOSTNAME_LENGTH:
        return False
    labels = host.split(".")
    for label in labels:
        if not _LABEL_RE.fullmatch(label) or label.startswith("-") or label.endswith("-"):
            return False
    return not labels[-1].isdigit()


def parse_server_name(name: str) -> ServerName:
    """Parse ``hostname[:port]`` (hostname: DNS name, IPv4 literal or ``[IPv6]``).

    Raises :class:`ValueError` for anything else, including names with ``/``, ``@``, ``?``,
    ``#``, whitespace or an IPv6 zone.
    """
    match = _SERVER_NAME_RE.fullmatch(name)
    if match is None:
        raise ValueError("not of the form hostname[:port]")
    host = match["host"]
    port_text = match["port"]
    port: int | None = None
    if port_text is not None:
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError("port out of range")
    if host.startswith("["):
        try:
            ip6 = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("invalid IPv6 literal") from None
        return ServerName(host=ip6.compressed, port=port, ip=ip6)
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ip4 = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError("invalid IPv4 literal") from None
        return ServerName(host=host, port=port, ip=ip4)
    if not is_valid_hostname(host):
        raise ValueError("invalid host name")
    return ServerName(host=host, port=port, ip=None)


def is_valid_server_name(name: str) -> bool:
    """Whether ``name`` is a valid server name (see :func:`parse_server_name`)."""
    try:
        parse_server_name(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """An address to open a TCP connection to: a host name or IP address and a port."""

    host: str
    port: int


@dataclass(frozen=True)
class ResolvedServer:
    """Where and how to reach a server.

    ``endpoints`` are tried in order (several only for SRV records). ``tls_name`` is the name the
    certificate must be valid for and the SNI name (``None`` for plain HTTP overrides);
    ``host_header`` is the HTTP ``Host``. ``base_path`` is a path prefix from an override URL.
    """

    server_name: str
    scheme: str
    endpoints: tuple[Endpoint, ...]
    tls_name: str | None
    host_header: str
    base_path: str = ""


@dataclass(frozen=True)
class WellKnownResponse:
    """What a well-known fetch returned (after following redirects)."""

    status: int
    body: bytes
    cache_control: str | None = None


# ``(hostname, port) -> response``; raises FederationError when no HTTP response was obtained.
WellKnownFetcher = Callable[[str, int], Awaitable[WellKnownResponse]]


class SrvResolver(Protocol):
    """Looks up SRV records."""

    async def resolve_srv(self, name: str) -> list[tuple[str, int]]:
        """``(target, port)`` pairs in the order to try them; empty when there are none."""
        ...


def order_srv_records(
    records: Iterable[tuple[int, int, str, int]], rng: random.Random | None = None
) -> list[tuple[str, int]]:
    """Order ``(priority, weight, target, port)`` records per RFC 2782.

    Lowest priority first; within a priority a weighted random order. Targets of ``.`` ("service
    not available") are dropped.
    """
    rng = rng or random.Random()
    groups: dict[int, list[tuple[int, str, int]]] = {}
    for priority, weight, target, port in records:
        if target in ("", "."):
            continue
        groups.setdefault(priority, []).append((weight, target, port))
    ordered: list[tuple[str, int]] = []
    for priority in sorted(groups):
        # RFC 2782: zero-weight records first, so that they are picked only rarely.
        group = sorted(groups[priority], key=lambda record: record[0])
        while group:
            threshold = rng.randint(0, sum(record[0] for record in group))
            running = 0
            chosen = len(group) - 1
            for index, record in enumerate(group):
                running += record[0]
                if running >= threshold:
                    chosen = index
                    break
            _, target, port = group.pop(chosen)
            ordered.append((target, port))
    return ordered


class DnsSrvResolver:
    """SRV lookups with dnspython's asyncio resolver (system configuration, TTL-honouring cache).

    dnspython is imported at the first lookup, not at start-up (about 0.1 s of import time).
    """

    def __init__(self, timeout_s: float = 5.0) -> None:
        self._timeout_s = timeout_s
        self._resolver: dns.asyncresolver.Resolver | None = None

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        import dns.asyncresolver
        import dns.resolver

        if self._resolver is None:
            resolver = dns.asyncresolver.Resolver()
            resolver.cache = dns.resolver.LRUCache(4096)
            self._resolver = resolver
        return self._resolver

    async def resolve_srv(self, name: str) -> list[tuple[str, int]]:
        """Look up SRV records for ``name``; DNS failures count as "no records"."""
        import dns.exception
        import dns.name
        import dns.rdatatype
        import dns.resolver
        from dns.rdtypes.IN.SRV import SRV

        try:
            resolver = self._get_resolver()
            answer = await resolver.resolve(name, dns.rdatatype.SRV, lifetime=self._timeout_s)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            # Server discovery falls back to A/AAAA on port 8448 when SRV lookup fails.
            logger.info("SRV lookup for %s failed: %s", name, type(exc).__name__)
            return []
        records = [
            (rr.priority, rr.weight, rr.target.to_text(omit_final_dot=True), rr.port)
            for rr in answer
            if isinstance(rr, SRV) and rr.target != dns.name.root
        ]
        return order_srv_records(records)


@dataclass
class _WellKnownEntry:
    delegated: str | None
    expires_at: float
    failures: int = 0
    stale_until: float = 0.0


def _max_age(cache_control: str | None) -> float | None:
    """The ``max-age`` of a Cache-Control header; 0 for ``no-store``/``no-cache``."""
    if not cache_control:
        return None
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age":
            value = value.strip().strip('"')
            if value.isascii() and value.isdigit():
                return float(value)
    return None


def _parse_m_server(body: bytes) -> str | None:
    """The ``m.server`` of a well-known body if it is a valid server name."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    delegated = data.get("m.server")
    if not isinstance(delegated, str) or not is_valid_server_name(delegated):
        return None
    return delegated


def _parse_override(server_name: str, base_url: str) -> ResolvedServer:
    url = URL(base_url)
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise ValueError(f"override for {server_name!r} must be an http(s) URL with a host")
    if url.raw_query_string or url.raw_fragment or url.raw_user or url.raw_password:
        raise ValueError(f"override for {server_name!r} must not have query, fragment or userinfo")
    port = url.port
    authority = url.host_port_subcomponent
    if port is None or authority is None:
        raise ValueError(f"override for {server_name!r} has no usable port")
    return ResolvedServer(
        server_name=server_name,
        scheme=url.scheme,
        endpoints=(Endpoint(url.raw_host, port),),
        tls_name=url.raw_host if url.scheme == "https" else None,
        host_header=authority,
        base_path=url.raw_path.rstrip("/"),
    )


class ServerDiscovery:
    """Resolves Matrix server names to :class:`ResolvedServer` per the server-server spec.

    ``fetch_well_known(hostname, port)`` performs the HTTPS request for
    ``/.well-known/matrix/server`` (the :class:`~appservice.federation.client.FederationClient`
    supplies one that applies the SSRF guard and TLS verification); ``srv_resolver`` looks up SRV
    records. ``overrides`` maps server names to base URLs such as ``https://synapse.internal:8448``
    and wins over everything. ``well_known_port`` exists for tests (the spec uses 443);
    ``clock`` is a monotonic clock in seconds.
    """

    def __init__(
        self,
        fetch_well_known: WellKnownFetcher,
        srv_resolver: SrvResolver,
        overrides: Mapping[str, str] | None = None,
        *,
        well_known_port: int = 443,
        clock: Callable[[], float] = time.monotonic,
        max_cache_entries: int = 10_000,
    ) -> None:
        self._fetch_well_known = fetch_well_known
        self._srv = srv_resolver
        self._well_known_port = well_known_port
        self._clock = clock
        self._max_cache_entries = max_cache_entries
        self._cache: dict[str, _WellKnownEntry] = {}
        self._overrides: dict[str, ResolvedServer] = {}
        for name, base_url in (overrides or {}).items():
            if not is_valid_server_name(name):
                raise ValueError(f"invalid server name in overrides: {name!r}")
            self._overrides[name] = _parse_override(name, base_url)

    async def resolve(self, server_name: str) -> ResolvedServer:
        """Resolve ``server_name``; raises :class:`FederationError` for an invalid name."""
        override = self._overrides.get(server_name)
        if override is not None:
            return override
        try:
            parsed = parse_server_name(server_name)
        except ValueError as exc:
            raise FederationError(f"invalid server name: {exc}") from None
        if parsed.ip is not None or parsed.port is not None:
            return self._direct(server_name, parsed)
        delegated = await self._delegated_name(parsed.host)
        if delegated is not None:
            delegated_parsed = parse_server_name(delegated)
            if delegated_parsed.ip is not None or delegated_parsed.port is not None:
                return self._direct(server_name, delegated_parsed, host_header=delegated)
            return await self._via_srv(server_name, delegated_parsed.host)
        return await self._via_srv(server_name, parsed.host)

    def _direct(
        self, server_name: str, target: ServerName, host_header: str | None = None
    ) -> ResolvedServer:
        """Connect straight to an IP literal or a name with an explicit port."""
        return ResolvedServer(
            server_name=server_name,
            scheme="https",
            endpoints=(Endpoint(target.host, target.port or DEFAULT_FEDERATION_PORT),),
            tls_name=target.host,
            host_header=host_header or server_name,
        )

    async def _via_srv(self, server_name: str, hostname: str) -> ResolvedServer:
        endpoints: tuple[Endpoint, ...] = ()
        for service in ("_matrix-fed._tcp", "_matrix._tcp"):
            records = await self._srv.resolve_srv(f"{service}.{hostname}")
            endpoints = tuple(
                Endpoint(target, port)
                for target, port in records
                if 0 < port < 65536 and (is_valid_hostname(target) or parse_ip(target) is not None)
            )
            if endpoints:
                break
        if not endpoints:
            endpoints = (Endpoint(hostname, DEFAULT_FEDERATION_PORT),)
        return ResolvedServer(
            server_name=server_name,
            scheme="https",
            endpoints=endpoints,
            tls_name=hostname,
            host_header=hostname,
        )

    async def _delegated_name(self, hostname: str) -> str | None:
        """The (cached) ``m.server`` delegation for ``hostname``, or ``None``."""
        now = self._clock()
        entry = self._cache.get(hostname)
        if entry is not None and entry.expires_at > now:
            return entry.delegated
        try:
            response = await self._fetch_well_known(hostname, self._well_known_port)
        except FederationError as exc:
            logger.info("well-known lookup for %s failed: %s", hostname, exc)
            return self._transient_failure(hostname, entry, now)
        if response.status >= 500 or response.status == 429:
            logger.info("well-known lookup for %s: HTTP %d", hostname, response.status)
            return self._transient_failure(hostname, entry, now)
        delegated = _parse_m_server(response.body) if response.status == 200 else None
        if delegated is None:
            self._store(hostname, _WellKnownEntry(None, now + WELL_KNOWN_INVALID_TTL))
            return None
        max_age = _max_age(response.cache_control)
        ttl = WELL_KNOWN_DEFAULT_TTL if max_age is None else max_age
        ttl = min(max(ttl, WELL_KNOWN_MIN_TTL), WELL_KNOWN_MAX_TTL)
        self._store(
            hostname,
            _WellKnownEntry(delegated, now + ttl, stale_until=now + ttl + WELL_KNOWN_STALE_GRACE),
        )
        return delegated

    def _transient_failure(
        self, hostname: str, previous: _WellKnownEntry | None, now: float
    ) -> str | None:
        failures = previous.failures + 1 if previous is not None else 1
        retry = min(WELL_KNOWN_RETRY_INITIAL * 2 ** min(failures - 1, 16), WELL_KNOWN_RETRY_MAX)
        if previous is not None and previous.delegated is not None and previous.stale_until > now:
            entry = _WellKnownEntry(previous.delegated, now + retry, failures, previous.stale_until)
        else:
            entry = _WellKnownEntry(None, now + retry, failures)
        self._store(hostname, entry)
        return entry.delegated

    def _store(self, hostname: str, entry: _WellKnownEntry) -> None:
        self._cache.pop(hostname, None)
        while len(self._cache) >= self._max_cache_entries:
            del self._cache[next(iter(self._cache))]
        self._cache[hostname] = entry
