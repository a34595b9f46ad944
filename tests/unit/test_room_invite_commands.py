"""The bot's command parser and the rule of who may withdraw a room's 3PID invite."""

from __future__ import annotations

from typing import Any

import pytest

from appservice.db.invites import PENDING, Invite
from appservice.matrix.bot import (
    BOT_COMMAND,
    BOT_JOIN,
    BOT_LEAVE_IF_ALONE,
    BOT_REMOVED,
    HELP,
    LIST,
    UNKNOWN,
    WITHDRAW,
    Command,
    bot_action_for,
    parse_command,
)
from appservice.services.room_invites import (
    CREATOR_POWER,
    RoomPowers,
    match_invite,
    may_withdraw,
    short_id,
)

ALICE = "@alice:example.org"
BOB = "@bob:example.org"
CAROL = "@carol:example.org"


def invite(invite_id: str = "0123456789abcdef01234567", sender: str = CAROL) -> Invite:
    return Invite(
        id=invite_id,
        token="t",
        medium="email",
        address="dave@example.org",
        room_id="!room:example.org",
        sender=sender,
        display_name="d…@e…",
        ephemeral_public_key="k",
        details={},
        created_ts=0,
        state=PENDING,
        resolved_mxid=None,
        resolved_ts=None,
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("!3pid list", Command(LIST)),
        ("  !3PID   LIST  ", Command(LIST)),
        ("!3pid", Command(HELP)),
        ("!3pid help", Command(HELP)),
        ("!3pid withdraw 0123ab", Command(WITHDRAW, "0123ab")),
        ("!3pid withdraw", Command(UNKNOWN, "withdraw")),
        ("!3pid withdraw a b", Command(UNKNOWN, "withdraw a b")),
        ("!3pid list all", Command(UNKNOWN, "list all")),
        ("!3pid frobnicate", Command(UNKNOWN, "frobnicate")),
    ],
)
def test_parse_command_reads_the_commands(body: str, expected: Command) -> None:
    assert parse_command(body) == expected


@pytest.mark.parametrize("body", ["", "hello", "!3pidlist", "say !3pid list", "!3pi list"])
def test_parse_command_ignores_messages_not_for_the_bot(body: str) -> None:
    assert parse_command(body) is None


def test_parse_command_takes_the_configured_prefix() -> None:
    assert parse_command("!invites list", "!invites") == Command(LIST)
    assert parse_command("!3pid list", "!invites") is None


def powers(levels: dict[str, Any] | None, version: str = "10", **kw: Any) -> RoomPowers:
    return RoomPowers(levels, creator=ALICE, room_version=version, **kw)


def test_the_sender_may_withdraw_their_own_invite_at_power_zero() -> None:
    assert may_withdraw(invite(sender=BOB), BOB, powers({"users": {ALICE: 100}}))


def test_a_member_at_the_kick_level_may_withdraw_anyones_invite() -> None:
    levels = {"users": {ALICE: 100, BOB: 50}, "kick": 50}
    assert may_withdraw(invite(), BOB, powers(levels))
    assert may_withdraw(invite(), ALICE, powers(levels))


def test_a_member_below_the_kick_level_may_not() -> None:
    levels = {"users": {ALICE: 100, BOB: 49}, "kick": 50}
    assert not may_withdraw(invite(), BOB, powers(levels))
    raised = {"users": {ALICE: 100, BOB: 50}, "kick": 75}
    assert not may_withdraw(invite(), BOB, powers(raised))


def test_users_default_and_the_default_kick_level_apply() -> None:
    assert may_withdraw(invite(), BOB, powers({"users_default": 50}))
    assert not may_withdraw(invite(), BOB, powers({"users_default": 49}))
    assert powers({}).kick == 50


def test_without_power_levels_the_creator_has_100_and_others_0() -> None:
    room = powers(None)
    assert room.level_of(ALICE) == 100
    assert room.level_of(BOB) == 0
    assert may_withdraw(invite(), ALICE, room)
    assert not may_withdraw(invite(), BOB, room)


