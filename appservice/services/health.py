"""Readiness: whether this instance can serve, i.e. its database answers and has every migration
this code knows (what ``/health/ready`` and ``/health`` report)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from appservice.db.database import AppDatabase, load_migrations

log = logging.getLogger(__name__)

# A probe that waits longer than this counts the database as unreachable (a load balancer's own
# probe timeout is typically a few seconds).
DATABASE_TIMEOUT_S = 5.0


class HealthCheck:
    """Checks the database for readiness; logs when readiness changes, not on every probe."""

    def __init__(
        self,
        db: AppDatabase,
        appservice_status: dict[str, Any],
        *,
        timeout_s: float = DATABASE_TIMEOUT_S,
        known_versions: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        self._db = db
        self._appservice_status = appservice_status
        self._timeout_s = timeout_s
        self._known_versions = known_versions or (
            lambda: (migration.version for migration in load_migrations(db.dialect))
        )
        self._known: frozenset[int] | None = None
        self._last_reason: str | None = None

    async def readiness(self) -> dict[str, Any]:
        """``{"status": "ok", ...}``, or ``"unavailable"`` with the ``reason``."""
        if self._known is None:
            self._known = frozenset(self._known_versions())
        report: dict[str, Any]
        try:
            applied = await asyncio.wait_for(self._db.applied_migrations(), self._timeout_s)
        except TimeoutError:
            reason = f"the database did not answer within {self._timeout_s:g}s"
            report = {"status": "unavailable", "database": "unavailable", "reason": reason}
            self._changed(reason, None)
        except Exception as e:  # any database failure means not ready, whatever its type
            reason = "the database is unreachable"
            report = {"status": "unavailable", "database": "unavailable", "reason": reason}
            self._changed(reason, f"{type(e).__name__}: {e}")
        else:
            pending = sorted(self._known - applied)
            if pending:
                reason = (
                    "the database schema is older than this code: "
                    f"{len(pending)} migration(s) pending"
                )
                report = {
                    "status": "unavailable",
                    "database": "ok",
                    "migrations": {"pending": pending},
                    "reason": reason,
                }
                self._changed(f"{reason} ({', '.join(f'{v:04d}' for v in pending)})", None)
            else:
                report = {"status": "ok", "database": "ok"}
                self._changed(None, None)
        report["appservice"] = self._appservice_status
        return report

    def _changed(self, reason: str | None, detail: str | None) -> None:
        if reason == self._last_reason:
            return
        if reason is None:
            log.info("ready again: the database answers and its schema is current")
        else:
            log.warning("not ready: %s%s", reason, f" ({detail})" if detail else "")
        self._last_reason = reason
