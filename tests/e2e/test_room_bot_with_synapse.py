"""The bot against a real Synapse: list and withdraw a pending 3PID invite, one notice per
command even when it is sent again, power levels changed in the room and while the bot was away,
leaving a room where it is alone, forgetting a room it was kicked from, the expiry notice."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
import time
from typing import Any
from urllib.parse import quote

import pytest

from appservice.db.appservice import DONE, PENDING, RoomAction
from appservice.db.invites import Invite, InviteStore
from appservice.matrix.bot import BOT_COMMAND, BOT_LEAVE_IF_ALONE, BOT_REMOVED
from tests.e2e.conftest import AppserviceSetup, RunningIdentityServer
from tests.e2e.flows import create_room_and_invite, register_everywhere, wait_for_member, wait_until
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e

_txn = itertools.count()


async def say(synapse: SynapseServer, token: str, room_id: str, body: str) -> None:
    status, answer = await synapse.client_request(
        "PUT",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/send/m.room.message/t{next(_txn)}",
        token,
        json={"msgtype": "m.text", "body": body},
    )
    assert status == 200, answer


async def notices(synapse: SynapseServer, token: str, room_id: str, bot: str) -> list[str]:
    status, body = await synapse.client_request(
        "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/messages?dir=b&limit=100", token
    )
    assert status == 200, body
    return [
        e["content"]["body"]
        for e in reversed(body["chunk"])
        if e["type"] == "m.room.message"
        and e["sender"] == bot
        and e["content"].get("msgtype") == "m.notice"
    ]


async def next_notice(synapse: SynapseServer, token: str, room_id: str, bot: str, seen: int) -> str:
    found: list[str] = []

    async def arrived() -> bool:
        found[:] = await notices(synapse, token, room_id, bot)
        return len(found) > seen

    await wait_until(arrived, "the bot's notice", within=15)
    return found[seen]


async def room_request(
    synapse: SynapseServer, token: str, room_id: str, what: str, body: dict[str, Any]
) -> None:
    """``POST /rooms/{room_id}/{what}`` (invite, kick, leave...), which must succeed."""
    status, answer = await synapse.client_request(
        "POST", f"/_matrix/client/v3/rooms/{quote(room_id)}/{what}", token, json=body
    )
    assert status == 200, answer


async def set_power_level(
    synapse: SynapseServer, token: str, room_id: str, user_id: str, level: int
) -> None:
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/state/m.room.power_levels"
    status, levels = await synapse.client_request("GET", path, token)
    assert status == 200, levels
    levels.setdefault("users", {})[user_id] = level
    status, answer = await synapse.client_request("PUT", path, token, json=levels)
    assert status == 200, answer


class BotRoom:
    """A room of alice (creator, 100) with bob (0), the bot and a pending 3PID invite."""

    def __init__(self, synapse: SynapseServer, ids: RunningIdentityServer) -> None:
        self.synapse = synapse
        self.ids = ids
        self.bot = f"@_identity_bot:{synapse.server_name}"
        self.alice = self.alice_hs = self.bob = self.bob_hs = self.room_id = ""
        self.seen = 0

    async def create(self, name: str, address: str) -> Invite:
        synapse, ids = self.synapse, self.ids
        self.alice, self.alice_hs, alice_is = await register_everywhere(synapse, ids, f"a_{name}")
        self.bob, self.bob_hs = await synapse.register_user(f"b_{name}", "a long test password")
        self.room_id = await create_room_and_invite(synapse, ids, self.alice_hs, alice_is, address)
        for user in (self.bot, self.bob):
            await room_request(synapse, self.alice_hs, self.room_id, "invite", {"user_id": user})
        await room_request(synapse, self.bob_hs, self.room_id, "join", {})
        await wait_for_member(synapse, self.alice_hs, self.room_id, self.bot, "join")
        [pending] = await InviteStore(ids.server.db).pending_in_room(self.room_id)
        return pending

    async def command(self, token: str, body: str) -> str:
        """Say ``body`` as the owner of ``token``; the bot's answer."""
        await say(self.synapse, token, self.room_id, body)
        answer = await next_notice(self.synapse, self.alice_hs, self.room_id, self.bot, self.seen)
        self.seen += 1
        return answer

    async def actions(self, kind: str) -> list[RoomAction]:
        actions = await self.ids.server.appservice_store.actions()
        return [a for a in actions if a.kind == kind and a.room_id == self.room_id]


