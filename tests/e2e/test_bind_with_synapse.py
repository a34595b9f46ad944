"""Validate an email with our server, bind and unbind it through a real Synapse."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import RunningIdentityServer
from tests.e2e.flows import (
    bind_through_synapse,
    lookup,
    register_everywhere,
    validate_email,
)
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e


async def test_bind_and_unbind_through_synapse(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    user_id, hs_token, is_token = await register_everywhere(synapse, ids, "carol")
    address = "carol@example.org"
    sid = await validate_email(ids, is_token, address, "carols-secret")

    # Synapse proxies the bind to our /v2/3pid/bind with the user's identity-server token.
    await bind_through_synapse(synapse, ids, hs_token, is_token, sid, "carols-secret")
    assert await lookup(ids, is_token, address) == user_id

    # Synapse signs the unbind with its server key (X-Matrix, destination_is = our name).
    status, body = await synapse.client_request(
        "POST",
        "/_matrix/client/v3/account/3pid/unbind",
        hs_token,
        json={"medium": "email", "address": address, "id_server": ids.name},
    )
    assert status == 200, body
    assert body.get("id_server_unbind_result") == "success", body
    assert await lookup(ids, is_token, address) is None
