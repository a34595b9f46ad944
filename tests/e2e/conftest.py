"""Session-wide fixtures for end-to-end tests against a real Synapse."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from appservice.app import IdentityServer
from appservice.config import Config, load_config_text
from appservice.matrix.registration import build_registration, new_token, write_registration
from tests.support.settings import deep_merge
from tests.support.smtp import SmtpSink
from tests.support.synapse import SynapseServer, ensure_synapse_venv, free_port
from tests.support.tls import TestCertificates, make_test_certificates


@pytest.fixture(scope="session")
def test_certificates(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    """A test CA and a ``localhost`` certificate shared by every server in the session."""
    return make_test_certificates(tmp_path_factory.mktemp("certs"))


@dataclass(frozen=True)
class AppserviceSetup:
    """What our appservice and Synapse share: tokens, our private port, the registration."""

    as_token: str
    hs_token: str
    port: int
    registration: Path

    def settings(self, synapse: SynapseServer) -> dict[str, Any]:
        """The identity server's ``appservice:`` config for this Synapse."""
        return {
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "homeserver_url": synapse.client_url,
            "homeserver_domain": synapse.server_name,
            "url": f"http://127.0.0.1:{self.port}",
            "listen": {"host": "127.0.0.1", "port": self.port},
        }

    def write(self, synapse: SynapseServer) -> None:
        """Write the registration (our generator) for this Synapse's domain."""
        config = load_config_text(
            yaml.safe_dump({"appservice": self.settings(synapse)}), self.registration.parent, {}
        )
        write_registration(self.registration, build_registration(config.appservice))


@pytest.fixture(scope="session")
def appservice_setup(tmp_path_factory: pytest.TempPathFactory) -> AppserviceSetup:
    """Tokens and a port for our appservice, fixed for the session (Synapse loads them once)."""
    return AppserviceSetup(
        as_token=new_token(),
        hs_token=new_token(),
        port=free_port(),
        registration=tmp_path_factory.mktemp("appservice") / "registration.yaml",
    )


@pytest.fixture(scope="session")
def msisdn_delegate_port() -> int:
    """The port of the identity server that the session's Synapse uses as its SMS delegate
    (``account_threepid_delegates.msisdn``); a test serves it by overriding ``identity_port``."""
    return free_port()


@pytest.fixture(scope="session")
def synapse(
    tmp_path_factory: pytest.TempPathFactory,
    test_certificates: TestCertificates,
    appservice_setup: AppserviceSetup,
    msisdn_delegate_port: int,
) -> Iterator[SynapseServer]:
    """One real Synapse for the whole test session, loading our appservice registration
    (written by our own generator); fails loudly if it cannot run. Its SMS delegate is
    ``https://localhost:<msisdn_delegate_port>`` (only phone number requests go there)."""
    venv = ensure_synapse_venv()
    server = SynapseServer(
        tmp_path_factory.mktemp("synapse"),
        test_certificates,
        venv=venv,
        app_service_config_files=[appservice_setup.registration],
        before_start=appservice_setup.write,
        extra_config={
            "account_threepid_delegates": {"msisdn": f"https://localhost:{msisdn_delegate_port}"}
        },
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


class RunningIdentityServer:
    """Our identity server listening with TLS on loopback, as Synapse needs it (https only)."""

    def __init__(self, server: IdentityServer, port: int, smtp: SmtpSink, ca_file: Path) -> None:
        self.server = server
        self.port = port
        self.smtp = smtp
        self.name = f"localhost:{port}"
        self.base_url = f"https://localhost:{port}"
        self._ssl = ssl.create_default_context(cafile=str(ca_file))

    async def restart(self) -> None:
        """Stop this instance and start a new process-like instance on the same config."""
        config = self.server.config
        await self.server.stop()
        self.server = IdentityServer(config)
        await self.server.start()
        await self.server.serve()

    async def request(
        self, method: str, path: str, *, token: str | None = None, json: Any = None
    ) -> tuple[int, Any]:
        """A request over verified TLS; returns (status, JSON body)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connector = aiohttp.TCPConnector(ssl=self._ssl)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(method, self.base_url + path, json=json, headers=headers) as resp,
        ):
            return resp.status, await resp.json(content_type=None)


@pytest.fixture
def identity_settings() -> dict[str, Any]:
    """Extra config for the identity server under test (override in a test module)."""
    return {}


@pytest.fixture
def identity_port() -> int:
    """The port of the identity server under test (override in a test module, e.g. with
    ``msisdn_delegate_port`` to be Synapse's SMS delegate)."""
    return free_port()


@pytest.fixture
def before_identity_start() -> Callable[[Path], Awaitable[None]] | None:
    """Called with the identity server's config file (YAML) before the server starts, e.g. to
    import another server's data into its database as an operator would; None (override in a
    test module) for nothing."""
    return None


def base_identity_settings(
    tmp_path: Path,
    port: int,
    synapse: SynapseServer,
    certs: TestCertificates,
    smtp: SmtpSink,
    appservice_setup: AppserviceSetup,
) -> dict[str, Any]:
    """Our server's settings for the e2e suite: SQLite in ``tmp_path``, TLS on ``port`` under
    the name ``localhost:<port>``, the SMTP sink, Synapse reachable by discovery."""
    return {
        "server": {"name": f"localhost:{port}", "public_base_url": f"https://localhost:{port}"},
        "listen": {
            "host": "127.0.0.1",
            "port": port,
            "tls_cert": str(certs.cert),
            "tls_key": str(certs.key),
        },
        "database": {"url": f"sqlite:{tmp_path / 'is.db'}"},
        "federation": {
            "allowed_networks": ["127.0.0.0/8", "::1/128"],
            "ca_file": str(synapse.ca_file),
        },
        "notifications": {
            "email": {"connector": "smtp", "smtp": {"host": "127.0.0.1", "port": smtp.port}}
        },
        "appservice": appservice_setup.settings(synapse),
    }


@pytest.fixture
async def identity_server(
    tmp_path: Path,
    synapse: SynapseServer,
    test_certificates: TestCertificates,
    identity_settings: dict[str, Any],
    appservice_setup: AppserviceSetup,
    identity_port: int,
    before_identity_start: Callable[[Path], Awaitable[None]] | None,
) -> AsyncIterator[RunningIdentityServer]:
    """Our server on SQLite with TLS, a real SMTP sink, and Synapse reachable by discovery."""
    port = identity_port
    async with SmtpSink() as smtp:
        settings = base_identity_settings(
            tmp_path, port, synapse, test_certificates, smtp, appservice_setup
        )
        settings = deep_merge(settings, identity_settings)
        if before_identity_start is not None:
            config_file = tmp_path / "identity.yaml"
            config_file.write_text(yaml.safe_dump(settings))
            await before_identity_start(config_file)
        config = load_config_text(yaml.safe_dump(settings), tmp_path, environ={})
        async with running_identity_server(config, port, smtp, test_certificates) as running:
            yield running


@contextlib.asynccontextmanager
async def running_identity_server(
    config: Config, port: int, smtp: SmtpSink, certs: TestCertificates
) -> AsyncIterator[RunningIdentityServer]:
    """Our server serving ``config`` (TLS on ``port``), stopped on exit."""
    server = IdentityServer(config)
    await server.start()
    await server.serve()
    running = RunningIdentityServer(server, port, smtp, certs.ca_cert)
    try:
        yield running
    finally:
        await running.server.stop()
