"""mautrix's state store (in our database) with a way to forget a room.

The store is a cache fed by the transactions of the rooms our users are in. Once the bot has
left a room (or was kicked or banned), no more events of that room arrive, so what the store
holds about it goes stale: a power-levels change made meanwhile would be missed if the bot came
back. The room's rows are therefore dropped when the bot leaves; they are read again from the
homeserver when needed.
"""

from __future__ import annotations

from mautrix.appservice.state_store.asyncpg import PgASStateStore


class RoomStateStore(PgASStateStore):
    """``PgASStateStore`` plus :meth:`forget_room`."""

    async def forget_room(self, room_id: str) -> None:
        """Drop everything cached about the room (members, power levels, create event)."""
        await self.db.execute("DELETE FROM mx_user_profile WHERE room_id = $1", room_id)
        await self.db.execute("DELETE FROM mx_room_state WHERE room_id = $1", room_id)
