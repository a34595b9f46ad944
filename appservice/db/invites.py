"""3PID invites stored by store-invite, and their resolution."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from appservice.db.database import AppDatabase
from appservice.db.work_queue import PENDING as OUTBOX_PENDING

PENDING = "pending"
BOUND = "bound"
EXPIRED = "expired"


@dataclass(frozen=True)
class Invite:
    """One 3PID invite."""

    id: str
    token: str
    medium: str
    address: str
    room_id: str
    sender: str
    display_name: str
    ephemeral_public_key: str
    details: dict[str, str]
    created_ts: int
    state: str
    resolved_mxid: str | None
    resolved_ts: int | None
    # The long-term key store-invite answered with (None for invites from before it was kept).
    signing_key_id: str | None = None
    # The ephemeral private key (a secret): written by store-invite for the invite email, never
    # read back by the queries below, not shown in a repr, cleared when the invite is resolved.
    ephemeral_private_key: str | None = field(default=None, repr=False, compare=False)
    # The identity server it was imported from ("sydent", "ma1sd"); None when stored here.
    imported_from: str | None = None


_COLUMNS = (
    "id, token, medium, address, room_id, sender, display_name, ephemeral_public_key, details,"
    " created_ts, state, resolved_mxid, resolved_ts, signing_key_id, imported_from"
)


def _invite(row: Any) -> Invite:
    return Invite(
        id=row["id"],
        token=row["token"],
        medium=row["medium"],
        address=row["address"],
        room_id=row["room_id"],
        sender=row["sender"],
        display_name=row["display_name"],
        ephemeral_public_key=row["ephemeral_public_key"],
        details=json.loads(row["details"]),
        created_ts=row["created_ts"],
        state=row["state"],
        resolved_mxid=row["resolved_mxid"],
        resolved_ts=row["resolved_ts"],
        signing_key_id=row["signing_key_id"],
        imported_from=row["imported_from"],
    )


class InviteStore:
    """SQL for the ``invites`` table."""

    def __init__(self, db: AppDatabase) -> None:
        self._db = db

    async def create_unless_bound(self, invite: Invite) -> bool:
        """Store a new invite unless its 3PID has a binding (False then), in one statement: the
        check and the write cost one round trip, and no binding committed before it is missed.

        A binding committed while it runs can still be missed; the resolution job finds such an
        invite later.
        """
        row = await self._db.fetchrow(
            f"INSERT INTO invites ({_COLUMNS}, ephemeral_private_key)"
            " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16"
            " WHERE NOT EXISTS (SELECT 1 FROM bindings WHERE medium = $3 AND address = $4)"
            " RETURNING id",
            invite.id,
            invite.token,
            invite.medium,
            invite.address,
            invite.room_id,
            invite.sender,
            invite.display_name,
            invite.ephemeral_public_key,
            json.dumps(invite.details, sort_keys=True),
            invite.created_ts,
            invite.state,
            invite.resolved_mxid,
            invite.resolved_ts,
            invite.signing_key_id,
            invite.imported_from,
            invite.ephemeral_private_key,
        )
        return row is not None

    async def delete_pending(self, invite_id: str) -> bool:
        """Remove a still pending invite (its email could not be sent); False when it was
        resolved meanwhile (then it has an onbind queued and must stay)."""
        row = await self._db.fetchrow(
            "DELETE FROM invites WHERE id = $1 AND state = $2 RETURNING id", invite_id, PENDING
        )
        return row is not None

    async def by_id(self, invite_id: str) -> Invite | None:
        """An invite by id."""
        row = await self._db.fetchrow(f"SELECT {_COLUMNS} FROM invites WHERE id = $1", invite_id)
        return _invite(row) if row else None

    async def by_token(self, token: str) -> Invite | None:
        """An invite by its store-invite token."""
        row = await self._db.fetchrow(f"SELECT {_COLUMNS} FROM invites WHERE token = $1", token)
        return _invite(row) if row else None

    async def ephemeral_private_key(self, invite_id: str) -> str | None:
        """The invite's ephemeral private key (None once resolved, or for older invites)."""
        value = await self._db.fetchval(
            "SELECT ephemeral_private_key FROM invites WHERE id = $1", invite_id
        )
        return str(value) if value is not None else None

    async def pending_for(self, medium: str, address: str) -> list[Invite]:
        """Pending invites of one 3PID, oldest first."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM invites WHERE medium = $1 AND address = $2 AND state = $3"
            " ORDER BY created_ts, id",
            medium,
            address,
            PENDING,
        )
        return [_invite(row) for row in rows]

    async def resolve(self, invite_id: str, state: str, mxid: str, now_ms: int) -> bool:
        """Move a pending invite to ``state`` for ``mxid``; False if it was no longer pending.

        Its ephemeral private key goes: the key is revoked, nobody needs it any more."""
        row = await self._db.fetchrow(
            "UPDATE invites SET state = $2, resolved_mxid = $3, resolved_ts = $4,"
            " ephemeral_private_key = NULL WHERE id = $1 AND state = $5 RETURNING id",
            invite_id,
            state,
            mxid,
            now_ms,
            PENDING,
        )
        return row is not None

    async def pending_in_room(self, room_id: str) -> list[Invite]:
        """Pending invites of one room, oldest first."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM invites WHERE room_id = $1 AND state = $2"
            " ORDER BY created_ts, id",
            room_id,
            PENDING,
        )
        return [_invite(row) for row in rows]

    async def set_withdrawn_by(self, invite_id: str, user_id: str) -> None:
        """Note who withdrew an invite (in the transaction that resolves it)."""
        await self._db.execute(
            "UPDATE invites SET withdrawn_by = $2 WHERE id = $1", invite_id, user_id
        )

    async def withdrawn_by(self, invite_id: str) -> str | None:
        """Who withdrew an invite through the bot, None when nobody did."""
        value = await self._db.fetchval("SELECT withdrawn_by FROM invites WHERE id = $1", invite_id)
        return value if isinstance(value, str) else None

    async def pending_created_before(self, cutoff_ms: int, limit: int) -> list[Invite]:
        """Pending invites created before ``cutoff_ms`` (the expired ones), oldest first."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM invites WHERE state = $1 AND created_ts < $2"
            " ORDER BY created_ts, id LIMIT $3",
            PENDING,
            cutoff_ms,
            limit,
        )
        return [_invite(row) for row in rows]

    async def pending_with_binding(self, limit: int) -> list[tuple[Invite, str]]:
        """Pending invites whose 3PID is bound now, with the bound Matrix ID."""
        columns = ", ".join(f"i.{c.strip()}" for c in _COLUMNS.split(","))
        rows = await self._db.fetch(
            f"SELECT {columns}, b.mxid AS bound_mxid FROM invites i"
            " JOIN bindings b ON b.medium = i.medium AND b.address = i.address"
            " WHERE i.state = $1 ORDER BY i.created_ts, i.id LIMIT $2",
            PENDING,
            limit,
        )
        return [(_invite(row), row["bound_mxid"]) for row in rows]

    async def pending_with_store_entry(self, limit: int) -> list[tuple[Invite, str, str]]:
        """Pending invites whose 3PID a copied identity store knows: (invite, store, mxid), one
        row per store that knows it."""
        columns = ", ".join(f"i.{c.strip()}" for c in _COLUMNS.split(","))
        rows = await self._db.fetch(
            f"SELECT {columns}, s.store AS store, s.mxid AS store_mxid FROM invites i"
            " JOIN store_threepids s ON s.medium = i.medium AND s.address = i.address"
            " WHERE i.state = $1 ORDER BY i.created_ts, i.id LIMIT $2",
            PENDING,
            limit,
        )
        return [(_invite(row), row["store"], row["store_mxid"]) for row in rows]

    async def pending_page(self, after: tuple[int, str] | None, limit: int) -> list[Invite]:
        """Pending invites in creation order, after the (created_ts, id) of the previous page."""
        if after is None:
            rows = await self._db.fetch(
                f"SELECT {_COLUMNS} FROM invites WHERE state = $1 ORDER BY created_ts, id LIMIT $2",
                PENDING,
                limit,
            )
        else:
            rows = await self._db.fetch(
                f"SELECT {_COLUMNS} FROM invites WHERE state = $1"
                " AND (created_ts > $2 OR (created_ts = $2 AND id > $3))"
                " ORDER BY created_ts, id LIMIT $4",
                PENDING,
                after[0],
                after[1],
                limit,
            )
        return [_invite(row) for row in rows]

    async def has_pending_key(self, public_key: str) -> bool:
        """Whether ``public_key`` is the ephemeral key of a pending invite."""
        value = await self._db.fetchval(
            "SELECT 1 FROM invites WHERE ephemeral_public_key = $1 AND state = $2 LIMIT 1",
            public_key,
            PENDING,
        )
        return value is not None

    async def has_imported_key(self, public_key: str) -> bool:
        """Whether ``public_key`` is an imported ephemeral key (not linked to one invite) whose
        source still has a pending imported invite."""
        value = await self._db.fetchval(
            "SELECT 1 FROM imported_ephemeral_keys k WHERE k.public_key = $1 AND EXISTS ("
            "SELECT 1 FROM invites i WHERE i.imported_from = k.imported_from AND i.state = $2)",
            public_key,
            PENDING,
        )
        return value is not None

    async def purge_imported_keys(self) -> int:
        """Delete the imported ephemeral keys whose source has no pending imported invite left;
        how many."""
        rows = await self._db.fetch(
            "DELETE FROM imported_ephemeral_keys WHERE NOT EXISTS (SELECT 1 FROM invites i"
            " WHERE i.imported_from = imported_ephemeral_keys.imported_from AND i.state = $1)"
            " RETURNING public_key",
            PENDING,
        )
        return len(rows)

    async def check_resolved_key(self, public_key: str, now_ms: int) -> int | None:
        """A resolved invite's ephemeral key is checked while its onbind is in flight: record
        the time of the first such check and return it (None: no invite with that key has an
        onbind claimed or tried and not yet delivered). One statement, so of two concurrent
        checks the second sees the first one's time."""
        value = await self._db.fetchval(
            "UPDATE invites SET ephemeral_checked_ts = COALESCE(ephemeral_checked_ts, $2)"
            " WHERE ephemeral_public_key = $1 AND state <> $3 AND EXISTS ("
            "SELECT 1 FROM onbind_outbox o WHERE o.invite_id = invites.id AND o.state = $4"
            " AND (o.attempts > 0 OR o.claimed_by IS NOT NULL))"
            " RETURNING ephemeral_checked_ts",
            public_key,
            now_ms,
            PENDING,
            OUTBOX_PENDING,
        )
        return int(value) if value is not None else None

    async def reopen_acceptance(self, invite_id: str) -> None:
        """Forget the first check of the invite's key (an operator retries its onbind)."""
        await self._db.execute(
            "UPDATE invites SET ephemeral_checked_ts = NULL WHERE id = $1", invite_id
        )

    async def count_by_state(self) -> dict[str, int]:
        """How many invites are in each state (read from the index on state)."""
        rows = await self._db.fetch("SELECT state, COUNT(*) AS n FROM invites GROUP BY state")
        return {row["state"]: int(row["n"]) for row in rows}

    async def list(self, state: str | None, limit: int) -> list[Invite]:
        """Invites, newest first, optionally of one state."""
        if state is None:
            rows = await self._db.fetch(
                f"SELECT {_COLUMNS} FROM invites ORDER BY created_ts DESC, id LIMIT $1", limit
            )
        else:
            rows = await self._db.fetch(
                f"SELECT {_COLUMNS} FROM invites WHERE state = $1"
                " ORDER BY created_ts DESC, id LIMIT $2",
                state,
                limit,
            )
        return [_invite(row) for row in rows]
