"""The bot's room commands: parsing (``!3pid list``, ``!3pid withdraw <id>``, ``!3pid help``).

Only a message that starts with the command prefix is a command; everything else is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appservice.services.room_invites import RoomInviteCommands, RoomPowers

DEFAULT_PREFIX = "!3pid"

LIST = "list"
WITHDRAW = "withdraw"
HELP = "help"
UNKNOWN = "unknown"

HELP_TEXT = (
    "{prefix} list: the room's pending invites to email addresses\n"
    "{prefix} withdraw <id>: withdraw one (its id from the list, or a unique prefix of it);"
    " allowed to whoever sent it and to members who may kick\n"
    "{prefix} help: this text"
)


@dataclass(frozen=True)
class Command:
    """A parsed command: its name (LIST, WITHDRAW, HELP or UNKNOWN) and its argument."""

    name: str
    argument: str = ""


def parse_command(body: str, prefix: str = DEFAULT_PREFIX) -> Command | None:
    """The command in a message body, or None when the message is not addressed to the bot.

    The prefix must be a word of its own (``!3pidx`` is not a command). ``withdraw`` needs
    exactly one argument; a missing or extra one makes the command UNKNOWN (the bot then
    answers with a hint).
    """
    words = body.strip().split()
    if not words or words[0].lower() != prefix.lower():
        return None
    if len(words) == 1:
        return Command(HELP)
    name, arguments = words[1].lower(), words[2:]
    if name in (LIST, HELP) and not arguments:
        return Command(name)
    if name == WITHDRAW and len(arguments) == 1:
        return Command(WITHDRAW, arguments[0])
    return Command(UNKNOWN, " ".join(words[1:]))


def help_text(prefix: str = DEFAULT_PREFIX) -> str:
    """What ``help`` answers."""
    return HELP_TEXT.format(prefix=prefix)


BOT_JOIN = "bot_join"
BOT_COMMAND = "bot_command"


def bot_action_for(
    event: dict[str, Any], bot_user_id: str, our_users: frozenset[str], prefix: str
) -> tuple[str, str, str] | None:
    """(kind, room_id, event_id) of what the bot must do for a transaction's event, else None:
    join when invited, answer a command message. Messages of our own users (the bot, the
    inviteExpired user) and notices (what bots send) are never commands."""
    room_id, event_id = event.get("room_id"), event.get("event_id")
    content = event.get("content")
    if not isinstance(room_id, str) or not isinstance(event_id, str):
        return None
    if not isinstance(content, dict):
        return None
    if event.get("type") == "m.room.member" and event.get("state_key") == bot_user_id:
        return (BOT_JOIN, room_id, event_id) if content.get("membership") == "invite" else None
    if event.get("type") != "m.room.message" or event.get("sender") in our_users:
        return None
    body = content.get("body")
    if content.get("msgtype") == "m.notice" or not isinstance(body, str):
        return None
    return (BOT_COMMAND, room_id, event_id) if parse_command(body, prefix) else None


async def room_powers(intent: Any, room_id: str) -> RoomPowers:
    """The room's power levels and creators, from the appservice's state store (kept current by
    the transactions of rooms the bot is in), else from the homeserver. A room without an
    ``m.room.power_levels`` event gets ``power_levels=None`` (the spec's defaults apply)."""
    from mautrix.errors import MNotFound
    from mautrix.types import EventType, RoomID

    room = RoomID(room_id)
    levels = await intent.state_store.get_power_levels(room)
    content: dict[str, Any] | None
    if levels is not None:
        content = levels.serialize()
    else:
        try:
            fetched = await intent.get_state_event(room, EventType.ROOM_POWER_LEVELS)
        except MNotFound:
            content = None
        else:
            await intent.state_store.set_power_levels(room, fetched)
            content = fetched.serialize()
    create = await intent.state_store.get_create(room)
    if create is None:
        create = await intent.get_state_event(room, EventType.ROOM_CREATE, format="event")
    return RoomPowers(
        content,
        creator=str(create.sender),
        additional_creators=tuple(create.content.additional_creators or ()),
        room_version=str(create.content.room_version or "1"),
    )


class RoomBot:
    """Performs the bot's recorded actions: join when invited, answer a command with a notice."""

    def __init__(self, commands: RoomInviteCommands, prefix: str = DEFAULT_PREFIX) -> None:
        self._commands = commands
        self._prefix = prefix

    async def perform(self, intent: Any, kind: str, room_id: str, event_id: str) -> None:
        """Do ``kind`` for the event ``event_id`` (errors propagate: the worker retries)."""
        from mautrix.types import EventID, RoomID

        room = RoomID(room_id)
        if kind == BOT_JOIN:
            await intent.join_room_by_id(room)
            return
        event = await intent.get_event(room, EventID(event_id))
        body = getattr(event.content, "body", None)
        command = parse_command(body, self._prefix) if isinstance(body, str) else None
        if command is None:
            return
        await intent.send_notice(
            room, await self.answer(intent, room_id, str(event.sender), command)
        )

    async def answer(self, intent: Any, room_id: str, sender: str, command: Command) -> str:
        """The notice text for ``command`` sent by ``sender``."""
        if command.name == LIST:
            return await self._commands.list_notice(room_id)
        if command.name == WITHDRAW:
            powers = await room_powers(intent, room_id)
            return await self._commands.withdraw_notice(room_id, command.argument, sender, powers)
        if command.name == HELP:
            return help_text(self._prefix)
        return f"Unknown command {command.argument!r}; try {self._prefix} help."
