"""Backoff state per homeserver that onbind notifications go to (``onbind_destinations``).

A homeserver that does not answer is backed off as a whole, not message by message: its entries
wait, one probe at a time finds out whether it is back, and its first success lets the whole
queue go. A homeserver that never failed has no row, so the hot path of a healthy federation
writes nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appservice.db.database import AppDatabase


@dataclass(frozen=True)
class Destination:
    """A homeserver's delivery state."""

    destination: str
    # Failures in a row (0: healthy).
    failures: int
    # When the next probe may go out (ms).
    retry_at: int
    last_error: str | None
    last_failure_ts: int | None
    last_success_ts: int | None


_COLUMNS = "destination, failures, retry_at, last_error, last_failure_ts, last_success_ts"


def _destination(row: Any) -> Destination:
    return Destination(
        destination=row["destination"],
        failures=int(row["failures"]),
        retry_at=int(row["retry_at"]),
        last_error=row["last_error"],
        last_failure_ts=row["last_failure_ts"],
        last_success_ts=row["last_success_ts"],
    )


class DestinationStore:
    """SQL for ``onbind_destinations``."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def record_failure(
        self, destination: str, now_ms: int, error: str, initial_ms: int, max_ms: int
    ) -> Destination:
        """One more failure in a row: the next probe waits ``initial`` doubled per failure
        before this one, at most ``max``."""
        async with self._db.transaction() as conn:
            failures = await conn.fetchval(
                "INSERT INTO onbind_destinations (destination, failures, retry_at, last_error,"
                " last_failure_ts) VALUES ($1, 1, $2, $3, $2)"
                " ON CONFLICT (destination) DO UPDATE SET"
                " failures = onbind_destinations.failures + 1, last_error = $3,"
                " last_failure_ts = $2 RETURNING failures",
                destination,
                now_ms,
                error,
            )
            delay_ms = min(max_ms, initial_ms * 2 ** min(int(failures) - 1, 32))
            row = await conn.fetchrow(
                f"UPDATE onbind_destinations SET retry_at = $2 WHERE destination = $1"
                f" RETURNING {_COLUMNS}",
                destination,
                now_ms + delay_ms,
            )
        return _destination(row)

    async def record_success(self, destination: str, now_ms: int) -> bool:
        """The homeserver answered: healthy again. True if it was backed off (its queue may go
        now); a homeserver that was healthy costs one indexed read-only statement."""
        row = await self._db.fetchrow(
            "UPDATE onbind_destinations SET failures = 0, retry_at = 0, last_error = NULL,"
            " last_success_ts = $2 WHERE destination = $1 AND failures > 0 RETURNING destination",
            destination,
            now_ms,
        )
        return row is not None

    async def take_probes(self, now_ms: int, hold_ms: int) -> list[str]:
        """The backed-off homeservers whose next probe is due, each taken by this caller alone
        (their ``retry_at`` moves ``hold`` ahead, so no other instance probes meanwhile)."""
        rows = await self._db.fetch(
            "UPDATE onbind_destinations SET retry_at = $2"
            " WHERE failures > 0 AND retry_at <= $1 RETURNING destination",
            now_ms,
            now_ms + hold_ms,
        )
        return sorted(row["destination"] for row in rows)

    async def get(self, destination: str) -> Destination | None:
        """One homeserver's state (None: never failed)."""
        row = await self._db.fetchrow(
            f"SELECT {_COLUMNS} FROM onbind_destinations WHERE destination = $1", destination
        )
        return None if row is None else _destination(row)

    async def backed_off(self) -> list[Destination]:
        """Every homeserver that is backed off now."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM onbind_destinations WHERE failures > 0 ORDER BY destination"
        )
        return [_destination(row) for row in rows]

    async def backed_off_count(self) -> int:
        """How many homeservers are backed off."""
        value = await self._db.fetchval(
            "SELECT COUNT(*) FROM onbind_destinations WHERE failures > 0"
        )
        return int(value or 0)
