"""The real-Synapse fixture: users, OpenID tokens and the TLS federation listener work."""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.support import tls
from tests.support.synapse import SynapseError, SynapseServer

pytestmark = pytest.mark.e2e

USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"


async def _userinfo(synapse: SynapseServer, token: str) -> tuple[int, dict[str, object]]:
    """Call Synapse's federation ``openid/userinfo`` over TLS trusting only the test CA."""
    context = ssl.create_default_context(cafile=str(synapse.ca_file))
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(
            synapse.federation_url + USERINFO_PATH,
            params={"access_token": token},
            ssl=context,
        ) as response,
    ):
        return response.status, await response.json()


def test_server_name_names_the_tls_port(synapse: SynapseServer) -> None:
    assert synapse.server_name == f"localhost:{synapse.federation_port}"
    assert synapse.federation_url == f"https://{synapse.server_name}"
    assert synapse.is_running


async def test_register_user_and_whoami(synapse: SynapseServer) -> None:
    localpart = f"alice-{uuid.uuid4().hex[:8]}"
    user_id, token = await synapse.register_user(localpart, "correct horse battery")
    assert user_id == f"@{localpart}:{synapse.server_name}"
    status, body = await synapse.client_request("GET", "/_matrix/client/v3/account/whoami", token)
    assert status == 200
    assert body["user_id"] == user_id


async def test_openid_token_resolves_over_federation_tls(synapse: SynapseServer) -> None:
    localpart = f"bob-{uuid.uuid4().hex[:8]}"
    user_id, token = await synapse.register_user(localpart, "hunter2hunter2", admin=True)
    credentials = await synapse.request_openid_token(user_id, token)
    assert credentials["token_type"] == "Bearer"
    assert credentials["matrix_server_name"] == synapse.server_name
    assert isinstance(credentials["expires_in"], int)
    assert credentials["expires_in"] > 0

    status, body = await _userinfo(synapse, str(credentials["access_token"]))
    assert status == 200
    assert body["sub"] == user_id


async def test_bogus_openid_token_is_unknown(synapse: SynapseServer) -> None:
    status, body = await _userinfo(synapse, "not-a-real-token")
    assert status == 401
    assert body["errcode"] == "M_UNKNOWN_TOKEN"


async def test_federation_tls_rejects_clients_without_the_test_ca(synapse: SynapseServer) -> None:
    """The TLS listener really presents the test certificate (the system store rejects it)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.get(synapse.federation_url + "/_matrix/key/v2/server"):
                pass


def test_start_failure_raises_with_log_tail(
    tmp_path: Path, test_certificates: tls.TestCertificates
) -> None:
    """A Synapse that cannot start fails loudly, showing why."""
    server = SynapseServer(
        tmp_path / "broken", test_certificates, extra_config={"database": {"name": "bogus_db"}}
    )
    with pytest.raises(SynapseError, match="Unsupported database type 'bogus_db'"):
        server.start()
    assert not server.is_running
