"""3PID invites through a real Synapse: delivered when the invitee binds, withdrawn on expiry."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import signedjson.key
import signedjson.sign
from unpaddedbase64 import decode_base64

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


class TestInviteLinkSignature:
    """The third-party invite flow with the key the invite email carries (sign-ed25519)."""

    @pytest.fixture
    def identity_settings(self) -> dict[str, Any]:
        return {"invites": {"join_url": "https://app.example/#/room/{room_id}?signurl={sign_url}"}}

    async def test_the_email_link_signs_with_the_key_in_the_room_and_synapse_accepts_it(
        self, synapse: SynapseServer, identity_server: RunningIdentityServer
    ) -> None:
        ids = identity_server
        alice, alice_hs, alice_is = await register_everywhere(synapse, ids, "alice_sig")
        room_id = await create_room_and_invite(
            synapse, ids, alice_hs, alice_is, "carol@example.org"
        )
        [event] = [
            e for e in await room_state(synapse, alice_hs, room_id)
            if e["type"] == "m.room.third_party_invite"
        ]  # fmt: skip
        ephemeral = next(
            k["public_key"]
            for k in event["content"]["public_keys"]
            if "ephemeral" in k["key_validity_url"]
        )
        [mail] = await ids.smtp.wait_for(1)
        text = mail.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        match = re.search(r"https://app\.example/#/room/\S+", text)
        assert match, text
        sign_url = parse_qs(urlsplit(urlsplit(match.group(0)).fragment).query)["signurl"][0]
        parts = urlsplit(sign_url)
        assert parse_qs(parts.query)["token"] == [event["state_key"]]

        # The invitee follows the link: POST {mxid} to it (v2: with its identity token).
        carol, carol_hs, carol_is = await register_everywhere(synapse, ids, "carol_sig")
        status, signed = await ids.request(
            "POST", f"{parts.path}?{parts.query}", token=carol_is, json={"mxid": carol}
        )
        assert status == 200, signed
        assert (signed["mxid"], signed["sender"]) == (carol, alice)
        verify_key = signedjson.key.decode_verify_key_bytes("ed25519:0", decode_base64(ephemeral))
        signedjson.sign.verify_signed_json(signed, ids.name, verify_key)

        # Synapse takes the signature as the invite's proof: the join exchanges the
        # third-party invite (checking the ephemeral key's validity with us) and succeeds.
        status, body = await synapse.client_request(
            "POST",
            f"/_matrix/client/v3/join/{quote(room_id)}",
            carol_hs,
            json={"third_party_signed": signed},
        )
        assert status == 200, body
        await wait_for_member(synapse, alice_hs, room_id, carol, "join")
