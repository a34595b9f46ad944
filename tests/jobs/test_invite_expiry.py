"""Invite expiry: invites nobody accepts are resolved, once, to the inviteExpired user."""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from appservice.clock import FakeClock
from appservice.db.invites import BOUND, EXPIRED, PENDING, Invite, InviteStore
from tests.api.test_bind import BIND, lookup, validated_session
from tests.api.test_invites import (
    EPHEMERAL_ISVALID,
    ISVALID,
    bind,
    invite,
    invite_state,
    key_is_valid,
    outbox_of,
    stop_background_jobs,
    verify_ephemeral_signature,
)
from tests.support.api_server import Api

# The API tests' server (both databases) with its fake homeserver, SMTP sink and clock.

EXPIRED_USER = "@_identity_invite_expired:hs.test"
AFTER_S = 3600


@pytest.fixture
def config_yaml() -> str:
    # The inviteExpired user lives on the fake homeserver, so its onbinds can be watched.
    return "{appservice: {homeserver_domain: hs.test}, invites: {expiration: {after: 1h}}}"


@pytest.fixture(autouse=True)
async def _quiet_jobs(api: Api) -> AsyncIterator[None]:
    await stop_background_jobs(api)
    yield


async def ephemeral_key_valid(api: Api, pending: Invite) -> bool:
    return await key_is_valid(
        api, f"https://id.test{EPHEMERAL_ISVALID}", pending.ephemeral_public_key
    )


async def test_unanswered_invite_expires_to_the_invite_expired_user(
    api: Api, clock: FakeClock
) -> None:
    pending = await invite(api)
    assert await ephemeral_key_valid(api, pending)

    clock.advance(AFTER_S)  # exactly the age limit: not yet
    assert await api.server.expiry_job.run_once() == 0
    clock.advance(1)
    assert await api.server.expiry_job.run_once() == 1

    expired = await invite_state(api, pending.id)
    assert (expired.state, expired.resolved_mxid) == (EXPIRED, EXPIRED_USER)
    assert expired.resolved_ts == clock.now_ms()
    [entry] = await outbox_of(api, pending.id)
    assert entry.destination == "hs.test"

    assert await api.server.delivery_job.run_once() == 1
    [body] = api.homeserver.onbind_accepted
    assert body["mxid"] == EXPIRED_USER
    [sent] = body["invites"]
    assert sent["mxid"] == sent["signed"]["mxid"] == EXPIRED_USER
    assert sent["sender"] == pending.sender
    assert sent["room_id"] == pending.room_id
    assert sent["signed"]["token"] == pending.token
    assert (
        (body["medium"], body["address"])
        == (sent["medium"], sent["address"])
        == (
            "email",
            "bob@example.com",
        )
    )
    verify_ephemeral_signature(api, sent["signed"], pending.ephemeral_public_key)

    assert not await ephemeral_key_valid(api, pending)
    server_key = api.server.keyring.current.public_key
    assert await key_is_valid(api, f"https://id.test{ISVALID}", server_key)
    # Once only.
    assert await api.server.expiry_job.run_once() == 0
    assert len(await outbox_of(api, pending.id)) == 1


async def test_invites_younger_than_the_limit_are_untouched(api: Api, clock: FakeClock) -> None:
    old = await invite(api, "old@example.com")
    clock.advance(AFTER_S / 2)
    young = await invite(api, "young@example.com")
    clock.advance(AFTER_S / 2 + 1)

    assert await api.server.expiry_job.run_once() == 1
    assert (await invite_state(api, old.id)).state == EXPIRED
    assert (await invite_state(api, young.id)).state == PENDING
    assert await outbox_of(api, young.id) == []
    assert await ephemeral_key_valid(api, young)

    clock.advance(AFTER_S / 2)
    assert await api.server.expiry_job.run_once() == 1
    assert (await invite_state(api, young.id)).state == EXPIRED


async def test_many_expired_invites_expire_in_one_run(api: Api, clock: FakeClock) -> None:
    invites = [await invite(api, f"guest{n}@example.com") for n in range(12)]
    clock.advance(AFTER_S + 1)
    assert await api.server.expiry_job.run_once() == 12
    assert await api.server.delivery_job.run_once() == 12
    tokens = sorted(b["invites"][0]["signed"]["token"] for b in api.homeserver.onbind_accepted)
    assert tokens == sorted(i.token for i in invites)


