"""SSRF guard: refuse outbound connections to internal addresses unless the operator allows them.

Server names come from untrusted input (OpenID registration, ``.well-known`` delegation, SRV
records), so every address the federation client connects to passes through
:class:`AddressGuard`. Host names are filtered by :class:`GuardedResolver` after resolution, so the
addresses that are checked are exactly the addresses aiohttp connects to (no DNS-rebinding window).
aiohttp does not call the resolver for IP-literal URLs; callers check those with
:meth:`AddressGuard.check_host` before sending a request.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Prefixes whose addresses embed an IPv4 address that is the real destination.
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")


class AddressNotAllowedError(OSError):
    """A host resolved only to addresses that the SSRF guard refuses."""

    def __init__(self, host: str) -> None:
        super().__init__(f"refusing to connect to {host}: no allowed (public) address")
        self.host = host


def parse_ip(value: str) -> IPAddress | None:
    """Parse an IP address (IPv6 may carry brackets or a ``%zone``); ``None`` if it is not one."""
    text = value
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is a globally routable unicast address.

    Refuses loopback, private (RFC 1918), shared (CGNAT 100.64/10), link-local, multicast,
    reserved, unspecified, IPv6 unique-local and site-local addresses, and IPv6 forms that embed a
    refused IPv4 address (IPv4-mapped, 6to4, NAT64).
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public_address(embedded)
        # Teredo tunnels and local-use NAT64 reach addresses we cannot inspect.
        if ip.teredo is not None or ip in _NAT64_LOCAL_USE or ip.is_site_local:
            return False
    if (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    ):
        return False
    # ``is_global`` also excludes 100.64/10 and other special-purpose blocks.
    return ip.is_global


class AddressGuard:
    """Decides which IP addresses outbound federation requests may connect to.

    Public addresses are allowed. Everything else is refused unless it lies in one of
    ``allowed_networks`` (CIDR strings such as ``"127.0.0.0/8"`` or ``"::1/128"``), which is how an
    operator lets the service reach a homeserver on loopback or a private network.
    """

    def __init__(self, allowed_networks: Sequence[str] = ()) -> None:
        networks: list[IPNetwork] = []
        for cidr in allowed_networks:
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as exc:
                raise ValueError(f"invalid allowed network {cidr!r}: {exc}") from None
        self._allowed = tuple(networks)

    def _in_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self._allowed)

    def is_allowed(self, ip: str) -> bool:
        """Whether a connection to the address ``ip`` is allowed; non-addresses are refused."""
        addr = parse_ip(ip)
        if addr is None:
            return False
        mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
        if self._in_allowed(addr) or (mapped is not None and self._in_allowed(mapped)):
            return True
        return is_public_address(addr)

    def check_host(self, host: str) -> None:
        """Raise :class:`AddressNotAllowedError` if ``host`` is a refused IP literal.

        Host names pass; they are checked after resolution by :class:`GuardedResolver`.
        """
        if parse_ip(host) is not None and not self.is_allowed(host):
            raise AddressNotAllowedError(host)


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that drops addresses the :class:`AddressGuard` refuses.

    ``inner`` does the actual resolution; by default aiohttp's :class:`ThreadedResolver`
    (``getaddrinfo`` in a thread), created on first use inside the running loop.
    """

    def __init__(self, guard: AddressGuard, inner: AbstractResolver | None = None) -> None:
        self._guard = guard
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and keep only allowed addresses; raise if none remain."""
        if self._inner is None:
            self._inner = ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        if not results:
            raise OSError(f"no addresses found for {host}")
        allowed = [r for r in results if self._guard.is_allowed(r["host"])]
        if not allowed:
            raise AddressNotAllowedError(host)
        return allowed

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()
