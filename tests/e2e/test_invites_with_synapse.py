"""3PID invites through a real Synapse: delivered when the invitee binds, withdrawn on expiry."""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from tests.e2e.conftest import RunningIdentityServer
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e
V2 = "/_matrix/identity/v2"


async def register_everywhere(
    synapse: SynapseServer, ids: RunningIdentityServer, localpart: str
) -> tuple[str, str, str]:
    """A Synapse user with an identity-server token: (user_id, hs token, IS token)."""
    user_id, hs_token = await synapse.register_user(localpart, "a long test password")
    credentials = await synapse.request_openid_token(user_id, hs_token)
    status, body = await ids.request("POST", f"{V2}/account/register", json=credentials)
    assert status == 200, body
    return user_id, hs_token, body["token"]


async def create_room_and_invite(
    synapse: SynapseServer, ids: RunningIdentityServer, hs_token: str, is_token: str, address: str
) -> str:
    status, body = await synapse.client_request(
        "POST", "/_matrix/client/v3/createRoom", hs_token, json={"name": "Garden club"}
    )
    assert status == 200, body
    room_id: str = body["room_id"]
    status, body = await synapse.client_request(
        "POST",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/invite",
        hs_token,
        json={
            "id_server": ids.name,
            "id_access_token": is_token,
            "medium": "email",
            "address": address,
        },
    )
    assert status == 200, body
    return room_id


async def room_state(synapse: SynapseServer, hs_token: str, room_id: str) -> list[dict[str, Any]]:
    status, body = await synapse.client_request(
        "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state", hs_token
    )
    assert status == 200, body
    state: list[dict[str, Any]] = body
    return state


async def wait_for_member(
    synapse: SynapseServer, hs_token: str, room_id: str, user_id: str, membership: str
) -> dict[str, Any]:
    """Poll the room state (bounded) until ``user_id`` has ``membership``."""
    for _ in range(150):
        for event in await room_state(synapse, hs_token, room_id):
            if (
                event["type"] == "m.room.member"
                and event["state_key"] == user_id
                and event["content"].get("membership") == membership
            ):
                return event
        await asyncio.sleep(0.1)
    raise AssertionError(f"{user_id} never became {membership} in {room_id}")


async def validate_and_bind(
    synapse: SynapseServer,
    ids: RunningIdentityServer,
    hs_token: str,
    is_token: str,
    address: str,
) -> None:
    before = len(ids.smtp.mails)
    status, body = await ids.request(
        "POST",
        f"{V2}/validate/email/requestToken",
        token=is_token,
        json={"client_secret": "bobs-secret", "email": address, "send_attempt": 1},
    )
    assert status == 200, body
    sid = body["sid"]
    mails = await ids.smtp.wait_for(before + 1)
    text = mails[-1].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    link = re.search(r"https://\S+/validate/email/submitToken\?\S+", text)
    assert link, text
    token = parse_qs(urlsplit(link.group(0)).query)["token"][0]
    status, body = await ids.request(
        "POST",
        f"{V2}/validate/email/submitToken",
        token=is_token,
        json={"sid": sid, "client_secret": "bobs-secret", "token": token},
    )
    assert status == 200, body
    status, body = await synapse.client_request(
        "POST",
        "/_matrix/client/v3/account/3pid/bind",
        hs_token,
        json={
            "client_secret": "bobs-secret",
            "id_server": ids.name,
            "id_access_token": is_token,
            "sid": sid,
        },
    )
    assert status == 200, body


async def test_invite_is_delivered_when_the_invitee_binds(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    _, alice_hs, alice_is = await register_everywhere(synapse, ids, "alice_inv")
    address = "bob@example.org"
    room_id = await create_room_and_invite(synapse, ids, alice_hs, alice_is, address)

    third_party = [
        e for e in await room_state(synapse, alice_hs, room_id)
        if e["type"] == "m.room.third_party_invite"
    ]  # fmt: skip
    assert len(third_party) == 1
    content = third_party[0]["content"]
    assert address not in content["display_name"]
    assert content["public_key"] == ids.server.keyring.current.public_key

    mails = await ids.smtp.wait_for(1)
    assert mails[0].rcpt_tos == (address,)
    assert "Garden club" in mails[0].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]

    bob, bob_hs, bob_is = await register_everywhere(synapse, ids, "bob_inv")
    await validate_and_bind(synapse, ids, bob_hs, bob_is, address)

    invite = await wait_for_member(synapse, alice_hs, room_id, bob, "invite")
    assert invite["content"]["third_party_invite"]["signed"]["mxid"] == bob
    status, body = await synapse.client_request(
        "POST", f"/_matrix/client/v3/join/{quote(room_id)}", bob_hs, json={}
    )
    assert status == 200, body
    await wait_for_member(synapse, alice_hs, room_id, bob, "join")
    # The invite is resolved, so its ephemeral key is no longer valid; the long-term key is.
    ephemeral = next(k for k in content["public_keys"] if "ephemeral" in k["key_validity_url"])
    status, body = await ids.request(
        "GET", f"{V2}/pubkey/ephemeral/isvalid?public_key={quote(ephemeral['public_key'])}"
    )
    assert body == {"valid": False}


async def membership_history(
    synapse: SynapseServer, hs_token: str, room_id: str, user_id: str
) -> list[dict[str, Any]]:
    """The ``m.room.member`` events of ``user_id`` in the room, oldest first."""
    status, body = await synapse.client_request(
        "GET",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/messages?dir=b&limit=100",
        hs_token,
    )
    assert status == 200, body
    events = [
        e for e in body["chunk"]
        if e["type"] == "m.room.member" and e.get("state_key") == user_id
    ]  # fmt: skip
    return list(reversed(events))


class TestExpiry:
    @pytest.fixture
    def identity_settings(self) -> dict[str, Any]:
        return {"invites": {"expiration": {"after": "2s", "check_interval": "500ms"}}}

    async def test_unanswered_invite_is_resolved_to_the_expired_user_and_withdrawn(
        self, synapse: SynapseServer, identity_server: RunningIdentityServer
    ) -> None:
        ids = identity_server
        _, alice_hs, alice_is = await register_everywhere(synapse, ids, "alice_exp")
        room_id = await create_room_and_invite(
            synapse, ids, alice_hs, alice_is, "nobody@example.org"
        )
        expired_user = f"@_identity_invite_expired:{synapse.server_name}"
        # The homeserver turns the third-party invite into an invite of the expired user...
        left = await wait_for_member(synapse, alice_hs, room_id, expired_user, "leave")
        history = await membership_history(synapse, alice_hs, room_id, expired_user)
        assert [e["content"]["membership"] for e in history] == ["invite", "leave"]
        invite = history[0]
        assert invite["content"]["third_party_invite"]["signed"]["mxid"] == expired_user
        # ...which our appservice rejects, with a reason the room's members can read.
        assert left["sender"] == expired_user
        reason = left["content"]["reason"]
        assert "n…@e…" in reason and "@alice_exp:" in reason and "2 seconds" in reason
        assert "withdrawn" in reason
        assert "nobody@example.org" not in reason
