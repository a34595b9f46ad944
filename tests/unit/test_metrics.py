"""The metrics families: one registry per server, text exposition, scrape hooks."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from appservice.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = asyncio.run(metrics.exposition()).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_server_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.store_invites.inc()
    first.mails_sent.labels(template="validation_email").inc(2)

    assert _samples(first)[("matrix_identity_store_invites_total", ())] == 1
    assert _samples(second)[("matrix_identity_store_invites_total", ())] == 0
    key = ("matrix_identity_mails_sent_total", (("template", "validation_email"),))
    assert _samples(first)[key] == 2
    assert key not in _samples(second)
    assert REGISTRY.get_sample_value("matrix_identity_store_invites_total") is None


def test_exposition_runs_scrape_hooks_for_database_gauges() -> None:
    metrics = Metrics()
    calls: list[int] = []

    async def hook() -> None:
        calls.append(1)
        metrics.invites.labels(state="pending").set(3)
        metrics.onbind_pending.set(5)

    metrics.add_scrape_hook(hook)
    samples = _samples(metrics)
    assert calls == [1]
    assert samples[("matrix_identity_invites", (("state", "pending"),))] == 3
    assert samples[("matrix_identity_onbind_pending", ())] == 5


def test_http_latency_is_a_histogram_by_route_template() -> None:
    metrics = Metrics()
    route = "/_matrix/identity/v2/lookup"
    metrics.http_requests.labels(listener="public", method="POST", route=route, status="200").inc()
    metrics.http_request_duration.labels(listener="public", route=route).observe(0.003)
    samples = _samples(metrics)
    labels = (("listener", "public"), ("route", route))
    assert samples[("matrix_identity_http_request_duration_seconds_count", labels)] == 1
    bucket = (("le", "0.005"), *labels)
    assert samples[("matrix_identity_http_request_duration_seconds_bucket", bucket)] == 1
