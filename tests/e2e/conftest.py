"""Session-wide fixtures for end-to-end tests against a real Synapse."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.synapse import SynapseServer, ensure_synapse_venv
from tests.support.tls import TestCertificates, make_test_certificates


@pytest.fixture(scope="session")
def test_certificates(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    """A test CA and a ``localhost`` certificate shared by every server in the session."""
    return make_test_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def synapse(
    tmp_path_factory: pytest.TempPathFactory, test_certificates: TestCertificates
) -> Iterator[SynapseServer]:
    """One real Synapse for the whole test session; fails loudly if it cannot run."""
    venv = ensure_synapse_venv()
    server = SynapseServer(tmp_path_factory.mktemp("synapse"), test_certificates, venv=venv)
    server.start()
    try:
        yield server
    finally:
        server.stop()