class TestExpiryDisabled:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "{appservice: {homeserver_domain: hs.test}, invites: {expiration: {enabled: false}}}"

    async def test_nothing_expires(self, api: Api, clock: FakeClock) -> None:
        pending = await invite(api)
        clock.advance(365 * 86400)
        assert await api.server.expiry_job.run_once() == 0
        assert (await invite_state(api, pending.id)).state == PENDING
        assert await ephemeral_key_valid(api, pending)
        # A later bind still delivers it to the invitee.
        bob = await bind(api, "bob@example.com", "bob")
        assert await api.server.delivery_job.run_once() == 1
        assert api.homeserver.onbind_accepted[0]["mxid"] == bob


class TestResolveTo:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "{invites: {expiration: {after: 1h, resolve_to: '@withdrawn:hs.test'}}}"

    async def test_expired_invites_go_to_the_configured_user(
        self, api: Api, clock: FakeClock
    ) -> None:
        pending = await invite(api)
        clock.advance(AFTER_S + 1)
        assert await api.server.expiry_job.run_once() == 1
        assert await api.server.delivery_job.run_once() == 1
        assert api.homeserver.onbind_accepted[0]["mxid"] == "@withdrawn:hs.test"
        assert (await invite_state(api, pending.id)).resolved_mxid == "@withdrawn:hs.test"


# Resolved exactly once, whichever comes first.


async def prepare_bind(api: Api, address: str, localpart: str) -> tuple[str, str, dict[str, str]]:
    """A user with a validated session for ``address``: (mxid, IS token, bind body)."""
    mxid, token = await api.register(localpart)
    sid = await validated_session(api, token, address, secret=f"secret-{localpart}")
    return mxid, token, {"sid": sid, "client_secret": f"secret-{localpart}", "mxid": mxid}


async def assert_resolved_once(api: Api, pending: Invite) -> Invite:
    """The invite left "pending" once, and its one onbind goes to the user it resolved to."""
    resolved = await invite_state(api, pending.id)
    assert resolved.state in (BOUND, EXPIRED)
    [entry] = await outbox_of(api, pending.id)
    body = json.loads(entry.body)
    assert body["mxid"] == body["invites"][0]["signed"]["mxid"] == resolved.resolved_mxid
    return resolved


async def test_bind_after_expiry_binds_but_does_not_resolve_again(
    api: Api, clock: FakeClock
) -> None:
    pending = await invite(api)
    clock.advance(AFTER_S + 1)
    assert await api.server.expiry_job.run_once() == 1
    bob = await bind(api, "bob@example.com", "bob")
    resolved = await assert_resolved_once(api, pending)
    assert (resolved.state, resolved.resolved_mxid) == (EXPIRED, EXPIRED_USER)
    _, token = await api.register()
    assert await lookup(api, token, "bob@example.com") == bob


async def test_expiry_after_bind_leaves_the_bound_invite_alone(api: Api, clock: FakeClock) -> None:
    pending = await invite(api)
    bob = await bind(api, "bob@example.com", "bob")
    clock.advance(AFTER_S + 1)
    assert await api.server.expiry_job.run_once() == 0
    resolved = await assert_resolved_once(api, pending)
    assert (resolved.state, resolved.resolved_mxid) == (BOUND, bob)


async def test_bind_and_expiry_at_the_same_moment_resolve_each_invite_once(
    api: Api, clock: FakeClock
) -> None:
    rounds = 6
    # One invite due per round: invite n is created 10 s after invite n - 1.
    invites: list[Invite] = []
    for n in range(rounds):
        invites.append(await invite(api, f"guest{n}@example.com"))
        clock.advance(10)
    binds = [await prepare_bind(api, f"guest{n}@example.com", f"guest{n}") for n in range(rounds)]
    clock.advance(AFTER_S - 10 * rounds + 1)  # invite 0 is due
    for n, (_, token, body) in enumerate(binds):
        bind_request = api.request("POST", BIND, token=token, json=body)
        if n % 2:  # alternate which one starts first
            (status, answer), expired = await asyncio.gather(
                bind_request, api.server.invites.expire_due()
            )
        else:
            expired, (status, answer) = await asyncio.gather(
                api.server.invites.expire_due(), bind_request
            )
        assert status == 200, answer
        resolved = await assert_resolved_once(api, invites[n])
        assert expired == (resolved.state == EXPIRED)
        clock.advance(10)  # the next invite is due
    assert await api.server.delivery_job.run_once() == rounds
    tokens = sorted(b["invites"][0]["signed"]["token"] for b in api.homeserver.onbind_accepted)
    assert tokens == sorted(i.token for i in invites)


