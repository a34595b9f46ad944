"""The bot's room commands against a real Synapse: list and withdraw a pending 3PID invite."""

from __future__ import annotations

import itertools
import time
from typing import Any
from urllib.parse import quote

import pytest

from appservice.db.invites import InviteStore
from tests.e2e.conftest import RunningIdentityServer
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
    leave: dict[str, Any] = await wait_for_member(synapse, alice_hs, room_id, expired_user, "leave")
    elapsed = time.monotonic() - started
    print(f"withdraw command to the visible leave: {elapsed * 1000:.0f} ms")
    assert leave["content"]["reason"].endswith(f"was withdrawn by {alice}."), leave
    confirmed = await next_notice(synapse, alice_hs, room_id, bot, 2)
    assert confirmed.startswith("Withdrew the invite"), confirmed

    await say(synapse, alice_hs, room_id, "!3pid list")
    empty = await next_notice(synapse, alice_hs, room_id, bot, 3)
    assert empty.startswith("No pending invites"), empty
