"""3PID validation sessions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appservice.db.database import AppDatabase


@dataclass(frozen=True)
class ValidationSession:
    """A validation session (the token itself is never stored, only its hash)."""

    sid: str
    medium: str
    address: str
    client_secret: str
    token_hash: str
    send_attempt: int
    next_link: str | None
    created_ts: int
    modified_ts: int
    validated_ts: int | None
    failed_attempts: int


_COLUMNS = (
    "sid, medium, address, client_secret, token_hash, send_attempt, next_link, created_ts,"
    " modified_ts, validated_ts, failed_attempts"
)


def _session(row: Any) -> ValidationSession:
    return ValidationSession(
        sid=row["sid"],
        medium=row["medium"],
        address=row["address"],
        client_secret=row["client_secret"],
        token_hash=row["token_hash"],
        send_attempt=row["send_attempt"],
        next_link=row["next_link"],
        created_ts=row["created_ts"],
        modified_ts=row["modified_ts"],
        validated_ts=row["validated_ts"],
        failed_attempts=row["failed_attempts"],
    )


class SessionStore:
    """SQL for the ``validation_sessions`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def by_key(
        self, medium: str, address: str, client_secret: str
    ) -> ValidationSession | None:
        """The session of one (medium, address, client_secret)."""
        row = await self._db.read_row(
            f"SELECT {_COLUMNS} FROM validation_sessions"
            " WHERE medium = $1 AND address = $2 AND client_secret = $3",
            medium,
            address,
            client_secret,
        )
        return _session(row) if row else None

    async def by_sid(self, sid: str) -> ValidationSession | None:
        """A session by id."""
        row = await self._db.read_row(
            f"SELECT {_COLUMNS} FROM validation_sessions WHERE sid = $1", sid
        )
        return _session(row) if row else None

    async def create(self, session: ValidationSession) -> ValidationSession:
        """Insert a new session; if one with the same key appeared meanwhile, return that one."""
        row = await self._db.fetchrow(
            f"INSERT INTO validation_sessions ({_COLUMNS})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            " ON CONFLICT (medium, address, client_secret) DO NOTHING RETURNING sid",
            session.sid,
            session.medium,
            session.address,
            session.client_secret,
            session.token_hash,
            session.send_attempt,
            session.next_link,
            session.created_ts,
            session.modified_ts,
            session.validated_ts,
            session.failed_attempts,
        )
        if row is not None:
            return session
        existing = await self.by_key(session.medium, session.address, session.client_secret)
        assert existing is not None
        return existing

    async def resend(
        self,
        sid: str,
        token_hash: str,
        send_attempt: int,
        next_link: str | None,
        max_attempts: int,
    ) -> bool:
        """Record a new token sent for a higher ``send_attempt``; False if it was not higher or
        the session died of wrong tokens meanwhile (a dead session is never revived)."""
        row = await self._db.fetchrow(
            "UPDATE validation_sessions SET token_hash = $2, send_attempt = $3, next_link = $4,"
            " failed_attempts = 0"
            " WHERE sid = $1 AND send_attempt < $3 AND failed_attempts < $5 RETURNING sid",
            sid,
            token_hash,
            send_attempt,
            next_link,
            max_attempts,
        )
        return row is not None

    async def revert_resend(self, previous: ValidationSession, new_token_hash: str) -> None:
        """Undo :meth:`resend` (the new token could not be sent); no-op if changed since."""
        await self._db.execute(
            "UPDATE validation_sessions SET token_hash = $3, send_attempt = $4, next_link = $5,"
            " failed_attempts = $6 WHERE sid = $1 AND token_hash = $2",
            previous.sid,
            new_token_hash,
            previous.token_hash,
            previous.send_attempt,
            previous.next_link,
            previous.failed_attempts,
        )

    async def reserve_attempt(self, sid: str, max_attempts: int) -> tuple[str, int] | None:
        """Reserve one token comparison: count it as a failure up front, unless
        ``max_attempts`` are used already. Returns the token hash to compare with and the
        attempts used so far (this one included), or None when none is left.

        One conditional UPDATE, so however many requests arrive together, at most
        ``max_attempts`` of them get a hash to compare with.
        """
        row = await self._db.fetchrow(
            "UPDATE validation_sessions SET failed_attempts = failed_attempts + 1"
            " WHERE sid = $1 AND failed_attempts < $2 RETURNING token_hash, failed_attempts",
            sid,
            max_attempts,
        )
        return None if row is None else (row["token_hash"], int(row["failed_attempts"]))

    async def mark_validated(self, sid: str, token_hash: str, now_ms: int) -> bool:
        """Record a successful validation of the token ``token_hash`` (which also counts as a
        modification) and give back the attempt reserved for it. False when that token was
        replaced meanwhile."""
        row = await self._db.fetchrow(
            "UPDATE validation_sessions SET validated_ts = COALESCE(validated_ts, $3),"
            " modified_ts = $3,"
            " failed_attempts = CASE WHEN failed_attempts > 0 THEN failed_attempts - 1 ELSE 0 END"
            " WHERE sid = $1 AND token_hash = $2 RETURNING sid",
            sid,
            token_hash,
            now_ms,
        )
        return row is not None

    async def delete_dead(self, sid: str, max_attempts: int) -> None:
        """Remove a session that used up its attempts (a no-op if it did not)."""
        await self._db.execute(
            "DELETE FROM validation_sessions WHERE sid = $1 AND failed_attempts >= $2",
            sid,
            max_attempts,
        )

    async def delete(self, sid: str) -> None:
        """Remove a session."""
        await self._db.execute("DELETE FROM validation_sessions WHERE sid = $1", sid)

    async def purge_modified_before(self, cutoff_ms: int) -> int:
        """Delete sessions last changed before ``cutoff_ms``; returns how many."""
        rows = await self._db.fetch(
            "DELETE FROM validation_sessions WHERE modified_ts < $1 RETURNING sid", cutoff_ms
        )
        return len(rows)