async def test_expiry_committing_inside_a_bind_transaction_resolves_once(
    api: Api, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bind has read the pending invite when the expiry resolves it and commits."""
    pending = await invite(api)
    _, token, body = await prepare_bind(api, "bob@example.com", "bob")
    clock.advance(AFTER_S + 1)
    expiry: list[asyncio.Task[int]] = []
    pending_for = InviteStore.pending_for

    async def pending_for_then_expire(self: InviteStore, medium: str, address: str) -> Any:
        found = await pending_for(self, medium, address)
        # A fresh context: the expiry must not share the bind's connection.
        task = asyncio.create_task(api.server.invites.expire_due(), context=contextvars.Context())
        expiry.append(task)
        if api.server.db.is_postgres:
            assert await asyncio.wait_for(asyncio.shield(task), 5) == 1  # committed meanwhile
        # (SQLite has one writer: the expiry waits for the bind to commit.)
        return found

    monkeypatch.setattr(InviteStore, "pending_for", pending_for_then_expire)
    status, answer = await api.request("POST", BIND, token=token, json=body)
    assert status == 200, answer
    [task] = expiry
    expired = await asyncio.wait_for(task, 5)
    resolved = await assert_resolved_once(api, pending)
    assert expired == (resolved.state == EXPIRED)
    if api.server.db.is_postgres:
        assert resolved.state == EXPIRED


async def test_expiry_waiting_for_a_bind_transaction_resolves_once(
    api: Api, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bind has resolved the invite and not committed yet when the expiry tries to."""
    pending = await invite(api)
    bob, token, body = await prepare_bind(api, "bob@example.com", "bob")
    clock.advance(AFTER_S + 1)
    expiry: list[asyncio.Task[int]] = []
    resolve = InviteStore.resolve

    async def resolve_then_expire(
        self: InviteStore, invite_id: str, state: str, mxid: str, now_ms: int
    ) -> bool:
        done = await resolve(self, invite_id, state, mxid, now_ms)
        if state == BOUND:
            task = asyncio.create_task(
                api.server.invites.expire_due(), context=contextvars.Context()
            )
            expiry.append(task)
            if api.server.db.is_postgres:
                await wait_for_a_lock_wait(api)  # the expiry's UPDATE waits for our row lock
            else:
                for _ in range(10):
                    await asyncio.sleep(0)  # it waits for the one connection
            assert not task.done()
        return done

    monkeypatch.setattr(InviteStore, "resolve", resolve_then_expire)
    status, answer = await api.request("POST", BIND, token=token, json=body)
    assert status == 200, answer
    [task] = expiry
    assert await asyncio.wait_for(task, 5) == 0
    resolved = await assert_resolved_once(api, pending)
    assert (resolved.state, resolved.resolved_mxid) == (BOUND, bob)


async def wait_for_a_lock_wait(api: Api) -> None:
    """Wait (at most 5 s) until a session of this database waits for a row lock."""
    admin = await asyncpg.connect(api.server.config.database.url)
    try:
        for _ in range(500):
            if await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("nobody waited for a lock within 5 s")
    finally:
        await admin.close()


async def test_concurrent_expiry_runs_resolve_each_invite_once(api: Api, clock: FakeClock) -> None:
    invites = [await invite(api, f"guest{n}@example.com") for n in range(6)]
    clock.advance(AFTER_S + 1)
    counts = await asyncio.gather(
        api.server.invites.expire_due(),
        api.server.invites.expire_due(),
        api.server.invites.expire(invites[0].id),
    )
    assert sum(counts) == 6
    for pending in invites:
        await assert_resolved_once(api, pending)
    assert not await api.server.invites.expire(invites[1].id)