async def test_an_admin_withdraws_a_pending_invite_through_the_bot(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    alice, alice_hs, alice_is = await register_everywhere(synapse, ids, "alice_bot")
    bob, bob_hs = await synapse.register_user("bob_bot", "a long test password")
    bot = f"@_identity_bot:{synapse.server_name}"
    expired_user = f"@_identity_invite_expired:{synapse.server_name}"
    room_id = await create_room_and_invite(synapse, ids, alice_hs, alice_is, "zoe@example.org")
    for user in (bot, bob):
        status, body = await synapse.client_request(
            "POST",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/invite",
            alice_hs,
            json={"user_id": user},
        )
        assert status == 200, body
    status, body = await synapse.client_request(
        "POST", f"/_matrix/client/v3/rooms/{quote(room_id)}/join", bob_hs, json={}
    )
    assert status == 200, body
    await wait_for_member(synapse, alice_hs, room_id, bot, "join")
    [pending] = await InviteStore(ids.server.db).pending_in_room(room_id)
    prefix = pending.id[:6]

    await say(synapse, bob_hs, room_id, f"!3pid withdraw {prefix}")
    refused = await next_notice(synapse, alice_hs, room_id, bot, 0)
    assert refused.startswith("You may not withdraw"), refused
    assert await InviteStore(ids.server.db).pending_in_room(room_id) == [pending]

    await say(synapse, alice_hs, room_id, "!3pid list")
    listed = await next_notice(synapse, alice_hs, room_id, bot, 1)
    assert pending.id[:8] in listed and "z…@e…" in listed, listed

    started = time.monotonic()
    await say(synapse, alice_hs, room_id, f"!3pid withdraw {prefix}")
    member_path = f"/_matrix/client/v3/rooms/{quote(room_id)}/state/m.room.member/{expired_user}"

    async def left() -> bool:
        # Polled every 10 ms (wait_until's 0.1 s would blur the measurement).
        for _ in range(1500):
            status, content = await synapse.client_request("GET", member_path, alice_hs)
            if status == 200 and content.get("membership") == "leave":
                return True
            await asyncio.sleep(0.01)
        return False

    assert await left()
    elapsed = time.monotonic() - started
    print(f"withdraw command to the visible leave: {elapsed * 1000:.0f} ms")
    leave: dict[str, Any] = await wait_for_member(synapse, alice_hs, room_id, expired_user, "leave")
    assert leave["content"]["reason"].endswith(f"was withdrawn by {alice}."), leave
    confirmed = await next_notice(synapse, alice_hs, room_id, bot, 2)
    assert confirmed.startswith("Withdrew the invite"), confirmed

    await say(synapse, alice_hs, room_id, "!3pid list")
    empty = await next_notice(synapse, alice_hs, room_id, bot, 3)
    assert empty.startswith("No pending invites"), empty


async def test_a_notice_sent_again_shows_once(
    synapse: SynapseServer, identity_server: RunningIdentityServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "appservice.matrix.actions")
    room = BotRoom(synapse, identity_server)
    pending = await room.create("resend", "yan@example.org")
    confirmed = await room.command(room.alice_hs, f"!3pid withdraw {pending.id[:6]}")
    assert confirmed.startswith("Withdrew the invite"), confirmed

    # As if the instance had died after sending and before marking the action done: the
    # action is due again, with its stored answer, and is performed again.
    async def marked_done() -> bool:
        return [a.state for a in await room.actions(BOT_COMMAND)] == [DONE]

    await wait_until(marked_done, "the command's action marked done", within=15)
    [action] = await room.actions(BOT_COMMAND)
    server = identity_server.server
    await server.db.execute(
        "UPDATE appservice_actions SET state = $1, next_attempt_ts = 0 WHERE id = $2",
        PENDING,
        action.id,
    )
    assert server.actions_job is not None
    server.actions_job.wake()

    async def done_again() -> bool:
        [again] = [a for a in await room.actions(BOT_COMMAND) if a.id == action.id]
        return again.state == DONE and again.attempts == 2

    await wait_until(done_again, "the command's action performed again", within=15)
    # Both times sent (Synapse answered 200), not skipped as "nothing to do".
    done_line = f"bot_command done in {room.room_id} as {room.bot}"
    sent = [r for r in caplog.records if r.getMessage() == done_line]
    assert len(sent) == 2, caplog.text
    # The same text under the same transaction id: Synapse kept the first notice only.
    await room.command(room.alice_hs, "!3pid list")
    texts = await notices(synapse, room.alice_hs, room.room_id, room.bot)
    assert [t for t in texts if t.startswith("Withdrew")] == [confirmed], texts


async def test_a_member_promoted_to_the_kick_level_may_withdraw(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    room = BotRoom(synapse, identity_server)
    pending = await room.create("promoted", "xavier@example.org")
    refused = await room.command(room.bob_hs, f"!3pid withdraw {pending.id[:6]}")
    assert refused.startswith("You may not withdraw"), refused

    # The power-levels event reaches the bot in a transaction; the next decision uses it.
    await set_power_level(synapse, room.alice_hs, room.room_id, room.bob, 50)
    confirmed = await room.command(room.bob_hs, f"!3pid withdraw {pending.id[:6]}")
    assert confirmed.startswith("Withdrew the invite"), confirmed
    expired_user = f"@_identity_invite_expired:{synapse.server_name}"
    leave = await wait_for_member(synapse, room.alice_hs, room.room_id, expired_user, "leave")
    assert leave["content"]["reason"].endswith(f"was withdrawn by {room.bob}."), leave


async def test_a_kicked_bot_forgets_the_room_and_reads_it_afresh_when_invited_back(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    room = BotRoom(synapse, identity_server)
    pending = await room.create("kicked", "walt@example.org")
    # Bob's refusal caches the room's power levels (bob: 0) in the state store.
    refused = await room.command(room.bob_hs, f"!3pid withdraw {pending.id[:6]}")
    assert refused.startswith("You may not withdraw"), refused
    db = identity_server.server.db
    cached = "SELECT COUNT(*) FROM mx_room_state WHERE room_id = $1"
    assert await db.fetchval(cached, room.room_id) == 1

    await room_request(
        synapse, room.alice_hs, room.room_id, "kick", {"user_id": room.bot, "reason": "quiet"}
    )

    async def forgotten() -> bool:
        removed = await room.actions(BOT_REMOVED)
        return bool(removed) and removed[0].state == DONE

    await wait_until(forgotten, "the kicked bot to forget the room", within=15)
    [removed] = await room.actions(BOT_REMOVED)
    assert removed.last_error is None, removed
    assert await db.fetchval(cached, room.room_id) == 0
    profiles = "SELECT COUNT(*) FROM mx_user_profile WHERE room_id = $1"
    assert await db.fetchval(profiles, room.room_id) == 0
    # Forgotten on the homeserver too (Synapse marks the bot's membership row).
    with contextlib.closing(
        sqlite3.connect(f"file:{synapse.workdir / 'homeserver.db'}?mode=ro", uri=True)
    ) as synapse_db:
        [(forgotten,)] = synapse_db.execute(
            "SELECT forgotten FROM room_memberships WHERE room_id = ? AND user_id = ?"
            " AND membership = 'leave'",
            (room.room_id, room.bot),
        ).fetchall()
    assert forgotten == 1

    # Bob is promoted while the bot is away (it gets no events of the room meanwhile).
    await set_power_level(synapse, room.alice_hs, room.room_id, room.bob, 50)
    await room_request(synapse, room.alice_hs, room.room_id, "invite", {"user_id": room.bot})
    await wait_for_member(synapse, room.alice_hs, room.room_id, room.bot, "join")
    confirmed = await room.command(room.bob_hs, f"!3pid withdraw {pending.id[:6]}")
    assert confirmed.startswith("Withdrew the invite"), confirmed


async def test_the_bot_leaves_when_everyone_else_has_left(
    synapse: SynapseServer,
    identity_server: RunningIdentityServer,
    appservice_setup: AppserviceSetup,
) -> None:
    room = BotRoom(synapse, identity_server)
    await room.create("alone", "vera@example.org")

    async def bot_rooms() -> list[str]:
        status, body = await synapse.client_request(
            "GET",
            "/_matrix/client/v3/joined_rooms",
            appservice_setup.as_token,
            params={"user_id": room.bot},
        )
        assert status == 200, body
        rooms: list[str] = body["joined_rooms"]
        return rooms

    assert room.room_id in await bot_rooms()
    await room_request(synapse, room.bob_hs, room.room_id, "leave", {})
    # Alice is still there: the bot stays.
    await wait_until(
        lambda: _all_done(identity_server, room.room_id), "bob's leave handled", within=15
    )
    assert room.room_id in await bot_rooms()

    await room_request(synapse, room.alice_hs, room.room_id, "leave", {})

    async def bot_left() -> bool:
        return room.room_id not in await bot_rooms()

    await wait_until(bot_left, "the bot to leave the empty room", within=15)


async def _all_done(ids: RunningIdentityServer, room_id: str) -> bool:
    actions = await ids.server.appservice_store.actions()
    mine = [a for a in actions if a.room_id == room_id and a.kind == BOT_LEAVE_IF_ALONE]
    return bool(mine) and all(a.state == DONE for a in mine)


class TestExpiryNotice:
    @pytest.fixture
    def identity_settings(self) -> dict[str, Any]:
        return {
            "invites": {"expiration": {"after": "3s", "check_interval": "500ms"}},
            "appservice": {"bot_expiry_notice": True},
        }

    async def test_the_bot_says_when_an_invite_in_its_room_expired(
        self, synapse: SynapseServer, identity_server: RunningIdentityServer
    ) -> None:
        room = BotRoom(synapse, identity_server)
        pending = await room.create("expiry", "ursula@example.org")
        expired_user = f"@_identity_invite_expired:{synapse.server_name}"
        # The inviteExpired user still rejects the invite with its reason...
        leave = await wait_for_member(synapse, room.alice_hs, room.room_id, expired_user, "leave")
        assert "3 seconds" in leave["content"]["reason"], leave
        # ...and the bot says so in the room, once.
        notice = await next_notice(synapse, room.alice_hs, room.room_id, room.bot, 0)
        assert notice == leave["content"]["reason"]  # the same words, from one template
        assert notice.startswith(f"The invitation sent to {pending.display_name} by {room.alice}")
        assert "ursula@example.org" not in notice
        assert pending.display_name.startswith("u…@e…"), pending
