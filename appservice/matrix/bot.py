"""The bot's room commands: parsing (``!3pid list``, ``!3pid withdraw <id>``, ``!3pid help``).

Only a message that starts with the command prefix is a command; everything else is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

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
