"""The bot's list and withdraw answers on a real database (both dialects)."""

from __future__ import annotations

from appservice.db.invites import EXPIRED, PENDING, InviteStore
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
