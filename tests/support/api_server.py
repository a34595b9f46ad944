"""A running identity server (both databases) with an HTTP test client: the ``api`` fixture and
the doubles around it (SMTP sink, Twilio, homeservers, clock), for every test folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.config import Config, load_config_text
from appservice.db.bindings import Binding
from tests.support.homeserver import FakeHomeserver
from tests.support.settings import deep_merge
from tests.support.signing_homeserver import SigningHomeserver
from tests.support.smtp import SmtpSink
from tests.support.twilio import FakeTwilio


def make_config(
    tmp_path: Path,
    database_url: str,
    homeservers: dict[str, str],
    yaml_text: str = "",
    *,
    smtp: SmtpSink | None = None,
    twilio: FakeTwilio | None = None,
) -> Config:
    """A config for tests: the given database, a key in tmp_path, loopback homeservers (name ->
    base URL) reachable, and mail/SMS going to the loopback SMTP sink and fake Twilio."""
    settings: dict[str, Any] = {
        "server": {"name": "id.test", "public_base_url": "https://id.test"},
        "database": {"url": database_url},
        "federation": {"overrides": homeservers, "allowed_networks": ["127.0.0.0/8"]},
    }
    if smtp is not None:
        settings["notifications"] = {
            "email": {
                "connector": "smtp",
                "sender": "Identity <id@id.test>",
                "smtp": {"host": "127.0.0.1", "port": smtp.port},
            }
        }
    if twilio is not None:
        settings = deep_merge(
            settings,
            {
                "notifications": {
                    "sms": {
                        "connector": "twilio",
                        "twilio": {
                            "account_sid": twilio.account_sid,
                            "auth_token": twilio.auth_token,
                            "from_number": "+15005550006",
                            "base_url": twilio.base_url,
                        },
                    }
                }
            },
        )
    settings = deep_merge(settings, yaml.safe_load(yaml_text) or {})
    return load_config_text(yaml.safe_dump(settings), tmp_path, environ={})


class Api:
    """A test client with helpers for registering users."""

    def __init__(
        self,
        client: TestClient,
        server: IdentityServer,
        homeserver: FakeHomeserver,
        smtp: SmtpSink,
        twilio: FakeTwilio,
        signing_homeserver: SigningHomeserver,
    ):
        self.client = client
        self.server = server
        self.homeserver = homeserver
        self.smtp = smtp
        self.twilio = twilio
        self.signing_homeserver = signing_homeserver
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
        await self.server.bindings.upsert(
            binding, await self.server.lookup.hashes_of(medium, address)
        )

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
async def smtp_sink() -> AsyncIterator[SmtpSink]:
    """A real SMTP server on loopback that keeps what it receives."""
    async with SmtpSink() as sink:
        yield sink


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    """A loopback server speaking Twilio's Messages API."""
    async with FakeTwilio() as fake:
        yield fake


@pytest.fixture
async def signing_homeserver() -> AsyncIterator[SigningHomeserver]:
    """A loopback homeserver with a signing key, as a homeserver that signs unbind requests."""
    async with SigningHomeserver("signing.test") as hs:
        yield hs


@pytest.fixture
def clock() -> FakeClock:
    """The server's clock, moved by tests instead of sleeping."""
    return FakeClock()


@pytest.fixture
async def api(
    tmp_path: Path,
    database_url: str,
    homeserver: FakeHomeserver,
    smtp_sink: SmtpSink,
    twilio: FakeTwilio,
    signing_homeserver: SigningHomeserver,
    clock: FakeClock,
    config_yaml: str,
) -> AsyncIterator[Api]:
    """An identity server on a fresh database, behind an aiohttp test client."""
    config = make_config(
        tmp_path,
        database_url,
        {
            homeserver.server_name: homeserver.base_url,
            signing_homeserver.server_name: signing_homeserver.base_url,
        },
        config_yaml,
        smtp=smtp_sink,
        twilio=twilio,
    )
    server = IdentityServer(config, clock=clock)
    await server.start()
    client = TestClient(TestServer(server.public_app()))
    await client.start_server()
    try:
        yield Api(client, server, homeserver, smtp_sink, twilio, signing_homeserver)
    finally:
        await client.close()
        await server.stop()
