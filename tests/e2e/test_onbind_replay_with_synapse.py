"""A repeated onbind through a real Synapse: accepted at most once.

Synapse answers a repeated onbind for a token it already exchanged with 200 and a new invite
(its auth rules let a third-party invite turn ``join`` back into ``invite``) when the ``signed``
block verifies against a key whose ``key_validity_url`` says valid. Our onbind is signed with the
invite's ephemeral key only, which is valid once delivery started only until the onbind was
delivered or ``delivery.acceptance_window`` after Synapse first checked it: a repeat (an instance
died before it recorded the answer, and another sends the row again) is refused with 403.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from appservice.db.outbox import OutboxEntry, OutboxStore
from appservice.services.invites import ONBIND_PATH
from tests.e2e.conftest import RunningIdentityServer
from tests.e2e.flows import (
    V2,
    bind_through_synapse,
    create_room_and_invite,
    membership_history,
    register_everywhere,
    validate_email,
    wait_for_member,
    wait_until,
)
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e

WINDOW_S = 1.0


@pytest.fixture
def identity_settings() -> dict[str, Any]:
    # A short window and a quick poll, so the takeover of a dead instance's row is seen soon.
    return {"invites": {"delivery": {"acceptance_window": "1s", "poll_interval": "200ms"}}}


async def post_onbind(synapse: SynapseServer, body: Any) -> tuple[int, Any]:
    """POST an onbind body to Synapse's federation listener, as a sending instance does."""
    context = ssl.create_default_context(cafile=str(synapse.ca_file))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(synapse.federation_url + ONBIND_PATH, json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def only_entry(ids: RunningIdentityServer, invite_id: str) -> OutboxEntry:
    [entry] = await OutboxStore(ids.server.db).for_invite(invite_id)
    return entry


async def invited_and_bound(
    synapse: SynapseServer, ids: RunningIdentityServer, name: str
) -> tuple[str, str, str, str]:
    """alice invites <name>@example.org by email, <name> binds it: (room, invitee, invitee's HS
    token, alice's HS token) once Synapse has invited the invitee."""
    _, alice_hs, alice_is = await register_everywhere(synapse, ids, f"alice_{name}")
    address = f"{name}@example.org"
    room_id = await create_room_and_invite(synapse, ids, alice_hs, alice_is, address)
    user, user_hs, user_is = await register_everywhere(synapse, ids, name)
    sid = await validate_email(ids, user_is, address, f"{name}-secret")
    await bind_through_synapse(synapse, ids, user_hs, user_is, sid, f"{name}-secret")
    await wait_for_member(synapse, alice_hs, room_id, user, "invite")
    return room_id, user, user_hs, alice_hs


async def join(
    synapse: SynapseServer, room_id: str, user: str, user_hs: str, alice_hs: str
) -> None:
    status, body = await synapse.client_request(
        "POST", f"/_matrix/client/v3/join/{quote(room_id)}", user_hs, json={}
    )
    assert status == 200, body
    await wait_for_member(synapse, alice_hs, room_id, user, "join")


async def memberships(synapse: SynapseServer, alice_hs: str, room_id: str, user: str) -> list[str]:
    history = await membership_history(synapse, alice_hs, room_id, user)
    return [e["content"]["membership"] for e in history]


async def invite_id_of(ids: RunningIdentityServer, room_id: str) -> str:
    rows = await ids.server.db.fetch("SELECT id FROM invites WHERE room_id = $1", room_id)
    [row] = rows
    return str(row["id"])


async def delivered(ids: RunningIdentityServer, invite_id: str) -> OutboxEntry:
    async def done() -> bool:
        return (await only_entry(ids, invite_id)).state == "delivered"

    await wait_until(done, "the onbind to be marked delivered", within=10)
    return await only_entry(ids, invite_id)


async def test_a_replayed_onbind_after_the_join_is_refused_and_the_user_stays_joined(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    room_id, bob, bob_hs, alice_hs = await invited_and_bound(synapse, ids, "bob_replay")
    await join(synapse, room_id, bob, bob_hs, alice_hs)
    entry = await delivered(ids, await invite_id_of(ids, room_id))

    # The exact body the instance sent, sent again (as an instance that died before it recorded
    # Synapse's answer would have it sent again), now and after the window.
    body = json.loads(entry.body)
    for wait in (0.0, WINDOW_S + 0.5):
        await asyncio.sleep(wait)
        status, answer = await post_onbind(synapse, body)
        assert (status, answer.get("errcode")) == (403, "M_FORBIDDEN"), answer
        assert "Third party certificate was invalid" in answer["error"]
    assert await memberships(synapse, alice_hs, room_id, bob) == ["invite", "join"]


async def test_a_dead_instances_row_sent_again_by_another_is_refused(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    room_id, carol, carol_hs, alice_hs = await invited_and_bound(synapse, ids, "carol_crash")
    await join(synapse, room_id, carol, carol_hs, alice_hs)
    invite_id = await invite_id_of(ids, room_id)
    entry = await delivered(ids, invite_id)
    # What an instance killed after Synapse took the onbind, before it recorded the answer,
    # leaves behind: the row pending, claimed by a dead owner whose lease has run out (a lease
    # is longer than the acceptance window: it has passed).
    await asyncio.sleep(WINDOW_S + 0.5)
    await ids.server.db.execute(
        "UPDATE onbind_outbox SET state = 'pending', delivered_ts = NULL, claimed_by = 'dead',"
        " claimed_until = 0, next_attempt_ts = 0 WHERE id = $1",
        entry.id,
    )
    ids.server.invites.notify_queued()

    async def refused() -> bool:
        return (await only_entry(ids, invite_id)).state == "failed"

    # The running instance takes the row over and sends it; Synapse refuses it.
    await wait_until(refused, "the repeated onbind to be refused", within=10)
    failed = await only_entry(ids, invite_id)
    assert failed.last_error is not None and "403 M_FORBIDDEN" in failed.last_error
    assert await memberships(synapse, alice_hs, room_id, carol) == ["invite", "join"]


async def test_the_long_term_key_would_let_a_replay_invite_a_joined_user_again(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    """The measurement behind the design: the same onbind with its `signed` block signed with
    the always-valid long-term key (as before) pulls the joined user back to `invite`."""
    ids = identity_server
    room_id, dan, dan_hs, alice_hs = await invited_and_bound(synapse, ids, "dan_measure")
    await join(synapse, room_id, dan, dan_hs, alice_hs)
    entry = await delivered(ids, await invite_id_of(ids, room_id))
    body = json.loads(entry.body)
    invite = body["invites"][0]
    invite["signed"] = ids.server.keyring.sign(
        {"mxid": invite["signed"]["mxid"], "token": invite["signed"]["token"]}, ids.name
    )
    status, answer = await post_onbind(synapse, body)
    assert (status, answer) == (200, {})
    await wait_for_member(synapse, alice_hs, room_id, dan, "invite")
    assert await memberships(synapse, alice_hs, room_id, dan) == ["invite", "join", "invite"]


class TestFailedFirstExchange:
    """Synapse checked the key, then failed (simulated: we check the key as Synapse would and
    send nothing): a retry within the window is accepted, one after it is refused, and an
    operator's retry gets it accepted."""

    @pytest.fixture
    def identity_settings(self) -> dict[str, Any]:
        # Deliveries only when a test runs the job (the bind's wake-up is not awaited).
        return {"invites": {"delivery": {"acceptance_window": "1s", "poll_interval": "1h"}}}

    async def _bound_but_not_sent(
        self, synapse: SynapseServer, ids: RunningIdentityServer, name: str
    ) -> tuple[str, str, str, str, OutboxEntry]:
        _, alice_hs, alice_is = await register_everywhere(synapse, ids, f"alice_{name}")
        address = f"{name}@example.org"
        room_id = await create_room_and_invite(synapse, ids, alice_hs, alice_is, address)
        user, user_hs, user_is = await register_everywhere(synapse, ids, name)
        invite_id = await invite_id_of(ids, room_id)
        # A dead instance holds the row from the start, so the bind's wake-up sends nothing.
        sid = await validate_email(ids, user_is, address, f"{name}-secret")
        ids.server.delivery.stop_claiming()
        await bind_through_synapse(synapse, ids, user_hs, user_is, sid, f"{name}-secret")
        entry = await only_entry(ids, invite_id)
        await ids.server.db.execute(
            "UPDATE onbind_outbox SET claimed_by = 'dead', claimed_until = 0 WHERE id = $1",
            entry.id,
        )
        return room_id, user, alice_hs, invite_id, entry

    async def _check_key_as_synapse(self, ids: RunningIdentityServer, entry: OutboxEntry) -> bool:
        row = await ids.server.db.fetchrow(
            "SELECT ephemeral_public_key FROM invites WHERE id = $1", entry.invite_id
        )
        key = quote(row["ephemeral_public_key"])
        status, body = await ids.request("GET", f"{V2}/pubkey/ephemeral/isvalid?public_key={key}")
        assert status == 200, body
        return bool(body["valid"])

    async def test_a_retry_after_the_window_is_refused_until_an_operator_retries(
        self, synapse: SynapseServer, identity_server: RunningIdentityServer
    ) -> None:
        ids = identity_server
        room_id, erin, alice_hs, invite_id, entry = await self._bound_but_not_sent(
            synapse, ids, "erin_lost"
        )
        assert await self._check_key_as_synapse(ids, entry)  # "Synapse" checked, then failed
        body = json.loads(entry.body)
        await asyncio.sleep(WINDOW_S + 0.5)
        status, answer = await post_onbind(synapse, body)
        assert (status, answer.get("errcode")) == (403, "M_FORBIDDEN"), answer
        assert await memberships(synapse, alice_hs, room_id, erin) == []  # lost...
        await ids.server.db.execute(  # (as the worker records the 403)
            "UPDATE onbind_outbox SET state = 'failed', attempts = 2, claimed_by = NULL,"
            " claimed_until = NULL WHERE id = $1",
            entry.id,
        )

        # ...until an operator retries it (`invites retry`): accepted once more.
        assert await ids.server.invites.retry(invite_id) == 1
        await ids.server.db.execute(
            "UPDATE onbind_outbox SET claimed_by = 'dead', claimed_until = 0 WHERE id = $1",
            entry.id,
        )
        status, answer = await post_onbind(synapse, body)
        assert (status, answer) == (200, {})
        await wait_for_member(synapse, alice_hs, room_id, erin, "invite")

    async def test_retry_within_the_window_is_accepted(
        self, synapse: SynapseServer, identity_server: RunningIdentityServer
    ) -> None:
        ids = identity_server
        room_id, frank, alice_hs, _, entry = await self._bound_but_not_sent(
            synapse, ids, "frank_win"
        )
        assert await self._check_key_as_synapse(ids, entry)
        status, answer = await post_onbind(synapse, json.loads(entry.body))
        assert (status, answer) == (200, {})
        await wait_for_member(synapse, alice_hs, room_id, frank, "invite")


async def test_measured_duplicate_acceptances_per_replay(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    """Five joined invitees, each onbind replayed three times as sent (after the window) and once
    with its `signed` block signed by the long-term key (as before): new invites counted."""
    ids = identity_server
    replays = {"ephemeral key, after the window": 0, "long-term key": 0}
    duplicates = dict.fromkeys(replays, 0)
    for n in range(5):
        room_id, user, user_hs, alice_hs = await invited_and_bound(synapse, ids, f"m{n}_measure")
        await join(synapse, room_id, user, user_hs, alice_hs)
        body = json.loads((await delivered(ids, await invite_id_of(ids, room_id))).body)
        await asyncio.sleep(WINDOW_S)
        for _ in range(3):
            status, _ = await post_onbind(synapse, body)
            replays["ephemeral key, after the window"] += 1
            duplicates["ephemeral key, after the window"] += status == 200
        assert await memberships(synapse, alice_hs, room_id, user) == ["invite", "join"]
        invite = body["invites"][0]
        invite["signed"] = ids.server.keyring.sign(
            {"mxid": user, "token": invite["signed"]["token"]}, ids.name
        )
        status, _ = await post_onbind(synapse, body)
        replays["long-term key"] += 1
        await wait_for_member(synapse, alice_hs, room_id, user, "invite")
        duplicates["long-term key"] += (await memberships(synapse, alice_hs, room_id, user))[
            -1
        ] == "invite"
    print(f"\nreplays and duplicate acceptances: {replays} {duplicates}")
    assert duplicates == {"ephemeral key, after the window": 0, "long-term key": 5}


async def test_the_residual_a_repeat_within_the_window_of_an_unrecorded_delivery(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    """What the window leaves: a repeat whose key check comes within acceptance_window of the
    first one, while the delivery is not recorded (the sender died before it saw the 200), is
    accepted. A real repeat comes a lease (10 s) after the sender's last renewal, so this needs
    a homeserver that took longer than lease - acceptance_window to check the key."""
    ids = identity_server
    room_id, gus, gus_hs, alice_hs = await invited_and_bound(synapse, ids, "gus_residual")
    await join(synapse, room_id, gus, gus_hs, alice_hs)
    entry = await delivered(ids, await invite_id_of(ids, room_id))
    # (claimed until far ahead: the running instance does not send it too)
    await ids.server.db.execute(
        "UPDATE onbind_outbox SET state = 'pending', delivered_ts = NULL, claimed_by = 'dead',"
        " claimed_until = 9000000000000000, next_attempt_ts = 0 WHERE id = $1",
        entry.id,
    )
    status, answer = await post_onbind(synapse, json.loads(entry.body))
    assert (status, answer) == (200, {})
    await wait_for_member(synapse, alice_hs, room_id, gus, "invite")
    assert await memberships(synapse, alice_hs, room_id, gus) == ["invite", "join", "invite"]
