"""The rules of the bot's room commands: who may withdraw a 3PID invite, and which invite a
short id names.

Who may withdraw: the invite's sender, or a member whose power level in the room is at least the
room's ``kick`` level. Power levels as the spec defines them:

- with an ``m.room.power_levels`` event: ``users[user]``, else ``users_default`` (0 if absent);
  ``kick`` from the event, 50 if absent;
- without one: the room's creator (the sender of ``m.room.create``) has 100, everyone else 0,
  and ``kick`` is 50;
- in room versions with creator power (12 and later) the creators (the sender of
  ``m.room.create`` and its ``additional_creators``) rank above every power level.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from appservice.db.invites import Invite, InviteStore
from appservice.services.invites import InviteService

DEFAULT_KICK = 50
CREATOR_WITHOUT_POWER_LEVELS = 100
# Above any power level an event may hold (canonical JSON integers stop at 2**53 - 1).
CREATOR_POWER = 2**53
# Room versions before creators ranked above power levels.
_VERSIONS_WITHOUT_CREATOR_POWER = frozenset({"", *(str(v) for v in range(1, 12))})
SHORT_ID_LENGTH = 8


@dataclass(frozen=True)
class RoomPowers:
    """What decides a member's power level in a room."""

    # The content of m.room.power_levels, None when the room has none.
    power_levels: Mapping[str, object] | None
    # The sender of m.room.create, its additional_creators, and the room version.
    creator: str
    additional_creators: Sequence[str] = field(default_factory=tuple)
    room_version: str = "1"

    def _int(self, value: object, default: int) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    @property
    def kick(self) -> int:
        """The level needed to kick (and to withdraw someone else's invite)."""
        if self.power_levels is None:
            return DEFAULT_KICK
        return self._int(self.power_levels.get("kick"), DEFAULT_KICK)

    def level_of(self, user_id: str) -> int:
        """``user_id``'s power level in the room."""
        creators = {self.creator, *self.additional_creators}
        if self.room_version not in _VERSIONS_WITHOUT_CREATOR_POWER and user_id in creators:
            return CREATOR_POWER
        if self.power_levels is None:
            return CREATOR_WITHOUT_POWER_LEVELS if user_id == self.creator else 0
        default = self._int(self.power_levels.get("users_default"), 0)
        users = self.power_levels.get("users")
        if isinstance(users, Mapping):
            return self._int(users.get(user_id), default)
        return default


def may_withdraw(invite: Invite, user_id: str, powers: RoomPowers) -> bool:
    """Whether ``user_id`` may withdraw ``invite``: its sender, or someone who may kick."""
    return user_id == invite.sender or powers.level_of(user_id) >= powers.kick


def short_id(invite: Invite) -> str:
    """The id the bot shows for an invite."""
    return invite.id[:SHORT_ID_LENGTH]


def match_invite(invites: Sequence[Invite], given: str) -> list[Invite]:
    """The invites whose id starts with ``given`` (case-insensitive); an exact id wins."""
    given = given.strip().lower()
    if not given:
        return []
    exact = [i for i in invites if i.id == given]
    if exact:
        return exact
    return [i for i in invites if i.id.startswith(given)]


def _date(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


class RoomInviteCommands:
    """What the bot answers to ``list`` and ``withdraw`` in a room (the text of its notice)."""

    def __init__(
        self, store: InviteStore, invites: InviteService, expire_after_s: float | None
    ) -> None:
        self._store = store
        self._invites = invites
        # None: invites do not expire.
        self._expire_after_s = expire_after_s

    async def list_notice(self, room_id: str) -> str:
        """The room's pending 3PID invites, one per line."""
        pending = await self._store.pending_in_room(room_id)
        if not pending:
            return "No pending invites to email addresses in this room."
        lines = [f"Pending invites ({len(pending)}):"]
        for invite in pending:
            expires = (
                _date(invite.created_ts + int(self._expire_after_s * 1000))
                if self._expire_after_s is not None
                else "never"
            )
            lines.append(
                f"{short_id(invite)}  {invite.display_name}  by {invite.sender}"
                f"  on {_date(invite.created_ts)}  expires {expires}"
            )
        return "\n".join(lines)

    async def withdraw_notice(
        self, room_id: str, given: str, user_id: str, powers: RoomPowers
    ) -> str:
        """Withdraw the room's invite named by ``given`` for ``user_id`` if the rule allows."""
        matches = match_invite(await self._store.pending_in_room(room_id), given)
        if not matches:
            return f"No pending invite {given!r} in this room (see list)."
        if len(matches) > 1:
            ids = ", ".join(short_id(i) for i in matches)
            return f"{given!r} names {len(matches)} invites ({ids}): give more of the id."
        [invite] = matches
        if not may_withdraw(invite, user_id, powers):
            return (
                f"You may not withdraw {short_id(invite)}: only its sender or members"
                f" with power level {powers.kick} (kick) may."
            )
        if not await self._invites.withdraw(invite.id, user_id):
            return f"Invite {short_id(invite)} was resolved meanwhile; nothing changed."
        return f"Withdrew the invite {short_id(invite)} to {invite.display_name}."
