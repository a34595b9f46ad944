"""The bot on a real database (both dialects): list and withdraw answers, the answer computed
once (a retry re-sends it), leaving rooms where it is alone, forgetting rooms it was removed
from, the expiry notice."""

from __future__ import annotations

import datetime
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import pytest
from mautrix.api import Method
from mautrix.errors import MatrixConnectionError, MNotFound
from mautrix.types import (
    EventType,
    Membership,
    MemberStateEventContent,
    PowerLevelStateEventContent,
    StateEvent,
    UserID,
)

from appservice.clock import FakeClock
from appservice.db.appservice import DONE, REJECT, RoomAction
from appservice.db.invites import EXPIRED, PENDING, InviteStore
from appservice.matrix.actions import RETRY_INITIAL_S, RoomActionWorker
from appservice.matrix.bot import (
    BOT_COMMAND,
    BOT_EXPIRY_NOTICE,
    BOT_JOIN,
    BOT_LEAVE_IF_ALONE,
    BOT_REMOVED,
    RoomBot,
    notice_txn_id,
    room_powers,
)
from appservice.services.room_invites import RoomInviteCommands, RoomPowers, short_id
from tests.api.test_invites import ROOM, invite
from tests.matrix.conftest import BOT, EXPIRED_USER, HomeserverSide, member_event, message_event
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
        self.membership = Membership.JOIN

    async def get_power_levels(self, room_id: str) -> Any:
        return self.levels

    async def set_power_levels(self, room_id: str, content: Any) -> None:
        self.saved.append(content)

    async def get_membership(self, room_id: str, user_id: str) -> Membership:
        return self.membership

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
    """The part of mautrix's IntentAPI the bot uses; the room has no power-levels event.
    Every call that could make mautrix join the room must say ``ensure_joined=False``."""

    mxid = BOT

    def __init__(self, levels: Any = None) -> None:
        self.state_store = FakeStateStore(levels)
        self.notices: list[str] = []
        self.txn_ids: list[str] = []
        self.messages: dict[str, tuple[str, str]] = {}
        self.members = [BOT, ALICE]
        self.left: list[str] = []
        self.forgotten: list[str] = []
        # Errors the next sends raise, one each.
        self.send_errors: list[Exception] = []

    async def ensure_registered(self) -> None:
        pass

    async def get_state_event(self, room_id: str, event_type: Any, **kw: Any) -> Any:
        assert kw.get("ensure_joined") is False
        if event_type == EventType.ROOM_MEMBER:
            return MemberStateEventContent(membership=self.state_store.membership)
        raise MNotFound(404, "no power levels")

    async def get_event(self, room_id: str, event_id: str, **kw: Any) -> Any:
        assert kw.get("ensure_joined") is False
        sender, body = self.messages[event_id]
        return SimpleNamespace(sender=sender, content=SimpleNamespace(body=body))

    @property
    def api(self) -> FakeIntent:
        return self

    async def request(self, method: Method, path: Any, content: dict[str, Any]) -> Any:
        """The plain client-server call the bot sends its notices with."""
        *_, room_id, send, event_type, txn_id = str(path).split("/")
        assert (method, unquote(room_id), send, event_type) == (
            Method.PUT,
            ROOM,
            "send",
            "m.room.message",
        )
        assert content["msgtype"] == "m.notice"
        self.txn_ids.append(txn_id)
        if self.send_errors:
            raise self.send_errors.pop(0)
        self.notices.append(content["body"])
        return {"event_id": f"$notice{len(self.notices)}"}

    async def get_joined_members(self, room_id: str, **kw: Any) -> dict[str, Any]:
        assert kw.get("ensure_joined") is False
        return dict.fromkeys(self.members)

    async def leave_room(self, room_id: str, **kw: Any) -> None:
        self.left.append(room_id)

    async def forget_room(self, room_id: str) -> None:
        self.forgotten.append(room_id)


def room_bot(api: Api) -> RoomBot:
    server = api.server
    return RoomBot(
        commands(api),
        server.appservice_store,
        server.db,
        server.clock,
        our_users=frozenset({BOT, server.invites.expired_user_id}),
    )


async def record(api: Api, kind: str, event_id: str, reason: str = "") -> RoomAction:
    """A pending action of the bot for ``event_id``, as a transaction records it."""
    store = api.server.appservice_store
    now = api.server.clock.now_ms()
    assert await store.add_action(f"a{event_id}", kind, ROOM, BOT, reason, event_id, now)
    [action] = [a for a in await store.actions() if a.event_id == event_id and a.kind == kind]
    return action


async def state_of(api: Api, action: RoomAction) -> RoomAction:
    [now] = [a for a in await api.server.appservice_store.actions() if a.id == action.id]
    return now


