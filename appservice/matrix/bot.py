"""The bot's room commands: parsing (``!3pid list``, ``!3pid withdraw <id>``, ``!3pid help``).

Only a message that starts with the command prefix is a command; everything else is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
