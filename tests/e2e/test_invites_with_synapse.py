"""3PID invites through a real Synapse: delivered when the invitee binds, withdrawn on expiry."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from tests.e2e.conftest import RunningIdentityServer
from tests.e2e.flows import (
    V2,
    bind_through_synapse,
    create_room_and_invite,
    membership_history,
    register_everywhere,
    room_state,
    validate_email,
    wait_for_member,
)
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e


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
    sid = await validate_email(ids, bob_is, address, "bobs-secret")
    await bind_through_synapse(synapse, ids, bob_hs, bob_is, sid, "bobs-secret")

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
