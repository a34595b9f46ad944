"""The bot's list and withdraw answers on a real database (both dialects)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from mautrix.errors import MNotFound
from mautrix.types import PowerLevelStateEventContent, StateEvent, UserID

from appservice.db.invites import EXPIRED, PENDING, InviteStore
from appservice.matrix.bot import BOT_COMMAND, RoomBot, room_powers
from appservice.services.room_invites import RoomInviteCommands, RoomPowers, short_id
from tests.api.test_invites import ROOM, invite
from tests.support.api_server import Api

ALICE = "@alice:hs.test"
BOB = "@bob:hs.test"


def commands(api: Api) -> RoomInviteCommands:
    return RoomInviteCommands(InviteStore(api.server.db), api.server.invites, 7 * 86400.0)


ADMIN_ROOM = RoomPowers({"users": {ALICE: 100}, "kick": 50}, creator=ALICE, room_version="10")


async def test_list_shows_the_rooms_pending_invites_redacted(quiet: Api) -> None:
    bot = commands(quiet)
    assert "No pending invites" in await bot.list_notice(ROOM)
    pending = await invite(quiet, "carol@example.com")
    await invite(quiet, "dave@example.com", room_id="!other:hs.test")
    text = await bot.list_notice(ROOM)
    assert text.startswith("Pending invites (1):")
    assert short_id(pending) in text and pending.display_name in text
    assert pending.sender in text and "expires " in text
    assert "carol@example.com" not in text and "dave" not in text


async def test_a_member_below_kick_is_refused_and_nothing_changes(quiet: Api) -> None:
    pending = await invite(quiet, "carol@example.com")
    text = await commands(quiet).withdraw_notice(ROOM, short_id(pending)[:4], BOB, ADMIN_ROOM)
    assert text.startswith("You may not withdraw")
    stored = await InviteStore(quiet.server.db).by_id(pending.id)
    assert stored is not None and stored.state == PENDING


async def test_an_admin_withdraws_by_prefix_once(quiet: Api) -> None:
    pending = await invite(quiet, "carol@example.com")
    bot = commands(quiet)
    text = await bot.withdraw_notice(ROOM, short_id(pending)[:5], ALICE, ADMIN_ROOM)
    assert text == f"Withdrew the invite {short_id(pending)} to {pending.display_name}."
    store = InviteStore(quiet.server.db)
    stored = await store.by_id(pending.id)
    assert stored is not None and stored.state == EXPIRED
    assert await store.withdrawn_by(pending.id) == ALICE
    assert "No pending invites" in await bot.list_notice(ROOM)
    again = await bot.withdraw_notice(ROOM, short_id(pending), ALICE, ADMIN_ROOM)
    assert again.startswith("No pending invite")


async def test_the_sender_withdraws_their_own_invite(quiet: Api) -> None:
    pending = await invite(quiet, "carol@example.com")
    text = await commands(quiet).withdraw_notice(ROOM, pending.id, pending.sender, ADMIN_ROOM)
    assert text.startswith("Withdrew")


class FakeStateStore:
    def __init__(self, levels: Any) -> None:
        self.levels = levels
        self.saved: list[Any] = []

    async def get_power_levels(self, room_id: str) -> Any:
        return self.levels

    async def set_power_levels(self, room_id: str, content: Any) -> None:
        self.saved.append(content)

    async def get_create(self, room_id: str) -> Any:
        return StateEvent.deserialize(
            {
                "type": "m.room.create",
                "room_id": room_id,
                "event_id": "$create",
                "sender": ALICE,
                "origin_server_ts": 0,
                "state_key": "",
                "content": {"room_version": "10"},
            }
        )


class FakeIntent:
    """The part of mautrix's IntentAPI the bot uses; the room has no power-levels event."""

    def __init__(self, levels: Any = None) -> None:
        self.state_store = FakeStateStore(levels)
        self.notices: list[str] = []
        self.messages: dict[str, tuple[str, str]] = {}

    async def get_state_event(self, room_id: str, event_type: Any, **kw: Any) -> Any:
        raise MNotFound(404, "no power levels")

    async def get_event(self, room_id: str, event_id: str) -> Any:
        sender, body = self.messages[event_id]
        return SimpleNamespace(sender=sender, content=SimpleNamespace(body=body))

    async def send_notice(self, room_id: str, text: str) -> None:
        self.notices.append(text)


async def test_without_power_levels_only_the_creator_and_the_sender_may_withdraw(
    quiet: Api,
) -> None:
    pending = await invite(quiet, "carol@example.com")
    bot = RoomBot(commands(quiet))
    intent = FakeIntent()
    powers = await room_powers(intent, ROOM)
    assert powers.power_levels is None and powers.creator == ALICE
    intent.messages = {
        "$1": (BOB, f"!3pid withdraw {short_id(pending)}"),
        "$2": (ALICE, "!3pid list"),
        "$3": (ALICE, f"!3pid withdraw {short_id(pending)[:3]}"),
        "$4": (ALICE, "!3pid list"),
        "$5": (ALICE, "!3pid nonsense"),
    }
    for event_id in intent.messages:
        await bot.perform(intent, BOT_COMMAND, ROOM, event_id)
    refused, listed, withdrawn, empty, hint = intent.notices
    assert refused.startswith("You may not withdraw")
    assert short_id(pending) in listed
    assert withdrawn.startswith("Withdrew the invite")
    assert empty.startswith("No pending invites")
    assert hint.startswith("Unknown command 'nonsense'")
    assert await InviteStore(quiet.server.db).withdrawn_by(pending.id) == ALICE


async def test_cached_power_levels_decide(quiet: Api) -> None:
    pending = await invite(quiet, "carol@example.com")
    levels = PowerLevelStateEventContent(users={UserID(BOB): 50}, kick=50)
    intent = FakeIntent(levels)
    intent.messages = {"$1": (BOB, f"!3pid withdraw {pending.id}")}
    await RoomBot(commands(quiet)).perform(intent, BOT_COMMAND, ROOM, "$1")
    assert intent.notices[0].startswith("Withdrew")
