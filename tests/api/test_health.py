"""Liveness and readiness: ``/health/live``, ``/health/ready`` and ``/health`` (readiness)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest

from appservice.db.database import AppDatabase, load_migrations
from appservice.services.health import HealthCheck
from tests.support.api_server import Api

READY = {"status": "ok", "database": "ok", "appservice": {"enabled": False}}


async def test_live_and_ready_answer_200_while_the_database_answers(api: Api) -> None:
    assert await api.request("GET", "/health/live") == (200, {"status": "ok"})
    assert await api.request("GET", "/health/ready") == (200, READY)
    assert await api.request("GET", "/health") == (200, READY)


async def test_unreachable_database_is_not_ready_but_live(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    await api.server.db.stop()  # every connection closed, as when the database goes away
    for path in ("/health/ready", "/health"):
        status, body = await api.request("GET", path)
        assert status == 503
        assert body["status"] == "unavailable"
        assert body["database"] == "unavailable"
        assert body["reason"] == "the database is unreachable"
    assert await api.request("GET", "/health/live") == (200, {"status": "ok"})
    # Logged once when readiness changed, not on every probe.
    warnings = [r for r in caplog.records if r.getMessage().startswith("not ready:")]
    assert len(warnings) == 1
    assert "the database is unreachable" in warnings[0].getMessage()


async def test_pending_migration_is_not_ready_until_migrated(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "appservice.services.health")
    latest = load_migrations(api.server.db.dialect)[-1].version
    # As after restoring a backup taken before the latest migration (or while another instance
    # has not migrated yet): the schema lacks the latest migration this code knows.
    await api.server.db.execute("DELETE FROM schema_migrations WHERE version = $1", latest)
    status, body = await api.request("GET", "/health/ready")
    assert status == 503
    assert body["database"] == "ok"
    assert body["migrations"] == {"pending": [latest]}
    assert "migration(s) pending" in body["reason"]
    assert (await api.request("GET", "/health"))[0] == 503
    assert await api.request("GET", "/health/live") == (200, {"status": "ok"})

    await api.server.db.execute(
        "INSERT INTO schema_migrations (version, name, applied_ts) VALUES ($1, 'again', 0)", latest
    )
    assert await api.request("GET", "/health/ready") == (200, READY)
    messages = [r.getMessage() for r in caplog.records if r.name == "appservice.services.health"]
    assert messages == [
        f"not ready: the database schema is older than this code: 1 migration(s) pending "
        f"({latest:04d})",
        "ready again: the database answers and its schema is current",
    ]


async def test_migration_newer_than_the_database_is_pending(api: Api) -> None:
    known = [m.version for m in load_migrations(api.server.db.dialect)]
    check = HealthCheck(api.server.db, {}, known_versions=lambda: [*known, 9999])
    report = await check.readiness()
    assert report["status"] == "unavailable"
    assert report["migrations"] == {"pending": [9999]}


class HangingDatabase:
    async def applied_migrations(self) -> set[int]:
        await asyncio.sleep(3600)
        raise AssertionError("not reached")


async def test_database_that_does_not_answer_is_not_ready() -> None:
    db = cast(AppDatabase, HangingDatabase())
    check = HealthCheck(db, {"enabled": False}, timeout_s=0.05, known_versions=lambda: [1])
    report: dict[str, Any] = await check.readiness()
    assert report == {
        "status": "unavailable",
        "database": "unavailable",
        "reason": "the database did not answer within 0.05s",
        "appservice": {"enabled": False},
    }


async def test_health_lines_during_a_request_carry_its_id(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await api.server.db.stop()
    response = await api.client.get("/health/ready")
    assert response.status == 503
    request_id = response.headers["X-Request-ID"]
    (warning,) = [r for r in caplog.records if r.getMessage().startswith("not ready:")]
    assert getattr(warning, "request_id", None) == request_id