def test_creators_outrank_power_levels_in_room_version_12() -> None:
    room = powers({"users": {ALICE: 0}, "kick": 100}, "12", additional_creators=(BOB,))
    assert room.level_of(ALICE) == CREATOR_POWER
    assert may_withdraw(invite(), BOB, room)
    assert not may_withdraw(invite(), CAROL + "x", room)
    # Before version 12 the power levels decide, for the creator too.
    assert not may_withdraw(invite(), ALICE, powers({"users": {ALICE: 0}, "kick": 100}))


def test_malformed_levels_count_as_absent() -> None:
    room = powers({"users": {BOB: "100"}, "kick": True, "users_default": 1.5})
    assert room.level_of(BOB) == 0
    assert room.kick == 50


def test_an_invite_is_named_by_its_id_or_a_unique_prefix() -> None:
    first = invite("aaaa1111" + "0" * 16)
    second = invite("aaaa2222" + "0" * 16)
    both = [first, second]
    assert short_id(first) == "aaaa1111"
    assert match_invite(both, "AAAA1") == [first]
    assert match_invite(both, "aaaa") == both
    assert match_invite(both, "b") == []
    assert match_invite(both, "  ") == []
    assert match_invite(both, first.id) == [first]


BOT_ID = "@_identity_bot:example.org"
OURS = frozenset({BOT_ID, "@_identity_invite_expired:example.org"})


def event(**fields: Any) -> dict[str, Any]:
    return {"room_id": "!r:example.org", "event_id": "$e", "sender": ALICE, **fields}


def message(body: str, msgtype: str = "m.text", **fields: Any) -> dict[str, Any]:
    content = {"msgtype": msgtype, "body": body}
    return event(type="m.room.message", content=content, **fields)


def test_the_bot_joins_when_invited_and_answers_commands_only() -> None:
    invited = event(type="m.room.member", state_key=BOT_ID, content={"membership": "invite"})
    assert bot_action_for(invited, BOT_ID, OURS, "!3pid") == (BOT_JOIN, "!r:example.org", "$e")
    left = event(
        type="m.room.member", state_key=BOT_ID, sender=BOT_ID, content={"membership": "leave"}
    )
    assert bot_action_for(left, BOT_ID, OURS, "!3pid") is None
    command = message("!3pid list")
    assert bot_action_for(command, BOT_ID, OURS, "!3pid") == (BOT_COMMAND, "!r:example.org", "$e")
    assert bot_action_for(message("hello"), BOT_ID, OURS, "!3pid") is None


def test_the_bot_ignores_our_own_users_and_notices() -> None:
    for sender in OURS:
        assert bot_action_for(message("!3pid list", sender=sender), BOT_ID, OURS, "!3pid") is None
    assert bot_action_for(message("!3pid list", "m.notice"), BOT_ID, OURS, "!3pid") is None
    assert bot_action_for(event(type="m.room.message", content=[]), BOT_ID, OURS, "!3pid") is None


def member(state_key: str, membership: str, sender: str = ALICE) -> dict[str, Any]:
    return event(
        type="m.room.member", state_key=state_key, sender=sender, content={"membership": membership}
    )


def test_a_kicked_or_banned_bot_forgets_the_room() -> None:
    room = "!r:example.org"
    assert bot_action_for(member(BOT_ID, "leave"), BOT_ID, OURS, "!3pid") == (
        BOT_REMOVED,
        room,
        "$e",
    )
    assert bot_action_for(member(BOT_ID, "ban"), BOT_ID, OURS, "!3pid") == (BOT_REMOVED, room, "$e")
    assert bot_action_for(member(BOT_ID, "join", BOT_ID), BOT_ID, OURS, "!3pid") is None


def test_someone_leaving_makes_the_bot_check_whether_it_is_alone() -> None:
    for membership in ("leave", "ban"):
        action = bot_action_for(member(BOB, membership), BOT_ID, OURS, "!3pid")
        assert action == (BOT_LEAVE_IF_ALONE, "!r:example.org", "$e")
    assert bot_action_for(member(BOB, "join"), BOT_ID, OURS, "!3pid") is None
    assert bot_action_for(member(BOB, "invite"), BOT_ID, OURS, "!3pid") is None
    # Our own users coming and going change nothing.
    for user in OURS - {BOT_ID}:
        assert bot_action_for(member(user, "leave", user), BOT_ID, OURS, "!3pid") is None
