"""Builds the configured identity stores (``stores.order``)."""

from __future__ import annotations

from appservice.config import Config
from appservice.identity_stores import IdentityStores
from appservice.identity_stores.base import IdentityStore


def build_identity_stores(config: Config) -> IdentityStores:
    """The stores named in ``stores.order``, in that order (not yet started).

    Each store's module is imported only when it is configured: ldap3 alone costs a server that
    does not use it ~50 ms of start-up and a few MiB.
    """
    stores: list[IdentityStore] = []
    for name in config.stores.order:
        if name == "static":
            from appservice.identity_stores.static import StaticStore

            stores.append(StaticStore(config.stores.static))
        elif name == "rest":
            from appservice.identity_stores.rest import RestStore

            stores.append(RestStore(config.stores.rest))
        elif name == "ldap":
            from appservice.identity_stores.ldap import LdapStore

            stores.append(LdapStore(config.stores.ldap, config.appservice.homeserver_domain))
        elif name == "synapse":
            from appservice.identity_stores.synapse import SynapseStore

            stores.append(SynapseStore(config.stores.synapse, config.appservice.homeserver_domain))
    return IdentityStores(stores)