async def test_without_power_levels_only_the_creator_and_the_sender_may_withdraw(
    quiet: Api,
) -> None:
    pending = await invite(quiet, "carol@example.com")
    bot = room_bot(quiet)
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
        await bot.perform(intent, await record(quiet, BOT_COMMAND, event_id))
    refused, listed, withdrawn, empty, hint = intent.notices
    assert refused.startswith("You may not withdraw")
    assert short_id(pending) in listed
    assert withdrawn.startswith("Withdrew the invite")
    assert empty.startswith("No pending invites")
    assert hint.startswith("Unknown command 'nonsense'")
    assert await InviteStore(quiet.server.db).withdrawn_by(pending.id) == ALICE
    # One transaction id per command, derived from its event.
    assert len(set(intent.txn_ids)) == 5


async def test_cached_power_levels_decide(quiet: Api) -> None:
    pending = await invite(quiet, "carol@example.com")
    levels = PowerLevelStateEventContent(users={UserID(BOB): 50}, kick=50)
    intent = FakeIntent(levels)
    intent.messages = {"$1": (BOB, f"!3pid withdraw {pending.id}")}
    await room_bot(quiet).perform(intent, await record(quiet, BOT_COMMAND, "$1"))
    assert intent.notices[0].startswith("Withdrew")


# The answer to a command is computed once.


async def test_a_notice_that_failed_to_send_is_sent_again_with_the_same_answer(
    quiet: Api, clock: FakeClock
) -> None:
    pending = await invite(quiet, "carol@example.com")
    intent = FakeIntent()
    intent.messages = {"$w": (ALICE, f"!3pid withdraw {short_id(pending)}")}
    intent.send_errors = [MatrixConnectionError("connection reset")]
    action = await record(quiet, BOT_COMMAND, "$w")
    worker = RoomActionWorker(
        quiet.server.appservice_store,
        lambda _user: intent,
        clock,
        performers=room_bot(quiet).performers(),
    )

    assert await worker.perform_due() == 0  # withdrawn, but the confirmation did not go out
    failed = await state_of(quiet, action)
    assert (failed.state, failed.attempts) == (PENDING, 1)
    assert failed.reason.startswith("Withdrew the invite")  # the answer, kept with the action
    assert await InviteStore(quiet.server.db).withdrawn_by(pending.id) == ALICE

    clock.advance(RETRY_INITIAL_S)
    assert await worker.perform_due() == 1
    # The retry sends the original confirmation (not "no pending invite"), under the same
    # transaction id, so that a homeserver that did get the first one keeps one notice.
    assert intent.notices == [failed.reason]
    first, second = intent.txn_ids
    assert first == second == notice_txn_id(action)
    assert (await state_of(quiet, action)).state == DONE


async def test_an_answer_stored_by_another_attempt_wins_and_ours_is_rolled_back(
    quiet: Api,
) -> None:
    pending = await invite(quiet, "carol@example.com")
    intent = FakeIntent()
    intent.messages = {"$w": (ALICE, f"!3pid withdraw {short_id(pending)}")}
    action = await record(quiet, BOT_COMMAND, "$w")
    # Another instance (whose claim lapsed) stored its answer after this one read the action.
    assert await quiet.server.appservice_store.save_text(action.id, "earlier answer") == (
        "earlier answer"
    )
    await room_bot(quiet).perform(intent, action)
    assert intent.notices == ["earlier answer"]
    # This attempt's withdrawal was rolled back with its answer.
    stored = await InviteStore(quiet.server.db).by_id(pending.id)
    assert stored is not None and stored.state == PENDING


