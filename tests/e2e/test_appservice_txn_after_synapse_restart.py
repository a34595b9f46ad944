"""Appservice transactions after a restart of a real Synapse on SQLite (issue 17, item 5).

Synapse numbers appservice transactions from a sequence that starts, at each start, from the
largest id still in its ``application_services_txns`` table; delivered transactions are deleted
from it. So after a restart with everything delivered, the ids start from 1 again, and a
transaction "1" carries new events. Had we dropped it as a retry, the second expired invite below
would never be rejected.

This module runs its own Synapse (the session's shared one must not be restarted), loading a
registration of its own, and our identity server configured for it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from appservice.matrix.registration import new_token
from tests.e2e.conftest import AppserviceSetup, RunningIdentityServer
from tests.e2e.flows import (
    create_room_and_invite,
    membership_history,
    register_everywhere,
    wait_for_member,
    wait_until,
)
from tests.support.synapse import SynapseServer, ensure_synapse_venv, free_port
from tests.support.tls import TestCertificates

pytestmark = pytest.mark.e2e

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def appservice_setup(tmp_path_factory: pytest.TempPathFactory) -> AppserviceSetup:
    """Tokens, a port and a registration for this module's Synapse only."""
    return AppserviceSetup(
        as_token=new_token(),
        hs_token=new_token(),
        port=free_port(),
        registration=tmp_path_factory.mktemp("appservice-restart") / "registration.yaml",
    )


@pytest.fixture(scope="module")
def synapse(
    tmp_path_factory: pytest.TempPathFactory,
    test_certificates: TestCertificates,
    appservice_setup: AppserviceSetup,
) -> Iterator[SynapseServer]:
    """A private Synapse on SQLite (its default here) that this module stops and starts."""
    server = SynapseServer(
        tmp_path_factory.mktemp("synapse-restart"),
        test_certificates,
        venv=ensure_synapse_venv(),
        app_service_config_files=[appservice_setup.registration],
        before_start=appservice_setup.write,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def identity_settings() -> dict[str, Any]:
    return {"invites": {"expiration": {"after": "2s", "check_interval": "500ms"}}}


def synapse_txn_ids(synapse: SynapseServer) -> list[int]:
    """The transaction ids still in Synapse's table (created, not yet acknowledged)."""
    database = synapse.workdir / "homeserver.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute("SELECT txn_id FROM application_services_txns").fetchall()
    return sorted(int(row[0]) for row in rows)


async def test_the_next_expiry_after_a_synapse_restart_is_still_rejected(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    ids = identity_server
    assert ids.server.matrix is not None
    handler = ids.server.matrix._on_transaction
    # (txn id, event ids) of every transaction as it reaches our handler.
    seen: list[tuple[str, list[str]]] = []

    async def recording(txn_id: str, events: list[dict[str, Any]]) -> None:
        seen.append((txn_id, [str(e.get("event_id")) for e in events]))
        await handler(txn_id, events)

    ids.server.matrix._on_transaction = recording
    expired_user = f"@_identity_invite_expired:{synapse.server_name}"

    # Before the restart: an invite expires and the inviteExpired user rejects it.
    _, alice_hs, alice_is = await register_everywhere(synapse, ids, "alice_txn")
    first_room = await create_room_and_invite(synapse, ids, alice_hs, alice_is, "zoe@example.org")
    first_leave = await wait_for_member(synapse, alice_hs, first_room, expired_user, "leave")

    # Wait until Synapse has delivered everything, the leave included (its table empty), so that
    # it restarts its numbering from scratch, as in production after a quiet period.
    async def all_delivered() -> bool:
        if not any(first_leave["event_id"] in events for _, events in seen):
            return False
        return await asyncio.to_thread(synapse_txn_ids, synapse) == []

    await wait_until(all_delivered, "Synapse to have delivered every transaction", within=30)
    before = [txn_id for txn_id, _ in seen]

    await asyncio.to_thread(synapse.stop)
    await asyncio.to_thread(synapse.start)
    count_before = len(seen)

    # After the restart: the next expiry must still be rejected.
    second_room = await create_room_and_invite(synapse, ids, alice_hs, alice_is, "yan@example.org")
    leave = await wait_for_member(synapse, alice_hs, second_room, expired_user, "leave")
    assert leave["content"]["reason"].startswith("The invitation sent to y…@e… by @alice_txn:")
    history = await membership_history(synapse, alice_hs, second_room, expired_user)
    assert [e["content"]["membership"] for e in history] == ["invite", "leave"]

    after = [txn_id for txn_id, _ in seen[count_before:]]
    log.warning(
        "transaction ids before the Synapse restart: %s (none left in its table); after: %s",
        before,
        after,
    )
    # The premise: Synapse reused ids, with other events.
    reused = set(before) & set(after)
    assert reused, (before, after)
    earlier_events = {txn_id: events for txn_id, events in seen[:count_before]}
    assert any(events != earlier_events[txn_id] for txn_id, events in seen[count_before:]
               if txn_id in reused)  # fmt: skip
    # Both sets of events are recorded under the reused id.
    rows = await ids.server.db.fetch(
        "SELECT txn_id, COUNT(*) AS n FROM appservice_transactions GROUP BY txn_id"
    )
    assert any(row["txn_id"] in reused and row["n"] >= 2 for row in rows), [
        (row["txn_id"], row["n"]) for row in rows
    ]
