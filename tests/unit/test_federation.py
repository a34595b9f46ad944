"""Tests for appservice.federation: SSRF guard, server discovery, federation client, OpenID."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.rdata
import dns.resolver
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from appservice.federation import (
    AddressGuard,
    AddressNotAllowedError,
    DnsSrvResolver,
    Endpoint,
    FederationClient,
    FederationError,
    GuardedResolver,
    OpenIdError,
    ServerDiscovery,
    WellKnownResponse,
    fetch_openid_user,
    is_valid_server_name,
    parse_server_name,
)
from appservice.federation.discovery import order_srv_records
from tests.support.tls import TestCertificates, make_test_certificates

LOOPBACK = ["127.0.0.0/8", "::1/128"]


# --------------------------------------------------------------------------------------------
# Test doubles


class FakeSrv:
    """An SRV resolver answering from a dict, recording the queried names."""

    def __init__(self, records: dict[str, list[tuple[str, int]]] | None = None) -> None:
        self.records = records or {}
        self.queries: list[str] = []

    async def resolve_srv(self, name: str) -> list[tuple[str, int]]:
        self.queries.append(name)
        return list(self.records.get(name, []))


class FakeWellKnown:
    """A well-known fetcher answering from a dict (404 by default)."""

    def __init__(self) -> None:
        self.responses: dict[str, WellKnownResponse | FederationError] = {}
        self.calls: list[tuple[str, int]] = []

    def delegate(self, host: str, m_server: str, cache_control: str | None = None) -> None:
        body = json.dumps({"m.server": m_server}).encode()
        self.responses[host] = WellKnownResponse(200, body, cache_control)

    async def __call__(self, host: str, port: int) -> WellKnownResponse:
        self.calls.append((host, port))
        response = self.responses.get(host, WellKnownResponse(404, b""))
        if isinstance(response, FederationError):
            raise response
        return response


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_discovery(
    srv: FakeSrv | None = None, overrides: dict[str, str] | None = None
) -> tuple[ServerDiscovery, FakeWellKnown, FakeSrv, FakeClock]:
    well_known = FakeWellKnown()
    srv = srv or FakeSrv()
    clock = FakeClock()
    discovery = ServerDiscovery(well_known, srv, overrides, clock=clock)
    return discovery, well_known, srv, clock


# --------------------------------------------------------------------------------------------
# SSRF guard


REFUSED = [
    "127.0.0.1",
    "127.255.0.9",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "100.64.0.1",
    "100.127.255.254",
    "169.254.169.254",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "0.0.0.0",
    "0.1.2.3",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b:1::1",
    "2001::1",  # Teredo
    "2001:db8::1",
    "not-an-ip",
    "",
    "localhost",
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.63.255.255",
    "100.128.0.1",
    "2001:4860:4860::8888",
    "2606:4700:4700::1111",
    "[2606:4700:4700::1111]",
    "::ffff:8.8.8.8",
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
]


@pytest.mark.parametrize("ip", REFUSED)
def test_guard_refuses_internal_addresses(ip: str) -> None:
    assert not AddressGuard([]).is_allowed(ip)


@pytest.mark.parametrize("ip", PUBLIC)
def test_guard_allows_public_addresses(ip: str) -> None:
    assert AddressGuard([]).is_allowed(ip)


def test_guard_allowed_networks() -> None:
    guard = AddressGuard([*LOOPBACK, "10.20.0.0/16"])
    for ip in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "10.20.3.4", "8.8.8.8"):
        assert guard.is_allowed(ip), ip
    for ip in ("10.21.0.1", "192.168.0.1", "fe80::1", "::2"):
        assert not guard.is_allowed(ip), ip


def test_guard_rejects_invalid_network() -> None:
    with pytest.raises(ValueError, match="nonsense"):
        AddressGuard(["nonsense"])


def test_guard_check_host() -> None:
    guard = AddressGuard([])
    guard.check_host("example.org")
    guard.check_host("8.8.8.8")
    with pytest.raises(AddressNotAllowedError, match=r"127\.0\.0\.1"):
        guard.check_host("127.0.0.1")
    with pytest.raises(AddressNotAllowedError):
        guard.check_host("[::1]")


class StaticResolver(AbstractResolver):
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=addr,
                port=port,
                family=socket.AF_INET6 if ":" in addr else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for addr in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_guarded_resolver_filters_addresses() -> None:
    inner = StaticResolver(["10.0.0.1", "8.8.8.8", "::1", "2001:4860:4860::8888"])
    resolver = GuardedResolver(AddressGuard([]), inner)
    results = await resolver.resolve("mixed.example", 443)
    assert [r["host"] for r in results] == ["8.8.8.8", "2001:4860:4860::8888"]
    assert all(r["port"] == 443 for r in results)
    await resolver.close()


async def test_guarded_resolver_raises_when_nothing_allowed() -> None:
    resolver = GuardedResolver(AddressGuard([]), StaticResolver(["127.0.0.1", "10.0.0.1"]))
    with pytest.raises(AddressNotAllowedError, match=r"internal\.example") as info:
        await resolver.resolve("internal.example", 443)
    assert isinstance(info.value, OSError)
    allowed = GuardedResolver(AddressGuard(LOOPBACK), StaticResolver(["127.0.0.1", "10.0.0.1"]))
    assert [r["host"] for r in await allowed.resolve("internal.example", 1)] == ["127.0.0.1"]


# --------------------------------------------------------------------------------------------
# Server names


VALID_NAMES = [
    "example.org",
    "localhost",
    "localhost:8448",
    "matrix.example.org:1",
    "Example.ORG:65535",
    "1.2.3.4",
    "1.2.3.4:80",
    "[::1]",
    "[2001:db8::1]:8448",
    "[::ffff:1.2.3.4]",
    "xn--bcher-kva.example",
    "a-b.c-d.example",
]
INVALID_NAMES = [
    "",
    ":8448",
    "example.org:",
    "example.org:0",
    "example.org:65536",
    "example.org:123456",
    "example.org:+1",
    "example.org/evil",
    "user@example.org",
    "example.org?x=1",
    "example.org#frag",
    "exa mple.org",
    " example.org",
    "example.org\n",
    "example.org\t",
    "example..org",
    ".example.org",
    "example.org.",
    "-example.org",
    "example-.org",
    "a" * 64 + ".org",
    "x." * 128 + "org",
    "1.2.3",
    "256.1.1.1",
    "127.000.0.1",
    "2130706433",
    "example.123",
    "[::1",
    "::1",
    "[fe80::1%eth0]",
    "[1.2.3.4]",
    "[::g]",
    "exämple.org",
    "example.org:8448:1",
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_server_names(name: str) -> None:
    assert is_valid_server_name(name)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_server_names(name: str) -> None:
    assert not is_valid_server_name(name)


def test_parse_server_name_parts() -> None:
    parsed = parse_server_name("[2001:DB8::1]:8000")
    assert (parsed.host, parsed.port, str(parsed.ip)) == ("2001:db8::1", 8000, "2001:db8::1")
    parsed = parse_server_name("example.org")
    assert (parsed.host, parsed.port, parsed.ip) == ("example.org", None, None)


# --------------------------------------------------------------------------------------------
# Server discovery (no network)


async def test_discovery_override_wins() -> None:
    discovery, well_known, srv, _ = make_discovery(
        overrides={
            "example.org": "https://synapse.internal:8448/prefix/",
            "localhost:8448": "http://127.0.0.1:8008",
        }
    )
    resolved = await discovery.resolve("example.org")
    assert resolved.scheme == "https"
    assert resolved.endpoints == (Endpoint("synapse.internal", 8448),)
    assert resolved.tls_name == "synapse.internal"
    assert resolved.host_header == "synapse.internal:8448"
    assert resolved.base_path == "/prefix"
    plain = await discovery.resolve("localhost:8448")
    assert (plain.scheme, plain.endpoints, plain.tls_name) == (
        "http",
        (Endpoint("127.0.0.1", 8008),),
        None,
    )
    assert well_known.calls == [] and srv.queries == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"example.org": "ftp://x.example"},
        {"example.org": "https://x.example/?q=1"},
        {"example.org": "https://user:pw@x.example"},
        {"example.org": "/relative"},
        {"bad/name": "https://x.example"},
    ],
)
def test_discovery_rejects_bad_overrides(overrides: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        make_discovery(overrides=overrides)


async def test_discovery_ip_literals() -> None:
    discovery, well_known, srv, _ = make_discovery()
    resolved = await discovery.resolve("1.2.3.4")
    assert resolved.endpoints == (Endpoint("1.2.3.4", 8448),)
    assert (resolved.tls_name, resolved.host_header) == ("1.2.3.4", "1.2.3.4")
    resolved = await discovery.resolve("[2001:db8::1]:8000")
    assert resolved.endpoints == (Endpoint("2001:db8::1", 8000),)
    assert (resolved.tls_name, resolved.host_header) == ("2001:db8::1", "[2001:db8::1]:8000")
    assert well_known.calls == [] and srv.queries == []


async def test_discovery_explicit_port_skips_well_known_and_srv() -> None:
    discovery, well_known, srv, _ = make_discovery()
    resolved = await discovery.resolve("example.org:1234")
    assert resolved.endpoints == (Endpoint("example.org", 1234),)
    assert (resolved.tls_name, resolved.host_header) == ("example.org", "example.org:1234")
    assert well_known.calls == [] and srv.queries == []


async def test_discovery_well_known_with_port() -> None:
    discovery, well_known, srv, _ = make_discovery()
    well_known.delegate("example.org", "matrix.example.net:443")
    resolved = await discovery.resolve("example.org")
    assert resolved.server_name == "example.org"
    assert resolved.endpoints == (Endpoint("matrix.example.net", 443),)
    assert resolved.tls_name == "matrix.example.net"
    assert resolved.host_header == "matrix.example.net:443"
    assert well_known.calls == [("example.org", 443)]
    assert srv.queries == []


async def test_discovery_well_known_to_ip_literal() -> None:
    discovery, well_known, _, _ = make_discovery()
    well_known.delegate("example.org", "[2001:db8::5]")
    resolved = await discovery.resolve("example.org")
    assert resolved.endpoints == (Endpoint("2001:db8::5", 8448),)
    assert (resolved.tls_name, resolved.host_header) == ("2001:db8::5", "[2001:db8::5]")


async def test_discovery_well_known_then_srv() -> None:
    srv = FakeSrv({"_matrix-fed._tcp.matrix.example.net": [("fed1.example.net", 8443)]})
    discovery, well_known, _, _ = make_discovery(srv)
    well_known.delegate("example.org", "matrix.example.net")
    resolved = await discovery.resolve("example.org")
    assert resolved.endpoints == (Endpoint("fed1.example.net", 8443),)
    assert resolved.tls_name == "matrix.example.net"
    assert resolved.host_header == "matrix.example.net"
    assert srv.queries == ["_matrix-fed._tcp.matrix.example.net"]


async def test_discovery_legacy_srv_and_default_port() -> None:
    srv = FakeSrv({"_matrix._tcp.old.example": [("legacy.example", 8000), ("bad name", 1)]})
    discovery, _, _, _ = make_discovery(srv)
    resolved = await discovery.resolve("old.example")
    assert resolved.endpoints == (Endpoint("legacy.example", 8000),)
    assert (resolved.tls_name, resolved.host_header) == ("old.example", "old.example")
    assert srv.queries == ["_matrix-fed._tcp.old.example", "_matrix._tcp.old.example"]

    resolved = await discovery.resolve("plain.example")
    assert resolved.endpoints == (Endpoint("plain.example", 8448),)
    assert resolved.tls_name == "plain.example"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"m.server": 5}',
        b'{"m.server": "evil.example/path"}',
        b'{"m.server": "a@b.example"}',
        b'{"other": "x.example"}',
        b"[" * 100_000,
    ],
)
async def test_discovery_invalid_well_known_is_ignored(body: bytes) -> None:
    discovery, well_known, _, _ = make_discovery()
    well_known.responses["example.org"] = WellKnownResponse(200, body)
    resolved = await discovery.resolve("example.org")
    assert resolved.endpoints == (Endpoint("example.org", 8448),)


async def test_discovery_rejects_invalid_names_without_lookups() -> None:
    discovery, well_known, srv, _ = make_discovery()
    for name in ("example.org/x", "a@b", "", "[::1"):
        with pytest.raises(FederationError, match="invalid server name"):
            await discovery.resolve(name)
    assert well_known.calls == [] and srv.queries == []


async def test_discovery_caches_well_known_24h_by_default() -> None:
    discovery, well_known, _, clock = make_discovery()
    well_known.delegate("example.org", "m.example.org:443")
    await discovery.resolve("example.org")
    clock.now += 24 * 3600 - 1
    await discovery.resolve("example.org")
    assert len(well_known.calls) == 1
    clock.now += 2
    await discovery.resolve("example.org")
    assert len(well_known.calls) == 2


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [
        ("max-age=7200", 7200),
        ('public, max-age="3600"', 3600),
        ("max-age=999999999", 48 * 3600),
        ("max-age=0", 300),
        ("no-store", 300),
        ("garbage", 24 * 3600),
    ],
)
async def test_discovery_honours_cache_control(cache_control: str, ttl: int) -> None:
    discovery, well_known, _, clock = make_discovery()
    well_known.delegate("example.org", "m.example.org:443", cache_control)
    await discovery.resolve("example.org")
    clock.now += ttl - 1
    await discovery.resolve("example.org")
    assert len(well_known.calls) == 1
    clock.now += 2
    await discovery.resolve("example.org")
    assert len(well_known.calls) == 2


async def test_discovery_caches_missing_well_known_for_an_hour() -> None:
    discovery, well_known, _, clock = make_discovery()
    await discovery.resolve("example.org")
    clock.now += 3599
    await discovery.resolve("example.org")
    assert len(well_known.calls) == 1
    clock.now += 2
    await discovery.resolve("example.org")
    assert len(well_known.calls) == 2


async def test_discovery_backs_off_transient_failures_and_keeps_stale_delegation() -> None:
    discovery, well_known, _, clock = make_discovery()
    well_known.delegate("example.org", "m.example.org:443", "max-age=3600")
    assert (await discovery.resolve("example.org")).endpoints[0].host == "m.example.org"
    clock.now += 3601
    well_known.responses["example.org"] = FederationError("connection refused")
    # The previous delegation is kept while refreshes fail.
    assert (await discovery.resolve("example.org")).endpoints[0].host == "m.example.org"
    assert len(well_known.calls) == 2
    clock.now += 119
    await discovery.resolve("example.org")
    assert len(well_known.calls) == 2
    clock.now += 2  # first retry after 2 minutes
    await discovery.resolve("example.org")
    assert len(well_known.calls) == 3
    clock.now += 239
    await discovery.resolve("example.org")
    assert len(well_known.calls) == 3
    clock.now += 2  # then after 4 minutes
    await discovery.resolve("example.org")
    assert len(well_known.calls) == 4
    well_known.responses["example.org"] = WellKnownResponse(503, b"")
    for _ in range(10):
        clock.now += 3601  # the backoff is capped at one hour
        await discovery.resolve("example.org")
    assert len(well_known.calls) == 14
    assert (await discovery.resolve("example.org")).endpoints[0].host == "m.example.org"
    # A day after the delegation expired it is no longer used.
    clock.now += 24 * 3600
    assert (await discovery.resolve("example.org")).endpoints[0] == Endpoint("example.org", 8448)


async def test_discovery_cache_is_bounded() -> None:
    well_known = FakeWellKnown()
    discovery = ServerDiscovery(well_known, FakeSrv(), max_cache_entries=3)
    for i in range(5):
        await discovery.resolve(f"s{i}.example")
    await discovery.resolve("s4.example")
    await discovery.resolve("s0.example")
    assert len(well_known.calls) == 6


def test_order_srv_records() -> None:
    rng = random.Random(7)
    records = [(20, 0, "c.example", 3), (10, 5, "a.example", 1), (10, 5, "b.example", 2)]
    records.append((5, 0, ".", 9))
    for _ in range(20):
        ordered = order_srv_records(records, rng)
        assert sorted(ordered[:2]) == [("a.example", 1), ("b.example", 2)]
        assert ordered[2:] == [("c.example", 3)]
    firsts = {order_srv_records(records, rng)[0] for _ in range(50)}
    assert firsts == {("a.example", 1), ("b.example", 2)}
    heavy = [(1, 100, "heavy.example", 1), (1, 0, "zero.example", 2)]
    counts = sum(order_srv_records(heavy, rng)[0][0] == "heavy.example" for _ in range(200))
    assert counts > 180


async def test_dns_srv_resolver_parses_records() -> None:
    class FakeDns:
        def __init__(self, error: type[Exception] | None = None) -> None:
            self.error = error

        async def resolve(self, name: str, rdtype: Any, lifetime: float) -> list[Any]:
            if self.error is not None:
                raise self.error
            texts = ["10 5 8448 fed.example.org.", "5 0 443 first.example.org.", "1 0 0 ."]
            return [dns.rdata.from_text("IN", "SRV", text) for text in texts]

    resolver = DnsSrvResolver(1.0)
    resolver._resolver = FakeDns()  # type: ignore[assignment]
    assert await resolver.resolve_srv("_matrix-fed._tcp.example.org") == [
        ("first.example.org", 443),
        ("fed.example.org", 8448),
    ]
    for error in (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.exception.Timeout):
        resolver._resolver = FakeDns(error)  # type: ignore[assignment]
        assert await resolver.resolve_srv("_matrix-fed._tcp.example.org") == []


# --------------------------------------------------------------------------------------------
# Loopback servers


@dataclass
class ServerState:
    well_known: tuple[int, bytes, dict[str, str]] = (404, b"", {})
    well_known_redirect: bool = False
    tokens: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)


@dataclass
class Servers:
    state: ServerState
    http_port: int
    tls_port: int
    certs: TestCertificates

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


async def _echo(request: web.Request) -> web.Response:
    raw = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "host": request.headers.get("Host"),
            "secure": request.secure,
            "body": json.loads(raw) if raw else None,
            "x_test": request.headers.get("X-Test"),
        }
    )


def _build_app(state: ServerState) -> web.Application:
    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        state.requests.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    async def well_known(request: web.Request) -> web.Response:
        if state.well_known_redirect:
            raise web.HTTPFound("/wk-target")
        return await wk_target(request)

    async def wk_target(request: web.Request) -> web.Response:
        status, body, headers = state.well_known
        return web.Response(status=status, body=body, headers=headers)

    async def userinfo(request: web.Request) -> web.Response:
        sub = state.tokens.get(request.query.get("access_token", ""))
        if sub is None:
            return web.json_response({"errcode": "M_UNKNOWN_TOKEN", "error": "no"}, status=401)
        return web.json_response({"sub": sub})

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (2 * 1024 * 1024))

    async def big_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(40):
            await response.write(b"y" * 65536)
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({})

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application(middlewares=[record])
    app.router.add_route("*", "/echo", _echo)
    app.router.add_route("*", "/prefix/echo", _echo)
    app.router.add_get("/.well-known/matrix/server", well_known)
    app.router.add_get("/wk-target", wk_target)
    app.router.add_get("/_matrix/federation/v1/openid/userinfo", userinfo)
    app.router.add_get("/big", big)
    app.router.add_get("/big-stream", big_stream)
    app.router.add_get("/slow", slow)
    app.router.add_get("/text", text)
    return app


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_test_certificates(Path(tmp_path_factory.mktemp("fed-certs")))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def servers(certs: TestCertificates) -> AsyncIterator[Servers]:
    state = ServerState()
    server_ctx = certs.server_context()

    def on_sni(_obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        state.sni.append(name)

    server_ctx.sni_callback = on_sni
    runner = web.AppRunner(_build_app(state), handler_cancellation=True)
    await runner.setup()
    plain = web.TCPSite(runner, "127.0.0.1", 0)
    tls = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await plain.start()
    await tls.start()
    ports = [address[1] for address in runner.addresses]
    try:
        yield Servers(state, ports[0], ports[1], certs)
    finally:
        await runner.cleanup()


@pytest.fixture
def srv(servers: Servers) -> Iterator[Servers]:
    """The loopback servers with fresh state for one test."""
    fresh = ServerState()
    for name in ("well_known", "well_known_redirect", "tokens", "requests", "sni"):
        setattr(servers.state, name, getattr(fresh, name))
    yield servers


ClientFactory = Callable[..., FederationClient]


@pytest_asyncio.fixture(loop_scope="session")
async def make_client() -> AsyncIterator[ClientFactory]:
    clients: list[FederationClient] = []

    def factory(**kwargs: Any) -> FederationClient:
        kwargs.setdefault("srv_resolver", FakeSrv())
        kwargs.setdefault("timeout_s", 5.0)
        client = FederationClient(**kwargs)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------------------------
# Federation client against loopback servers


async def test_override_to_allowed_loopback(srv: Servers, make_client: ClientFactory) -> None:
    client = make_client(overrides={"hs.test": srv.http_url}, allowed_networks=LOOPBACK)
    status, body = await client.get_json("hs.test", "/echo", {"a": "b c"})
    assert status == 200
    assert body["query"] == {"a": "b c"}
    assert body["host"] == f"127.0.0.1:{srv.http_port}"
    status, body = await client.post_json(
        "hs.test", "/echo", {"k": ["v", 1]}, headers={"X-Test": "1", "Host": "evil.example"}
    )
    assert (status, body["method"], body["x_test"]) == (200, "POST", "1")
    assert body["body"] == {"k": ["v", 1]}
    assert body["host"] == f"127.0.0.1:{srv.http_port}"


async def test_override_with_path_prefix(srv: Servers, make_client: ClientFactory) -> None:
    client = make_client(
        overrides={"hs.test": f"http://localhost:{srv.http_port}/prefix/"},
        allowed_networks=LOOPBACK,
    )
    status, body = await client.get_json("hs.test", "/echo")
    assert (status, body["path"]) == (200, "/prefix/echo")
    assert body["host"] == f"localhost:{srv.http_port}"


async def test_loopback_refused_without_allowed_networks(
    srv: Servers, make_client: ClientFactory
) -> None:
    client = make_client(
        overrides={"ip.test": srv.http_url, "name.test": f"http://localhost:{srv.http_port}"}
    )
    with pytest.raises(FederationError, match=r"refused to connect to 127\.0\.0\.1.*not allowed"):
        await client.get_json("ip.test", "/echo")
    with pytest.raises(FederationError, match=r"refused to connect to localhost.*not allowed"):
        await client.get_json("name.test", "/echo")
    assert srv.state.requests == []


async def test_ip_literal_server_name(srv: Servers, make_client: ClientFactory) -> None:
    name = f"127.0.0.1:{srv.tls_port}"
    client = make_client(allowed_networks=LOOPBACK, ca_file=str(srv.certs.ca_cert))
    status, body = await client.get_json(name, "/echo")
    assert (status, body["host"], body["secure"]) == (200, name, True)
    assert srv.state.sni == [None]  # no SNI for IP addresses
    refused = make_client(ca_file=str(srv.certs.ca_cert))
    with pytest.raises(FederationError, match="not allowed"):
        await refused.get_json(name, "/echo")
    assert srv.state.requests == ["/echo"]


async def test_tls_verified_against_ca_file(srv: Servers, make_client: ClientFactory) -> None:
    overrides = {"hs.test": f"https://localhost:{srv.tls_port}"}
    good = make_client(
        overrides=overrides, allowed_networks=LOOPBACK, ca_file=str(srv.certs.ca_cert)
    )
    assert (await good.get_json("hs.test", "/echo"))[0] == 200
    untrusting = make_client(overrides=overrides, allowed_networks=LOOPBACK)
    with pytest.raises(FederationError, match=r"TLS certificate .* not valid"):
        await untrusting.get_json("hs.test", "/echo")
    insecure = make_client(overrides=overrides, allowed_networks=LOOPBACK, verify_tls=False)
    assert (await insecure.get_json("hs.test", "/echo"))[0] == 200


async def test_tls_name_mismatch(srv: Servers, make_client: ClientFactory) -> None:
    # The certificate covers localhost, not the delegated name that TLS must check.
    client = make_client(
        allowed_networks=LOOPBACK,
        ca_file=str(srv.certs.ca_cert),
        well_known_port=srv.tls_port,
        srv_resolver=FakeSrv({"_matrix-fed._tcp.other.test": [("127.0.0.1", srv.tls_port)]}),
    )
    srv.state.well_known = (200, json.dumps({"m.server": "other.test"}).encode(), {})
    with pytest.raises(FederationError, match=r"not valid for other\.test"):
        await client.get_json("localhost", "/echo")


async def test_well_known_delegation(srv: Servers, make_client: ClientFactory) -> None:
    fake_srv = FakeSrv()
    client = make_client(
        allowed_networks=LOOPBACK,
        ca_file=str(srv.certs.ca_cert),
        well_known_port=srv.tls_port,
        srv_resolver=fake_srv,
    )
    delegated = f"localhost:{srv.tls_port}"
    srv.state.well_known = (200, json.dumps({"m.server": delegated}).encode(), {})
    srv.state.well_known_redirect = True
    status, body = await client.get_json("localhost", "/echo")
    assert (status, body["host"]) == (200, delegated)
    assert srv.state.requests == ["/.well-known/matrix/server", "/wk-target", "/echo"]
    await client.get_json("localhost", "/echo")
    assert srv.state.requests.count("/.well-known/matrix/server") == 1  # cached
    assert fake_srv.queries == []


async def test_srv_target_with_server_name_tls(srv: Servers, make_client: ClientFactory) -> None:
    fake_srv = FakeSrv(
        {"_matrix-fed._tcp.localhost": [("127.0.0.1", _closed_port()), ("127.0.0.1", srv.tls_port)]}
    )
    client = make_client(
        allowed_networks=LOOPBACK,
        ca_file=str(srv.certs.ca_cert),
        well_known_port=srv.tls_port,
        srv_resolver=fake_srv,
    )
    status, body = await client.get_json("localhost", "/echo")
    # Connected to the SRV target's address, but TLS and Host use the server name.
    assert (status, body["host"]) == (200, "localhost")
    assert srv.state.sni[-1] == "localhost"
    assert fake_srv.queries == ["_matrix-fed._tcp.localhost"]


async def test_well_known_fetch_is_guarded(srv: Servers, make_client: ClientFactory) -> None:
    client = make_client(ca_file=str(srv.certs.ca_cert), well_known_port=srv.tls_port)
    with pytest.raises(FederationError, match="not allowed"):
        await client.get_json("localhost", "/echo")
    assert srv.state.requests == []


async def test_error_cases(srv: Servers, make_client: ClientFactory) -> None:
    client = make_client(
        overrides={
            "hs.test": srv.http_url,
            "closed.test": f"http://127.0.0.1:{_closed_port()}",
            "nxdomain.test": "https://nonexistent.invalid",
        },
        allowed_networks=LOOPBACK,
        timeout_s=0.5,
    )
    assert await client.get_json("hs.test", "/text") == (200, None)
    assert (await client.get_json("hs.test", "/missing"))[0] == 404
    with pytest.raises(FederationError, match="larger than"):
        await client.get_json("hs.test", "/big")
    with pytest.raises(FederationError, match="larger than"):
        await client.get_json("hs.test", "/big-stream")
    with pytest.raises(FederationError, match="timed out"):
        await client.get_json("hs.test", "/slow")
    with pytest.raises(FederationError, match="could not connect"):
        await client.get_json("closed.test", "/echo")
    with pytest.raises(FederationError, match=r"could not resolve nonexistent\.invalid"):
        await client.get_json("nxdomain.test", "/echo")
    with pytest.raises(ValueError):
        await client.get_json("hs.test", "/echo?x=1")
    await client.close()
    with pytest.raises(FederationError, match="closed"):
        await client.get_json("hs.test", "/echo")


# --------------------------------------------------------------------------------------------
# OpenID userinfo


async def test_openid_userinfo(srv: Servers, make_client: ClientFactory) -> None:
    name = f"localhost:{srv.tls_port}"
    srv.state.tokens.update(
        {
            "good": f"@alice:{name}",
            "foreign": "@alice:other.example",
            "prefix": f"@alice:{name}.evil",
            "other-port": "@alice:localhost:1",
            "no-port": "@alice:localhost",
            "bad": "alice",
            "empty": f"@:{name}",
            "space": f"@al ice:{name}",
        }
    )
    client = make_client(allowed_networks=LOOPBACK, ca_file=str(srv.certs.ca_cert))
    assert await fetch_openid_user(client, name, "good") == f"@alice:{name}"
    with pytest.raises(OpenIdError, match="did not accept") as info:
        await fetch_openid_user(client, name, "unknown")
    assert info.value.status == 401
    for token in ("foreign", "other-port", "no-port"):
        with pytest.raises(OpenIdError, match="different server"):
            await fetch_openid_user(client, name, token)
    for token in ("bad", "empty", "space", "prefix"):
        with pytest.raises(OpenIdError, match="invalid user ID"):
            await fetch_openid_user(client, name, token)


@pytest.mark.parametrize("name", INVALID_NAMES)
async def test_openid_rejects_bad_server_names_without_network(
    name: str, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client()

    async def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network used")

    monkeypatch.setattr(client, "get_json", no_network)
    with pytest.raises(OpenIdError, match="invalid matrix_server_name"):
        await fetch_openid_user(client, name, "token")


async def test_openid_errors_do_not_leak_the_token(
    srv: Servers, make_client: ClientFactory
) -> None:
    token = "SECRET-openid-token-123"
    refusing = make_client(timeout_s=0.5)
    allowing = make_client(allowed_networks=LOOPBACK, timeout_s=0.5)
    cases = [
        (refusing, f"127.0.0.1:{srv.tls_port}"),
        (allowing, f"localhost:{_closed_port()}"),
    ]
    for client, name in cases:
        with pytest.raises(FederationError) as info:
            await fetch_openid_user(client, name, token)
        assert token not in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__
    slow = make_client(
        overrides={"hs.test": srv.http_url}, allowed_networks=LOOPBACK, timeout_s=0.2
    )
    with pytest.raises(FederationError, match="timed out") as info:
        await slow.get_json("hs.test", "/slow", {"access_token": token})
    assert token not in str(info.value)