async def test_a_retried_transaction_answers_a_command_once(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    command = message_event()
    command["content"]["body"] = "!3pid list"
    assert await homeserver_side.transaction("c1", [command]) == (200, {})
    assert await homeserver_side.transaction("c1", [command]) == (200, {})
    [action] = await quiet.server.appservice_store.actions()
    assert (action.kind, action.event_id) == (BOT_COMMAND, command["event_id"])


async def test_a_command_left_for_a_room_the_bot_was_removed_from_does_nothing(
    quiet: Api,
) -> None:
    pending = await invite(quiet, "carol@example.com")
    intent = FakeIntent()
    intent.state_store.membership = Membership.LEAVE
    intent.messages = {"$w": (ALICE, f"!3pid withdraw {short_id(pending)}")}
    await room_bot(quiet).perform(intent, await record(quiet, BOT_COMMAND, "$w"))
    assert intent.notices == []
    stored = await InviteStore(quiet.server.db).by_id(pending.id)
    assert stored is not None and stored.state == PENDING


# Leaving and being removed.


async def test_the_bot_leaves_a_room_where_nobody_else_is_left(quiet: Api) -> None:
    intent = FakeIntent()
    bot = room_bot(quiet)
    intent.members = [BOT, ALICE]
    await bot.perform(intent, await record(quiet, BOT_LEAVE_IF_ALONE, "$bob-left"))
    assert intent.left == []
    # Our own users do not count as company.
    intent.members = [BOT, quiet.server.invites.expired_user_id]
    await bot.perform(intent, await record(quiet, BOT_LEAVE_IF_ALONE, "$alice-left"))
    assert intent.left == [ROOM]


async def test_a_removed_bot_cancels_what_it_had_to_do_there_and_forgets_the_room(
    quiet: Api, clock: FakeClock
) -> None:
    intent = FakeIntent()
    intent.state_store.membership = Membership.LEAVE
    command = await record(quiet, BOT_COMMAND, "$cmd")
    notice = await record(quiet, BOT_EXPIRY_NOTICE, "$exp", "The invitation … expired")
    join = await record(quiet, BOT_JOIN, "$invite")
    clock.advance(1)
    removed = await record(quiet, BOT_REMOVED, "$kick")
    clock.advance(1)
    later = await record(quiet, BOT_COMMAND, "$after")

    await room_bot(quiet).perform(intent, removed)
    assert intent.forgotten == [ROOM]
    for action in (command, notice):
        cancelled = await state_of(quiet, action)
        assert (cancelled.state, cancelled.last_error) == (
            DONE,
            "cancelled: removed from the room",
        )
    # A join (of a re-invite) and what came after the removal stay.
    assert (await state_of(quiet, join)).state == PENDING
    assert (await state_of(quiet, later)).state == PENDING
    assert intent.notices == []


async def test_a_bot_invited_back_meanwhile_does_not_forget_the_room(quiet: Api) -> None:
    intent = FakeIntent()
    intent.state_store.membership = Membership.INVITE
    await room_bot(quiet).perform(intent, await record(quiet, BOT_REMOVED, "$kick"))
    assert intent.forgotten == []


# The expiry notice.


async def test_the_expiry_notice_is_posted_only_where_the_bot_is_joined(quiet: Api) -> None:
    intent = FakeIntent()
    bot = room_bot(quiet)
    intent.state_store.membership = Membership.LEAVE
    await bot.perform(intent, await record(quiet, BOT_EXPIRY_NOTICE, "$1", "It expired."))
    assert intent.notices == []
    intent.state_store.membership = Membership.JOIN
    action = await record(quiet, BOT_EXPIRY_NOTICE, "$2", "It expired.")
    await bot.perform(intent, action)
    assert intent.notices == ["It expired."]
    assert intent.txn_ids[-1] == notice_txn_id(action)


@pytest.mark.parametrize("appservice_extra", [{"bot_expiry_notice": True}])
async def test_an_expired_invite_records_the_bots_notice_once(
    quiet: Api, homeserver_side: HomeserverSide, clock: FakeClock
) -> None:
    pending = await invite(quiet, "carol@example.com")
    withdrawn = await invite(quiet, "dave@example.com")
    early = await invite(quiet, "erin@example.com")
    assert await quiet.server.invites.withdraw(withdrawn.id, ALICE)
    assert await quiet.server.invites.expire(early.id)  # the operator, before its time
    clock.advance(7 * 86400 + 1)
    assert await quiet.server.invites.expire_due() == 1
    events = [
        member_event(EXPIRED_USER, "invite", sender=i.sender, token=i.token)
        for i in (pending, withdrawn, early)
    ]
    assert await homeserver_side.transaction("e1", events) == (200, {})
    assert await homeserver_side.transaction("e1", events) == (200, {})  # a retry
    actions = await quiet.server.appservice_store.actions()
    [notice] = [a for a in actions if a.kind == BOT_EXPIRY_NOTICE]
    assert (notice.user_id, notice.event_id) == (BOT, events[0]["event_id"])
    # The words of the rejection reason (invite_expired_reason.txt, which operators may edit).
    invited_on = datetime.datetime.fromtimestamp(pending.created_ts / 1000, datetime.UTC)
    assert notice.reason == (
        f"The invitation sent to {pending.display_name} by {pending.sender} on"
        f" {invited_on:%Y-%m-%d} expired after 7 days and was withdrawn."
    )
    assert sorted(a.kind for a in actions) == [BOT_EXPIRY_NOTICE, REJECT, REJECT, REJECT]


async def test_without_the_option_an_expiry_records_no_notice(
    quiet: Api, homeserver_side: HomeserverSide, clock: FakeClock
) -> None:
    pending = await invite(quiet, "carol@example.com")
    clock.advance(7 * 86400 + 1)
    assert await quiet.server.invites.expire_due() == 1
    event = member_event(EXPIRED_USER, "invite", sender=pending.sender, token=pending.token)
    assert await homeserver_side.transaction("e1", [event]) == (200, {})
    [action] = await quiet.server.appservice_store.actions()
    assert action.kind == REJECT
