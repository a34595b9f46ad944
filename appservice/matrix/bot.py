"""The bot: its room commands (``!3pid list``, ``!3pid withdraw <id>``, ``!3pid help``), which
events of a transaction give it something to do, and doing it (join when invited, leave rooms
where it is alone, forget rooms it was removed from, answer commands, post expiry notices).

Only a message that starts with the command prefix is a command; everything else is ignored.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appservice.clock import Clock
from appservice.db.appservice import AppserviceStore, RoomAction
from appservice.db.database import AppDatabase
from appservice.matrix.state_store import RoomStateStore
from appservice.services.expired_invites import BOT_EXPIRY_NOTICE
from appservice.services.room_invites import RoomInviteCommands, RoomPowers

log = logging.getLogger(__name__)

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
# Someone left or was removed: the bot leaves too if nobody else is left in the room.
BOT_LEAVE_IF_ALONE = "bot_leave_if_alone"
# The bot was kicked or banned: drop what it still had to do there and forget the room.
BOT_REMOVED = "bot_removed"
BOT_KINDS = (BOT_JOIN, BOT_COMMAND, BOT_LEAVE_IF_ALONE, BOT_REMOVED, BOT_EXPIRY_NOTICE)
# What is cancelled when the bot is removed from a room (a join is kept: a re-invite's).
_CANCELLED_ON_REMOVAL = (BOT_COMMAND, BOT_LEAVE_IF_ALONE, BOT_EXPIRY_NOTICE)


def bot_action_for(
    event: dict[str, Any], bot_user_id: str, our_users: frozenset[str], prefix: str
) -> tuple[str, str, str] | None:
    """(kind, room_id, event_id) of what the bot must do for a transaction's event, else None:
    join when invited; forget the room when kicked or banned; see whether it is alone when
    someone else leaves; answer a command message. Messages of our own users (the bot, the
    inviteExpired user) and notices (what bots send) are never commands."""
    room_id, event_id = event.get("room_id"), event.get("event_id")
    content = event.get("content")
    if not isinstance(room_id, str) or not isinstance(event_id, str):
        return None
    if not isinstance(content, dict):
        return None
    if event.get("type") == "m.room.member":
        membership, member = content.get("membership"), event.get("state_key")
        if member == bot_user_id:
            if membership == "invite":
                return BOT_JOIN, room_id, event_id
            if membership == "ban" or (membership == "leave" and event.get("sender") != member):
                return BOT_REMOVED, room_id, event_id
            return None
        if isinstance(member, str) and member not in our_users and membership in ("leave", "ban"):
            return BOT_LEAVE_IF_ALONE, room_id, event_id
        return None
    if event.get("type") != "m.room.message" or event.get("sender") in our_users:
        return None
    body = content.get("body")
    if content.get("msgtype") == "m.notice" or not isinstance(body, str):
        return None
    return (BOT_COMMAND, room_id, event_id) if parse_command(body, prefix) else None


def notice_txn_id(action: RoomAction) -> str:
    """The transaction id of the notice an action posts, the same on every attempt: the
    homeserver then keeps one notice when a retry sends it again."""
    digest = hashlib.sha256(f"{action.kind}\0{action.event_id}".encode()).hexdigest()
    return f"3pid-{digest[:32]}"


async def post_notice(intent: Any, room_id: str, text: str, txn_id: str) -> None:
    """Send ``text`` as an ``m.notice`` of the intent's user with the plain client-server call.
    Not mautrix's ``send_notice``: its power-level pre-check reads the room's create event
    through a call that joins the room first when the state store does not say the user is in
    it (a kicked bot would come back into a public room). The homeserver checks permissions."""
    from mautrix.api import Method, Path

    path = Path.v3.rooms[room_id].send["m.room.message"][txn_id]
    await intent.api.request(Method.PUT, path, {"msgtype": "m.notice", "body": text})


async def room_powers(intent: Any, room_id: str) -> RoomPowers:
    """The room's power levels and creators, from the appservice's state store (kept current by
    the transactions of rooms the bot is in, dropped when it leaves), else from the homeserver.
    A room without an ``m.room.power_levels`` event gets ``power_levels=None`` (the spec's
    defaults apply)."""
    from mautrix.errors import MNotFound
    from mautrix.types import EventType, RoomID

    room = RoomID(room_id)
    levels = await intent.state_store.get_power_levels(room)
    content: dict[str, Any] | None
    if levels is not None:
        content = levels.serialize()
    else:
        try:
            # Never joins by itself (mautrix's intent would): a room the bot left stays left.
            fetched = await intent.get_state_event(
                room, EventType.ROOM_POWER_LEVELS, ensure_joined=False
            )
        except MNotFound:
            content = None
        else:
            await intent.state_store.set_power_levels(room, fetched)
            content = fetched.serialize()
    create = await intent.state_store.get_create(room)
    if create is None:
        create = await intent.get_state_event(
            room, EventType.ROOM_CREATE, format="event", ensure_joined=False
        )
    return RoomPowers(
        content,
        creator=str(create.sender),
        additional_creators=tuple(create.content.additional_creators or ()),
        room_version=str(create.content.room_version or "1"),
    )


class _AnsweredElsewhere(Exception):
    """Another attempt stored its answer first (or the action was finished): roll back ours."""

    def __init__(self, stored: str | None) -> None:
        super().__init__("answered elsewhere")
        self.stored = stored


class RoomBot:
    """Performs the bot's recorded actions (the kinds in BOT_KINDS)."""

    def __init__(
        self,
        commands: RoomInviteCommands,
        store: AppserviceStore,
        db: AppDatabase,
        clock: Clock,
        *,
        prefix: str = DEFAULT_PREFIX,
        our_users: frozenset[str] = frozenset(),
    ) -> None:
        self._commands = commands
        self._store = store
        self._db = db
        self._clock = clock
        self._prefix = prefix
        # The bot and the inviteExpired user: a room with only them is empty.
        self._our_users = our_users

    def performers(self) -> dict[str, Callable[[Any, RoomAction], Awaitable[None]]]:
        """What the room action worker calls for each kind of the bot's actions."""
        return dict.fromkeys(BOT_KINDS, self.perform)

    async def perform(self, intent: Any, action: RoomAction) -> None:
        """Do ``action`` as the bot (errors propagate: the worker retries; a 403 or 404 from
        the homeserver means there is nothing left to do).

        Nothing here joins a room by itself (mautrix's intent would, before reading or sending
        in a room it is not in), so a room the bot was removed from stays left.
        """
        from mautrix.types import RoomID

        room = RoomID(action.room_id)
        if action.kind == BOT_JOIN:
            await intent.join_room_by_id(room)
        elif action.kind == BOT_LEAVE_IF_ALONE:
            await self._leave_if_alone(intent, room)
        elif action.kind == BOT_REMOVED:
            await self._removed(intent, action)
        elif action.kind == BOT_EXPIRY_NOTICE:
            if await self._joined(intent, room):
                await post_notice(intent, room, action.reason, notice_txn_id(action))
        elif action.kind == BOT_COMMAND:
            await self._command(intent, action)

    async def _command(self, intent: Any, action: RoomAction) -> None:
        """Answer a command: computed once (with what it changes) and stored with the action,
        so a retry, e.g. after the notice could not be sent, sends the same answer."""
        from mautrix.types import EventID

        text: str | None = action.reason
        if not text:
            if not await self._joined(intent, action.room_id):
                return  # removed meanwhile: no answer, nothing done
            event = await intent.get_event(
                action.room_id, EventID(action.event_id), ensure_joined=False
            )
            body = getattr(event.content, "body", None)
            command = parse_command(body, self._prefix) if isinstance(body, str) else None
            if command is None:
                return
            text = await self._answer_once(intent, action, str(event.sender), command)
        if text is not None:
            await post_notice(intent, action.room_id, text, notice_txn_id(action))

    async def _answer_once(
        self, intent: Any, action: RoomAction, sender: str, command: Command
    ) -> str | None:
        """The answer, computed and stored in one database transaction with the withdrawal it
        makes; None when the action was finished meanwhile."""
        powers = await room_powers(intent, action.room_id) if command.name == WITHDRAW else None
        try:
            async with self._db.transaction():
                text = await self.answer(action.room_id, sender, command, powers)
                stored = await self._store.save_text(action.id, text)
                if stored != text:
                    raise _AnsweredElsewhere(stored)
        except _AnsweredElsewhere as e:
            return e.stored
        return text

    async def answer(
        self, room_id: str, sender: str, command: Command, powers: RoomPowers | None
    ) -> str:
        """The notice text for ``command`` sent by ``sender`` (``powers``: the room's, for
        withdraw)."""
        if command.name == LIST:
            return await self._commands.list_notice(room_id)
        if command.name == WITHDRAW and powers is not None:
            return await self._commands.withdraw_notice(room_id, command.argument, sender, powers)
        if command.name == HELP:
            return help_text(self._prefix)
        return f"Unknown command {command.argument!r}; try {self._prefix} help."

    async def _joined(self, intent: Any, room_id: str) -> bool:
        """Whether the bot is joined to the room, asked of the homeserver; when it is not, what
        is cached about the room is dropped."""
        from mautrix.errors import MForbidden, MNotFound
        from mautrix.types import EventType, Membership

        try:
            member = await intent.get_state_event(
                room_id, EventType.ROOM_MEMBER, state_key=intent.mxid, ensure_joined=False
            )
        except (MForbidden, MNotFound):
            member = None
        if getattr(member, "membership", None) == Membership.JOIN:
            return True
        log.info("the bot is not in %s (any more)", room_id)
        if isinstance(intent.state_store, RoomStateStore):
            await intent.state_store.forget_room(room_id)
        return False

    async def _leave_if_alone(self, intent: Any, room_id: str) -> None:
        # Asked of the homeserver, not the state store: the store knows only the members whose
        # events arrived since the bot joined. 403 when the bot is not in the room.
        members = await intent.get_joined_members(room_id, ensure_joined=False)
        others = [m for m in members if str(m) not in self._our_users and m != intent.mxid]
        if others:
            return
        log.info("the bot is alone in %s: leaving", room_id)
        await intent.leave_room(room_id)

    async def _removed(self, intent: Any, action: RoomAction) -> None:
        """Kicked or banned: no more answers there, nothing cached about the room, and the
        room forgotten on the homeserver, unless the bot was invited back meanwhile."""
        from mautrix.errors import MatrixRequestError
        from mautrix.types import Membership

        cancelled = await self._store.cancel_open_in_room(
            action.room_id,
            action.user_id,
            _CANCELLED_ON_REMOVAL,
            action.created_ts,
            self._clock.now_ms(),
        )
        membership = await intent.state_store.get_membership(action.room_id, intent.mxid)
        if membership in (Membership.INVITE, Membership.JOIN):
            return
        if isinstance(intent.state_store, RoomStateStore):
            await intent.state_store.forget_room(action.room_id)
        try:
            await intent.forget_room(action.room_id)
        except MatrixRequestError as e:
            if e.http_status != 400:  # 400: in the room again by now
                raise
        log.info(
            "removed from %s: forgotten, %d open action(s) cancelled", action.room_id, cancelled
        )
