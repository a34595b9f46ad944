"""Prometheus metrics: their own listener (never the public one), one registry per server."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api_server import Api


async def _scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


async def test_metrics_are_not_served_on_the_public_listener(api: Api) -> None:
    status, _ = await api.request("GET", "/metrics")
    assert status == 404


async def test_metrics_listener_serves_this_servers_families(api: Api) -> None:
    assert api.server.config.metrics.enabled is False  # off by default
    host, port = await api.server.serve_metrics(port=0)
    api.server.metrics.store_invites.inc()
    samples = await _scrape(f"http://{host}:{port}/metrics")
    assert samples["matrix_identity_store_invites_total"] == 1
    assert samples["matrix_identity_onbind_delivered_total"] == 0


async def test_http_requests_are_counted_by_route_template_and_status(api: Api) -> None:
    registry = api.server.metrics.registry
    status, _ = await api.request("GET", "/_matrix/identity/v2")
    assert status == 200
    status, _ = await api.request("GET", "/_matrix/identity/v2/hash_details")
    assert status == 401
    await api.request("GET", "/no/such/path/abc123")

    def count(route: str, status: str) -> float | None:
        labels = {"listener": "public", "method": "GET", "route": route, "status": status}
        return registry.get_sample_value("matrix_identity_http_requests_total", labels)

    assert count("/_matrix/identity/v2", "200") == 1
    assert count("/_matrix/identity/v2/hash_details", "401") == 1
    assert count("unmatched", "404") == 1
    histogram = {"listener": "public", "route": "/_matrix/identity/v2"}
    name = "matrix_identity_http_request_duration_seconds_count"
    assert registry.get_sample_value(name, histogram) == 1
