"""Onbind accepted at most once: the ephemeral key its `signed` block is signed with is valid,
once the invite is resolved, only while its onbind is in flight and for
``delivery.acceptance_window`` after the first check (tests/e2e/test_onbind_replay_with_synapse.py
shows what Synapse makes of it)."""

from __future__ import annotations

import asyncio
import json

import pytest

from appservice.clock import FakeClock
from appservice.db.invites import Invite
from appservice.db.outbox import OutboxStore
from tests.api.test_invites import (
    EPHEMERAL_ISVALID,
    bind,
    invite,
    key_is_valid,
    outbox_of,
    stop_background_jobs,
    verify_server_signature,
)
from tests.support.api_server import Api

WINDOW_MS = 2000  # the default delivery.acceptance_window


@pytest.fixture(autouse=True)
async def _quiet_jobs(api: Api) -> None:
    # Nothing is delivered or claimed but by the tests.
    await stop_background_jobs(api)


async def checked(api: Api, pending: Invite) -> bool:
    """What the homeserver hears from the invite's key_validity_url."""
    return await key_is_valid(
        api, f"https://id.test{EPHEMERAL_ISVALID}", pending.ephemeral_public_key
    )


async def claim(api: Api, clock: FakeClock) -> None:
    """A worker claims the due onbind (it is in flight from now on)."""
    [_] = await OutboxStore(api.server.db).claim_due("worker", clock.now_ms(), 10_000, 10)


async def test_the_key_is_valid_for_the_window_after_the_first_check_in_flight(
    api: Api, clock: FakeClock
) -> None:
    pending = await invite(api, "bob@example.com")
    assert await checked(api, pending)  # pending: valid (the invite link's join uses it)
    await bind(api, "bob@example.com", "bob")
    await claim(api, clock)
    assert await checked(api, pending)  # the homeserver's check during the exchange
    clock.advance(WINDOW_MS / 1000 - 0.001)
    assert await checked(api, pending)  # a check again within the window (Synapse retries)
    clock.advance(0.001)
    assert not await checked(api, pending)  # a repeat of the onbind later: refused
    clock.advance(3600)
    assert not await checked(api, pending)


async def test_a_check_before_delivery_started_neither_passes_nor_opens_the_window(
    api: Api, clock: FakeClock
) -> None:
    pending = await invite(api, "bob@example.com")
    await bind(api, "bob@example.com", "bob")
    # Resolved, not yet claimed by a worker: nobody is exchanging it.
    assert not await checked(api, pending)
    clock.advance(60)
    await claim(api, clock)
    assert await checked(api, pending)


async def test_a_delivered_onbind_revokes_the_key_at_once(api: Api, clock: FakeClock) -> None:
    pending = await invite(api, "bob@example.com")
    await bind(api, "bob@example.com", "bob")
    await claim(api, clock)
    assert await checked(api, pending)
    [entry] = await outbox_of(api, pending.id)
    assert await OutboxStore(api.server.db).mark_delivered(
        entry.id, 1, clock.now_ms(), claim="worker"
    )
    assert not await checked(api, pending)


async def test_concurrent_checks_share_the_first_checks_window(api: Api, clock: FakeClock) -> None:
    pending = await invite(api, "bob@example.com")
    await bind(api, "bob@example.com", "bob")
    await claim(api, clock)
    answers = await asyncio.gather(*(checked(api, pending) for _ in range(100)))
    assert all(answers)
    clock.advance(WINDOW_MS / 1000)
    answers = await asyncio.gather(*(checked(api, pending) for _ in range(100)))
    assert not any(answers)


async def test_an_operators_retry_reopens_the_window(api: Api, clock: FakeClock) -> None:
    pending = await invite(api, "bob@example.com")
    await bind(api, "bob@example.com", "bob")
    await claim(api, clock)
    assert await checked(api, pending)  # checked, then the homeserver failed
    clock.advance(60)
    [entry] = await outbox_of(api, pending.id)
    await OutboxStore(api.server.db).mark_failed(entry.id, 1, "HTTP 403", claim="worker")
    assert not await checked(api, pending)

    assert await api.server.invites.retry(pending.id) == 1  # `invites retry`
    await claim(api, clock)
    assert await checked(api, pending)
    clock.advance(WINDOW_MS / 1000)
    assert not await checked(api, pending)


async def test_an_invite_without_its_private_key_is_signed_with_the_long_term_key(
    api: Api,
) -> None:
    pending = await invite(api, "bob@example.com")
    # As invites stored before the ephemeral private key was kept (migration 0012).
    await api.server.db.execute(
        "UPDATE invites SET ephemeral_private_key = NULL WHERE id = $1", pending.id
    )
    await bind(api, "bob@example.com", "bob")
    [entry] = await outbox_of(api, pending.id)
    verify_server_signature(api, json.loads(entry.body)["invites"][0]["signed"])
