"""Outbound calls to homeservers: server discovery, SSRF guard, federation client, OpenID."""

from appservice.federation.client import FederationClient
from appservice.federation.discovery import (
    DnsSrvResolver,
    Endpoint,
    FederationError,
    ResolvedServer,
    ServerDiscovery,
    ServerName,
    SrvResolver,
    WellKnownResponse,
    is_valid_server_name,
    parse_server_name,
)
from appservice.federation.guard import AddressGuard, AddressNotAllowedError, GuardedResolver
from appservice.federation.openid import OpenIdError, fetch_openid_user

__all__ = [
    "AddressGuard",
    "AddressNotAllowedError",
    "DnsSrvResolver",
    "Endpoint",
    "FederationClient",
    "FederationError",
    "GuardedResolver",
    "OpenIdError",
    "ResolvedServer",
    "ServerDiscovery",
    "ServerName",
    "SrvResolver",
    "WellKnownResponse",
    "fetch_openid_user",
    "is_valid_server_name",
    "parse_server_name",
]

from appservice.federation.server_keys import (
    ServerKeyError,
    ServerKeyFetcher,
    ServerKeys,
)
from appservice.federation.xmatrix import (
    XMatrixAuthorization,
    XMatrixError,
    parse_x_matrix,
    verify_x_matrix,
)

__all__ += [
    "ServerKeyError",
    "ServerKeyFetcher",
    "ServerKeys",
    "XMatrixAuthorization",
    "XMatrixError",
    "parse_x_matrix",
    "verify_x_matrix",
]
