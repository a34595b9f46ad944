"""Registering with the identity server using an OpenID token from a real Synapse."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from appservice.app import IdentityServer
from appservice.config import load_config_text
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e


@pytest.fixture
async def identity_client(tmp_path: Path, synapse: SynapseServer) -> AsyncIterator[TestClient]:
    """Our server on SQLite, reaching Synapse by real server discovery over verified TLS."""
    base = load_config_text("", tmp_path, environ={})
    config = dataclasses.replace(
        base,
        database=dataclasses.replace(base.database, url=f"sqlite:{tmp_path / 'is.db'}"),
        federation=dataclasses.replace(
            base.federation,
            allowed_networks=("127.0.0.0/8", "::1/128"),
            ca_file=str(synapse.ca_file),
        ),
    )
    server = IdentityServer(config)
    await server.start()
    client = TestClient(TestServer(server.public_app()))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await server.stop()


async def test_openid_registration_against_real_synapse(
    synapse: SynapseServer, identity_client: TestClient
) -> None:
    user_id, access_token = await synapse.register_user("alice", "correct horse battery")
    credentials = await synapse.request_openid_token(user_id, access_token)
    assert credentials["matrix_server_name"] == synapse.server_name

    async with identity_client.post(
        "/_matrix/identity/v2/account/register", json=credentials
    ) as resp:
        assert resp.status == 200, await resp.text()
        token = (await resp.json())["token"]

    headers = {"Authorization": f"Bearer {token}"}
    async with identity_client.get("/_matrix/identity/v2/account", headers=headers) as resp:
        assert (resp.status, await resp.json()) == (200, {"user_id": user_id})


async def test_forged_openid_token_is_rejected_by_real_synapse(
    synapse: SynapseServer, identity_client: TestClient
) -> None:
    async with identity_client.post(
        "/_matrix/identity/v2/account/register",
        json={
            "access_token": "forged",
            "token_type": "Bearer",
            "matrix_server_name": synapse.server_name,
            "expires_in": 3600,
        },
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["errcode"] == "M_UNKNOWN_TOKEN"
