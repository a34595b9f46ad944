"""Builds the configured identity stores (``stores.order``)."""

from __future__ import annotations

from appservice.config import Config
from appservice.identity_stores import IdentityStores
from appservice.identity_stores.base import IdentityStore
from appservice.identity_stores.ldap import LdapStore
from appservice.identity_stores.rest import RestStore
from appservice.identity_stores.static import StaticStore
from appservice.identity_stores.synapse import SynapseStore


def build_identity_stores(config: Config) -> IdentityStores:
    """The stores named in ``stores.order``, in that order (not yet started)."""
    stores: list[IdentityStore] = []
    for name in config.stores.order:
        if name == "static":
            stores.append(StaticStore(config.stores.static))
        elif name == "rest":
            stores.append(RestStore(config.stores.rest))
        elif name == "ldap":
            stores.append(LdapStore(config.stores.ldap, config.appservice.homeserver_domain))
        elif name == "synapse":
            stores.append(SynapseStore(config.stores.synapse, config.appservice.homeserver_domain))
    return IdentityStores(stores)
