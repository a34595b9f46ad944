"""The appservice with a real Synapse that loads our generated registration."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import RunningIdentityServer
from tests.e2e.flows import (
    create_room_and_invite,
    membership_history,
    register_everywhere,
    wait_for_member,
    wait_until,
)
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.e2e


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics scrape, keyed by name and labels."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_users_are_registered_and_the_ping_round_trip_shows_in_health(
    synapse: SynapseServer, identity_server: RunningIdentityServer
) -> None:
    async def pinged() -> bool:
        _, body = await identity_server.request("GET", "/health")
        return bool(body["appservice"].get("ping") == "ok")

    await wait_until(pinged, "the appservice ping")
    _, body = await identity_server.request("GET", "/health")
    assert body["appservice"]["enabled"] is True
    assert isinstance(body["appservice"]["duration_ms"], int)
    # Synapse knows the inviteExpired user now (registered through the appservice API).
    expired_user = f"@_identity_invite_expired:{synapse.server_name}"
    status, profile = await synapse.client_request(
        "GET", f"/_matrix/client/v3/profile/{expired_user}", None
    )
    assert status == 200, profile


class TestRejection:
    @pytest.fixture
    def identity_settings(self) -> dict[str, Any]:
        return {"invites": {"expiration": {"after": "2s", "check_interval": "500ms"}}}

    async def test_alice_sees_the_expired_invite_withdrawn_with_a_reason(
        self, synapse: SynapseServer, identity_server: RunningIdentityServer
    ) -> None:
        ids = identity_server
        host, port = await ids.server.serve_metrics(port=0)
        metrics_url = f"http://{host}:{port}/metrics"
        _, alice_hs, alice_is = await register_everywhere(synapse, ids, "alice_as")
        room_id = await create_room_and_invite(synapse, ids, alice_hs, alice_is, "zoe@example.org")
        expired_user = f"@_identity_invite_expired:{synapse.server_name}"
        await wait_for_member(synapse, alice_hs, room_id, expired_user, "leave")

        # The same flow, as /metrics tells it (a fresh server: every counter started at 0).
        def value(samples: dict[Any, float], name: str, **labels: str) -> float:
            return samples.get((f"matrix_identity_{name}", frozenset(labels.items())), 0.0)

        async def rejected() -> bool:
            samples = await scrape(metrics_url)
            return value(samples, "expired_invites_rejected_total") == 1

        await wait_until(rejected, "the rejection to be counted")
        samples = await scrape(metrics_url)
        assert value(samples, "store_invites_total") == 1
        assert value(samples, "mails_sent_total", template="invite_email") == 1
        assert value(samples, "invites", state="expired") == 1
        assert value(samples, "invites", state="pending") == 0
        assert value(samples, "appservice_transactions_total", result="recorded") >= 1
        assert value(samples, "appservice_transactions_total", result="error") == 0
        transactions = [
            v
            for (name, labels), v in samples.items()
            if name == "matrix_identity_http_requests_total"
            and ("listener", "appservice") in labels
            and ("route", "/_matrix/app/v1/transactions/{transaction_id}") in labels
        ]
        assert sum(transactions) >= 1

        status, sync = await synapse.client_request("GET", "/_matrix/client/v3/sync", alice_hs)
        assert status == 200, sync
        timeline = sync["rooms"]["join"][room_id]["timeline"]["events"]
        leaves = [
            e for e in timeline
            if e["type"] == "m.room.member" and e["state_key"] == expired_user
            and e["content"]["membership"] == "leave"
        ]  # fmt: skip
        assert len(leaves) == 1
        assert leaves[0]["content"]["reason"].startswith(
            "The invitation sent to z…@e… by @alice_as:"
        )

    async def test_a_transaction_retried_after_a_restart_is_processed_once(
        self, synapse: SynapseServer, identity_server: RunningIdentityServer
    ) -> None:
        ids = identity_server
        handler = ids.server.expired_invites.handle_transaction
        calls: list[str] = []

        async def record_then_crash(txn_id: str, events: list[dict[str, Any]]) -> None:
            # Everything is recorded, but the process "dies" before acknowledging.
            calls.append(txn_id)
            await handler(txn_id, events)
            raise RuntimeError("simulated crash before the 200")

        ids.server.expired_invites.handle_transaction = record_then_crash  # type: ignore[method-assign]
        assert ids.server.matrix is not None
        ids.server.matrix._on_transaction = record_then_crash

        _, alice_hs, alice_is = await register_everywhere(synapse, ids, "alice_rs")
        room_id = await create_room_and_invite(synapse, ids, alice_hs, alice_is, "yan@example.org")

        async def crashed_once() -> bool:
            return bool(calls)

        await wait_until(crashed_once, "the first transaction")
        await ids.restart()  # a fresh process: nothing in memory, only the database
        assert ids.server.matrix is not None
        new_handler = ids.server.matrix._on_transaction
        seen_after_restart: list[str] = []

        async def recording(txn_id: str, events: list[dict[str, Any]]) -> None:
            seen_after_restart.append(txn_id)
            await new_handler(txn_id, events)

        ids.server.matrix._on_transaction = recording

        async def retried() -> bool:
            return calls[0] in seen_after_restart

        # Synapse keeps retrying the unacknowledged transaction (backing off) until it gets 200.
        await wait_until(retried, "Synapse's retry of the transaction", within=40)
        expired_user = f"@_identity_invite_expired:{synapse.server_name}"
        await wait_for_member(synapse, alice_hs, room_id, expired_user, "leave")

        # The new process acknowledged it without doing anything twice.
        async def actions() -> list[tuple[str, str]]:
            rows = await ids.server.db.fetch(
                "SELECT kind, state FROM appservice_actions WHERE room_id = $1", room_id
            )
            return [(row["kind"], row["state"]) for row in rows]

        async def done() -> bool:
            return await actions() == [("reject", "done")]

        await wait_until(done, "the rejection to be recorded as done")
        history = await membership_history(synapse, alice_hs, room_id, expired_user)
        assert [e["content"]["membership"] for e in history] == ["invite", "leave"]
