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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from appservice.db.invites import Invite

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
