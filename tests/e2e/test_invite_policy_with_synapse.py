"""The invite policy in front of a real Synapse: invites sent to our proxy URL reach Synapse (and,
for 3PID invites, our store-invite through Synapse) only when the policy allows them."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from appservice.db.invites import InviteStore
from tests.e2e.conftest import RunningIdentityServer
from tests.e2e.flows import register_everywhere, room_state, wait_for_member
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def identity_settings(synapse: SynapseServer) -> dict[str, Any]:
    # appservice.homeserver_url is already Synapse's client URL (the conftest's settings).
    return {
        "stores": {
            "order": ["static"],
            "static": {"roles": {f"@alice_pol:{synapse.server_name}": ["inviters"]}},
        },
        "invites": {"policy": {"roles": ["inviters"]}},
    }


async def create_room(synapse: SynapseServer, hs_token: str) -> str:
    """A new room of the user, created on Synapse directly."""
    status, body = await synapse.client_request(
        "POST", "/_matrix/client/v3/createRoom", hs_token, json={"name": "Garden club"}
    )
    assert status == 200, body
    room_id: str = body["room_id"]
    return room_id


def threepid_invite(ids: RunningIdentityServer, is_token: str, address: str) -> dict[str, str]:
    """The body of a 3PID invite with our server as the identity server."""
    return {
        "id_server": ids.name,
        "id_access_token": is_token,
        "medium": "email",
        "address": address,
    }


def third_party_invites(state: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``m.room.third_party_invite`` events of a room state."""
    return [e for e in state if e["type"] == "m.room.third_party_invite"]


async def test_allowed_sender_threepid_invite_through_the_proxy_reaches_the_room(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    _, alice_hs, alice_is = await register_everywhere(synapse, ids, "alice_pol")
    room_id = await create_room(synapse, alice_hs)
    address = "guest.allowed@example.org"

    status, body = await ids.request(
        "POST",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/invite",
        token=alice_hs,
        json=threepid_invite(ids, alice_is, address),
    )

    assert (status, body) == (200, {})
    assert len(third_party_invites(await room_state(synapse, alice_hs, room_id))) == 1
    mails = await ids.smtp.wait_for(1)
    assert mails[0].rcpt_tos == (address,)
    assert len(await InviteStore(ids.server.db).pending_for("email", address)) == 1


async def test_denied_sender_gets_403_and_nothing_reaches_the_identity_server(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    _, carol_hs, carol_is = await register_everywhere(synapse, ids, "carol_pol")
    room_id = await create_room(synapse, carol_hs)
    address = "guest.denied@example.org"

    status, body = await ids.request(
        "POST",
        f"/_matrix/client/r0/rooms/{quote(room_id)}/invite",
        token=carol_hs,
        json=threepid_invite(ids, carol_is, address),
    )

    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    assert body["error"].startswith("You are not allowed to invite by email")
    assert third_party_invites(await room_state(synapse, carol_hs, room_id)) == []
    assert await InviteStore(ids.server.db).pending_for("email", address) == []
    assert ids.smtp.mails == []


async def test_unknown_token_gets_synapse_answer(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    _, alice_hs, alice_is = await register_everywhere(synapse, ids, "alice_pol_tok")
    room_id = await create_room(synapse, alice_hs)
    status, body = await ids.request(
        "POST",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/invite",
        token="not-a-synapse-token",
        json=threepid_invite(ids, alice_is, "guest.token@example.org"),
    )
    assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")


async def test_mxid_invite_through_the_proxy_works_for_anyone(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    _, carol_hs, _ = await register_everywhere(synapse, ids, "carol_pol_mx")
    dave, _ = await synapse.register_user("dave_pol_mx", "a long test password")
    room_id = await create_room(synapse, carol_hs)

    status, body = await ids.request(
        "POST",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/invite",
        token=carol_hs,
        json={"user_id": dave, "reason": "come along"},
    )

    assert (status, body) == (200, {})
    invite = await wait_for_member(synapse, carol_hs, room_id, dave, "invite")
    assert invite["content"].get("reason") == "come along"
