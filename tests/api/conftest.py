"""A running identity server (both databases) with an HTTP test client."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.config import Config, load_config_text
from appservice.db.bindings import Binding
from tests.support.homeserver import FakeHomeserver


def make_config(
    tmp_path: Path, database_url: str, homeserver: FakeHomeserver, yaml: str = ""
) -> Config:
    """A config for tests: given database, key in tmp_path, the fake homeserver reachable."""
    base = load_config_text(yaml, tmp_path, environ={})
    return dataclasses.replace(
        base,
        database=dataclasses.replace(base.database, url=database_url),
        federation=dataclasses.replace(
            base.federation,
            overrides={homeserver.server_name: homeserver.base_url, **base.federation.overrides},
            allowed_networks=("127.0.0.0/8",),
        ),
    )


class Api:
    """A test client with helpers for registering users."""

    def __init__(self, client: TestClient, server: IdentityServer, homeserver: FakeHomeserver):
        self.client = client
        self.server = server
        self.homeserver = homeserver
        self._count = 0

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send a request; returns (status, parsed JSON body or text)."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        async with self.client.request(
            method, path, json=json, data=data, headers=all_headers
        ) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def add_binding(self, medium: str, address: str, mxid: str) -> None:
        """Store a binding directly (as a completed bind would)."""
        now = self.server.clock.now_ms()
        binding = Binding(medium, address, mxid, now, now, now + 100 * 365 * 86_400_000)
        await self.server.bindings.upsert(binding, self.server.lookup.hash_of(medium, address))

    async def register(self, localpart: str | None = None) -> tuple[str, str]:
        """Register a user of the fake homeserver; returns (user_id, IS access token)."""
        self._count += 1
        localpart = localpart or f"user{self._count}"
        user_id = f"@{localpart}:{self.homeserver.server_name}"
        credentials = self.homeserver.issue_openid_token(user_id, f"openid-{localpart}")
        status, body = await self.request(
            "POST", "/_matrix/identity/v2/account/register", json=credentials
        )
        assert status == 200, body
        return user_id, body["token"]


@pytest.fixture
def config_yaml() -> str:
    """Extra YAML for the server under test (override in a test module to configure it)."""
    return ""


@pytest.fixture
async def api(
    tmp_path: Path, database_url: str, homeserver: FakeHomeserver, config_yaml: str
) -> AsyncIterator[Api]:
    """An identity server on a fresh database, behind an aiohttp test client."""
    config = make_config(tmp_path, database_url, homeserver, config_yaml)
    server = IdentityServer(config, clock=FakeClock())
    await server.start()
    client = TestClient(TestServer(server.public_app()))
    await client.start_server()
    try:
        yield Api(client, server, homeserver)
    finally:
        await client.close()
        await server.stop()
