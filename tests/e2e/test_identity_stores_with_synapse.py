"""Identity stores end to end: the synapse store reading the real Synapse's database, so a user
whose email Synapse knows is found by hashed lookup and gets the invite that was waiting."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.e2e.conftest import RunningIdentityServer
from tests.e2e.flows import (
    create_room_and_invite,
    lookup,
    register_admin,
    register_everywhere,
    set_threepids,
    wait_for_member,
)
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def identity_settings(synapse: SynapseServer) -> dict[str, Any]:
    """Our server with the synapse store on the session Synapse's SQLite database, copied every
    second (the default is 5 minutes)."""
    return {
        "stores": {
            "order": ["synapse"],
            "sync_interval": "1s",
            # all: the 3PIDs below are added through the admin API, which binds none.
            "synapse": {
                "database_url": f"sqlite:{synapse.workdir / 'homeserver.db'}",
                "threepids": "all",
            },
        }
    }


async def test_a_person_synapse_knows_is_found_and_gets_the_pending_invite(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    suffix = uuid.uuid4().hex[:8]
    _, alice_hs, alice_is = await register_everywhere(synapse, ids, f"alice_st_{suffix}")
    address = f"carla-{suffix}@example.org"
    # Nobody has the address yet: Synapse stores a 3PID invite with us.
    room_id = await create_room_and_invite(synapse, ids, alice_hs, alice_is, address)
    await ids.smtp.wait_for(1)
    assert await lookup(ids, alice_is, address) is None

    # Carla's account gets the address in Synapse (as an admin or a validated add would do).
    carla, _ = await synapse.register_user(f"carla_{suffix}", "a long test password")
    admin = await register_admin(synapse, f"admin_st_{suffix}")
    await set_threepids(synapse, admin, carla, [("email", address)])

    # The next sync (within a second) copies it, which wakes the resolution job: the invite
    # resolves to Carla, the onbind goes to Synapse, and Synapse invites her.
    invite = await wait_for_member(synapse, alice_hs, room_id, carla, "invite")
    assert invite["content"]["third_party_invite"]["signed"]["mxid"] == carla
    assert await lookup(ids, alice_is, address) == carla
