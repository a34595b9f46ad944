"""Switching from sydent to us with a 3PID invite already in a room (issue 18), end to end.

Before the switch: a real sydent 2.6.1 serves the identity server's public name (its invites'
``key_validity_url`` values name ``https://localhost:<port>``); alice's homeserver (the real
Synapse) asks it to store an invite of bob's address and puts the ``m.room.third_party_invite``
event into the room. Synapse talks only https to identity servers and sydent serves plain http,
so the test makes sydent's store-invite call itself, as Synapse does, and sends the state event
with the content Synapse builds from the answer. Then sydent stops, its database and sydent.conf
are imported into ours, and our server starts on the same name and port.

After the switch: bob binds the address through Synapse and our server; our onbind carries the
imported invite signed with sydent's key; Synapse verifies it against the key in the room, asks
our ``key_validity_url``, and invites bob, who joins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import signedjson.key
import signedjson.sign
from unpaddedbase64 import decode_base64

from tests.e2e.conftest import RunningIdentityServer
from tests.e2e.flows import (
    V2,
    bind_through_synapse,
    register_everywhere,
    room_state,
    validate_email,
    wait_for_member,
)
from tests.support.smtp import SmtpSink
from tests.support.sydent import SydentProcess, ensure_sydent_venv, import_sydent, store_invite
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e

ADDRESS = "bob.switch@example.org"


@dataclass
class BeforeTheSwitch:
    """What happened while sydent was the identity server."""

    alice: str = ""
    alice_token: str = ""
    room_id: str = ""
    token: str = ""
    sydent_public_key: str = ""
    event_content: dict[str, Any] = field(default_factory=dict)
    import_output: str = ""


@pytest.fixture
def before_the_switch() -> BeforeTheSwitch:
    """Filled in by ``before_identity_start``."""
    return BeforeTheSwitch()


@pytest.fixture
def before_identity_start(
    synapse: SynapseServer, identity_port: int, tmp_path: Path, before_the_switch: BeforeTheSwitch
) -> Callable[[Path], Awaitable[None]]:
    """sydent's time: the invite stored by sydent and put into the room; then the import."""
    state = before_the_switch
    public_name = f"localhost:{identity_port}"

    async def sydent_era(config: Path) -> None:
        state.alice, state.alice_token = await synapse.register_user(
            "alice_switch", "a long test password"
        )
        status, body = await synapse.client_request(
            "POST", "/_matrix/client/v3/createRoom", state.alice_token, json={"name": "Garden club"}
        )
        assert status == 200, body
        state.room_id = body["room_id"]

        venv = await asyncio.to_thread(ensure_sydent_venv)
        async with SmtpSink() as smtp:
            sydent = SydentProcess(
                tmp_path / "sydent",
                venv=venv,
                smtp_port=smtp.port,
                server_name=public_name,
                public_base_url=f"https://{public_name}",
            )
            await asyncio.to_thread(sydent.start)
            try:
                # What Synapse posts to store-invite (unset optional fields as "").
                answer = await store_invite(
                    sydent.base_url,
                    ADDRESS,
                    state.room_id,
                    state.alice,
                    sender_display_name="alice_switch",
                    sender_avatar_url="",
                    room_name="Garden club",
                    room_alias="",
                    room_avatar_url="",
                    room_join_rules="invite",
                )
            finally:
                await asyncio.to_thread(sydent.stop)
            assert len(await smtp.wait_for(1)) == 1  # sydent mailed bob the invite
        state.token = answer["token"]
        state.sydent_public_key = answer["public_key"]
        # The event content Synapse builds from a store-invite answer with a top-level key.
        state.event_content = {
            "display_name": answer["display_name"],
            "public_keys": answer["public_keys"],
            "key_validity_url": f"https://{public_name}{V2}/pubkey/isvalid",
            "public_key": answer["public_key"],
        }
        status, body = await synapse.client_request(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote(state.room_id)}/state/m.room.third_party_invite/"
            f"{quote(state.token)}",
            state.alice_token,
            json=state.event_content,
        )
        assert status == 200, body

        # The switch: sydent is stopped; its database and sydent.conf are imported.
        result = await asyncio.to_thread(import_sydent, config, sydent.db_path, sydent.config_path)
        assert result.returncode == 0, result.stdout + result.stderr
        state.import_output = result.stdout

    return sydent_era


async def bob_is_invited(synapse: SynapseServer, bob_hs: str, room_id: str, since: str) -> None:
    """Long-poll bob's /sync until the room shows among his invites."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, body = await synapse.client_request(
            "GET", "/_matrix/client/v3/sync", bob_hs, params={"since": since, "timeout": "5000"}
        )
        assert status == 200, body
        if room_id in body.get("rooms", {}).get("invite", {}):
            return
        since = body["next_batch"]
    raise AssertionError(f"bob was not invited to {room_id}")


async def test_an_invite_stored_by_sydent_before_the_switch_is_delivered_by_us(
    synapse: SynapseServer,
    identity_server: RunningIdentityServer,
    before_the_switch: BeforeTheSwitch,
) -> None:
    ids, before = identity_server, before_the_switch
    assert "invites: found 1, imported 1" in before.import_output
    [event] = [
        e for e in await room_state(synapse, before.alice_token, before.room_id)
        if e["type"] == "m.room.third_party_invite"
    ]  # fmt: skip
    assert event["state_key"] == before.token
    # We serve sydent's key, and every validity URL in the room answers "valid" on our server,
    # sydent's own v1 ones included, as the homeserver will ask them.
    status, body = await ids.request("GET", f"{V2}/pubkey/ed25519:0")
    assert (status, body) == (200, {"public_key": before.sydent_public_key})
    keys = [event["content"], *event["content"]["public_keys"]]
    assert len(keys) == 3
    for key in keys:
        url = urlsplit(key["key_validity_url"])
        assert url.netloc == ids.name
        status, body = await ids.request("GET", f"{url.path}?public_key={quote(key['public_key'])}")
        assert (status, body) == (200, {"valid": True}), url.path

    bob, bob_hs, bob_is = await register_everywhere(synapse, ids, "bob_switch")
    status, body = await synapse.client_request("GET", "/_matrix/client/v3/sync", bob_hs)
    assert status == 200, body
    since = body["next_batch"]
    sid = await validate_email(ids, bob_is, ADDRESS, "bobs-secret")

    started = time.perf_counter()
    await bind_through_synapse(synapse, ids, bob_hs, bob_is, sid, "bobs-secret")
    await bob_is_invited(synapse, bob_hs, before.room_id, since)
    elapsed = time.perf_counter() - started
    print(f"\nbind to bob's invite in /sync (stored by sydent, delivered by us): {elapsed:.2f} s")

    invite = await wait_for_member(synapse, before.alice_token, before.room_id, bob, "invite")
    signed = invite["content"]["third_party_invite"]["signed"]
    assert (signed["mxid"], signed["token"]) == (bob, before.token)
    # Signed with sydent's key, which the room's invite event lists.
    [(server, signatures)] = signed["signatures"].items()
    verify_key = signedjson.key.decode_verify_key_bytes(
        "ed25519:0", decode_base64(before.sydent_public_key)
    )
    assert list(signatures) == ["ed25519:0"]
    signedjson.sign.verify_signed_json(signed, server, verify_key)

    status, body = await synapse.client_request(
        "POST", f"/_matrix/client/v3/join/{quote(before.room_id)}", bob_hs, json={}
    )
    assert status == 200, body
    await wait_for_member(synapse, before.alice_token, before.room_id, bob, "join")
