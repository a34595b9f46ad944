"""The Prometheus families, in one place.

Every server builds its own :class:`Metrics` on its own ``CollectorRegistry`` (never the
process-wide default registry): tests start many servers in one process, and several instances
each export their own. Services and jobs receive the ``Metrics`` object from the composition
root and update it; updates are plain counter increments, cheap enough for the hot paths.
Gauges that come from the database are filled at scrape time by callbacks registered with
:meth:`Metrics.add_scrape_hook` (each one cached briefly by its owner).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

PREFIX = "matrix_identity"

# Methods counted by name; any other is counted as "other" (bounded cardinality).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

# Seconds; request latencies of an identity server sit between a millisecond and a few seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """All the families one server exports, registered on a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._scrape_hooks: list[Callable[[], Awaitable[None]]] = []
        r = self.registry
        p = PREFIX

        # HTTP: route is the route template (bounded cardinality), never the raw path.
        self.http_requests = Counter(
            f"{p}_http_requests",
            "HTTP requests handled, by listener, method, route template and status.",
            ["listener", "method", "route", "status"],
            registry=r,
        )
        self.http_request_duration = Histogram(
            f"{p}_http_request_duration_seconds",
            "Time to handle an HTTP request, by listener and route template.",
            ["listener", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # Notifications.
        self.mails_sent = Counter(
            f"{p}_mails_sent",
            "Mails handed to the mail server, by template.",
            ["template"],
            registry=r,
        )
        self.mails_failed = Counter(
            f"{p}_mails_failed",
            "Mails that could not be sent, by template.",
            ["template"],
            registry=r,
        )
        self.sms_sent = Counter(
            f"{p}_sms_sent",
            "SMS handed to the SMS provider, by template.",
            ["template"],
            registry=r,
        )
        self.sms_failed = Counter(
            f"{p}_sms_failed", "SMS that could not be sent, by template.", ["template"], registry=r
        )

        # Validation sessions.
        self.validation_sessions_started = Counter(
            f"{p}_validation_sessions_started",
            "Validation sessions started (requestToken), by medium.",
            ["medium"],
            registry=r,
        )
        self.validation_sessions_validated = Counter(
            f"{p}_validation_sessions_validated",
            "Validation sessions validated (submitToken), by medium.",
            ["medium"],
            registry=r,
        )

        # Lookups.
        self.lookup_requests = Counter(
            f"{p}_lookup_requests", "Lookup requests answered.", registry=r
        )
        self.lookup_addresses = Counter(
            f"{p}_lookup_addresses", "Addresses asked for in lookups.", registry=r
        )
        self.lookup_hits = Counter(
            f"{p}_lookup_hits", "Looked-up addresses that were bound.", registry=r
        )
        self.lookup_misses = Counter(
            f"{p}_lookup_misses", "Looked-up addresses that were not bound.", registry=r
        )

        # Invites.
        self.store_invites = Counter(
            f"{p}_store_invites", "Third-party invites stored (store-invite).", registry=r
        )
        self.invites = Gauge(
            f"{p}_invites",
            "Stored third-party invites by state (read from the database at scrape time).",
            ["state"],
            registry=r,
        )
        self.expired_invites_rejected = Counter(
            f"{p}_expired_invites_rejected",
            "Expired invites rejected by the appservice user.",
            registry=r,
        )

        # Onbind outbox.
        self.onbind_pending = Gauge(
            f"{p}_onbind_pending", "Onbind notifications waiting to be delivered.", registry=r
        )
        self.onbind_oldest_pending_age = Gauge(
            f"{p}_onbind_oldest_pending_age_seconds",
            "Age of the oldest onbind notification waiting.",
            registry=r,
        )
        self.onbind_homeservers_backed_off = Gauge(
            f"{p}_onbind_homeservers_backed_off",
            "Homeservers that do not answer and are probed one request at a time.",
            registry=r,
        )
        self.onbind_attempts = Counter(
            f"{p}_onbind_attempts", "Onbind delivery attempts.", registry=r
        )
        self.onbind_delivered = Counter(
            f"{p}_onbind_delivered", "Onbind notifications delivered.", registry=r
        )
        self.onbind_failed = Counter(
            f"{p}_onbind_failed",
            "Onbind notifications given up: refused for good by the homeserver, or too old.",
            registry=r,
        )

        # Appservice.
        self.appservice_transactions = Counter(
            f"{p}_appservice_transactions",
            "Appservice transactions from the homeserver, by result: recorded (acknowledged; a"
            " repeated one too) or error (answered 500, the homeserver retries).",
            ["result"],
            registry=r,
        )

        # Rate limits.
        self.ratelimit_refusals = Counter(
            f"{p}_ratelimit_refusals",
            "Requests refused by a rate limit, by limit name.",
            ["limit"],
            registry=r,
        )

        # Identity stores.
        self.store_syncs = Counter(
            f"{p}_identity_store_syncs",
            "Identity-store syncs run, by store.",
            ["store"],
            registry=r,
        )
        self.store_sync_errors = Counter(
            f"{p}_identity_store_sync_errors",
            "Identity-store syncs that failed, by store.",
            ["store"],
            registry=r,
        )

        # Database pool (asyncpg: size and idle; SQLite has one connection, reports nothing here).
        self.db_pool_size = Gauge(
            f"{p}_db_pool_size", "Connections open in the database pool.", registry=r
        )
        self.db_pool_in_use = Gauge(
            f"{p}_db_pool_in_use", "Connections of the database pool in use.", registry=r
        )

    def add_scrape_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Await ``hook`` before each exposition (to fill gauges from state kept elsewhere,
        such as the database; the hook caches what is expensive to read)."""
        self._scrape_hooks.append(hook)

    async def exposition(self) -> bytes:
        """The text exposition of every family, after running the scrape hooks."""
        for hook in self._scrape_hooks:
            await hook()
        return generate_latest(self.registry)

    def http_middleware(self, listener: str) -> Callable[..., Awaitable[web.StreamResponse]]:
        """An aiohttp middleware counting requests by route template and status, with latency.

        Place it inside the middleware that turns errors into responses, so it sees the status
        sent. The route is the template (``/_matrix/identity/v2/{x}``), never the raw path.
        """
        requests = self.http_requests
        duration = self.http_request_duration

        @web.middleware
        async def middleware(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            start = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as e:
                status = e.status
                raise
            finally:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else "unmatched"
                method = request.method if request.method in KNOWN_METHODS else "other"
                requests.labels(listener, method, route, str(status)).inc()
                duration.labels(listener, route).observe(time.perf_counter() - start)

        return middleware
