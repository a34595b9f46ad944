"""Delivering queued onbind notifications: retries, refusals, give-up, crashes, many workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.db.destinations import DestinationStore
from appservice.db.invites import PENDING as INVITE_PENDING
from appservice.db.invites import Invite
from appservice.db.outbox import DELIVERED, FAILED, PENDING, OutboxStore
from appservice.federation.client import FederationClient
from appservice.services.delivery import OnbindDelivery
from tests.api.test_invites import invite, invite_state, outbox_of, stop_background_jobs
from tests.support.api_server import Api

# The API tests' server (both databases) with its fake homeserver, SMTP sink and clock.


@pytest.fixture(autouse=True)
async def _quiet_jobs(api: Api) -> AsyncIterator[None]:
    await stop_background_jobs(api)
    yield


async def queued_onbind(
    api: Api, address: str = "bob@example.com", mxid: str = "@bob:hs.test"
) -> Invite:
    """An invite of ``address`` whose onbind to ``mxid`` is queued (the address got bound)."""
    pending = await invite(api, address)
    await api.add_binding("email", address, mxid)
    assert await api.server.resolution_job.run_once() == 1
    return pending


async def deliver(api: Api) -> int:
    """One run of the server's delivery job."""
    delivered = await api.server.delivery_job.run_once()
    assert isinstance(delivered, int)
    return delivered


@contextlib.asynccontextmanager
async def second_instance(api: Api, clock: FakeClock) -> AsyncIterator[IdentityServer]:
    """Another process on the same database and key file (its jobs not running)."""
    server = IdentityServer(api.server.config, clock=clock)
    await server.open()
    try:
        yield server
    finally:
        await server.stop()


class StuckFederation:
    """A federation client whose requests hang until released (then answer ``answer``)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.answer: tuple[int, Any] = (200, {})

    async def post_json(self, server_name: str, path: str, body: Any) -> tuple[int, Any]:
        self.calls.append(body["invites"][0]["signed"]["token"])
        self.started.set()
        await self.release.wait()
        return self.answer

    def client(self) -> FederationClient:
        return cast(FederationClient, self)


async def test_server_errors_are_retried_with_backoff_until_delivered(
    api: Api, clock: FakeClock
) -> None:
    pending = await queued_onbind(api)
    api.homeserver.onbind_statuses = [500, 500]

    assert await deliver(api) == 0
    [entry] = await outbox_of(api, pending.id)
    assert (entry.state, entry.attempts) == (PENDING, 1)
    assert entry.last_error == "HTTP 500 M_UNKNOWN: planned failure 500"
    assert entry.next_attempt_ts == clock.now_ms() + 10_000  # retry_initial

    clock.advance(9)  # not due yet
    assert await deliver(api) == 0
    assert len(api.homeserver.onbind_bodies) == 1

    clock.advance(1)
    assert await deliver(api) == 0
    [entry] = await outbox_of(api, pending.id)
    assert (entry.state, entry.attempts) == (PENDING, 2)
    assert entry.next_attempt_ts == clock.now_ms() + 20_000  # doubled

    clock.advance(20)
    assert await deliver(api) == 1
    [entry] = await outbox_of(api, pending.id)
    assert (entry.state, entry.attempts) == (DELIVERED, 3)
    assert entry.delivered_ts == clock.now_ms()
    assert entry.last_error is None
    assert len(api.homeserver.onbind_bodies) == 3
    assert len(api.homeserver.onbind_accepted) == 1
    # Every attempt sent the same notification.
    assert all(b == api.homeserver.onbind_accepted[0] for b in api.homeserver.onbind_bodies)

    clock.advance(3600)
    assert await deliver(api) == 0
    assert len(api.homeserver.onbind_bodies) == 3


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
async def test_unavailable_statuses_back_the_homeserver_off(
    api: Api, clock: FakeClock, status: int
) -> None:
    pending = await queued_onbind(api)
    api.homeserver.onbind_statuses = [status]
    assert await deliver(api) == 0
    [entry] = await outbox_of(api, pending.id)
    assert (entry.state, entry.attempts) == (PENDING, 1)
    down = await DestinationStore(api.server.db).get("hs.test")
    assert down is not None and down.failures == 1
    assert down.retry_at == clock.now_ms() + 2_000  # homeserver_retry_initial
    clock.advance(1)
    assert await deliver(api) == 0  # its next probe is not due
    clock.advance(1)
    assert await deliver(api) == 1
    up = await DestinationStore(api.server.db).get("hs.test")
    assert up is not None and (up.failures, up.last_success_ts) == (0, clock.now_ms())


async def test_unreachable_homeserver_is_probed_until_it_is_back(
    api: Api, clock: FakeClock
) -> None:
    pending = await queued_onbind(api)
    await api.homeserver.go_down()
    try:
        assert await deliver(api) == 0  # next probe in 2 s
        clock.advance(2)
        assert await deliver(api) == 0  # next probe in 4 s
        [entry] = await outbox_of(api, pending.id)
        assert (entry.state, entry.attempts) == (PENDING, 2)
        assert entry.last_error is not None
        assert "could not connect" in entry.last_error and "hs.test" in entry.last_error
        assert api.homeserver.onbind_bodies == []
    finally:
        await api.homeserver.come_up()

    clock.advance(3)  # back up, but the next probe is not due yet
    assert await deliver(api) == 0
    clock.advance(1)
    assert await deliver(api) == 1
    [entry] = await outbox_of(api, pending.id)
    assert (entry.state, entry.attempts) == (DELIVERED, 3)
    assert len(api.homeserver.onbind_accepted) == 1


async def test_a_homeserver_down_for_long_gets_one_probe_per_interval_and_drains_at_once(
    api: Api, clock: FakeClock
) -> None:
    for n in range(30):
        await invite(api, f"guest{n}@example.com")
        await api.add_binding("email", f"guest{n}@example.com", f"@guest{n}:hs.test")
    assert await api.server.resolution_job.run_once() == 30
    await api.homeserver.go_down()

    async def attempts() -> int:
        return int(await api.server.db.fetchval("SELECT SUM(attempts) FROM onbind_outbox"))

    try:
        # An hour of outage, the job running every poll_interval (5 s). The run that finds it
        # down has at most `concurrency` (8) requests in flight; after that, one probe at a time.
        for run in range(3600 // 5):
            before = await attempts()
            assert await deliver(api) == 0
            assert await attempts() - before <= (8 if run == 0 else 1)
            clock.advance(5)
        requests_while_down = await attempts()
    finally:
        await api.homeserver.come_up()
    # One probe per homeserver_retry_max (10 s), after the first doublings (2, 4, 8 s).
    assert 3600 // 10 - 5 <= requests_while_down <= 3600 // 10 + 8
    # Back: the next probe is due within homeserver_retry_max, and its success sends the queue.
    clock.advance(10)
    assert await deliver(api) == 30
    assert len(api.homeserver.onbind_accepted) == 30
    assert await DestinationStore(api.server.db).backed_off() == []


async def test_an_internal_server_error_backs_off_only_that_notification(
    api: Api, clock: FakeClock
) -> None:
    first = await queued_onbind(api)
    api.homeserver.onbind_statuses = [500]
    assert await deliver(api) == 0
    second = await queued_onbind(api, "carol@example.com", "@carol:hs.test")
    assert await deliver(api) == 1  # the homeserver answers: not backed off
    assert await DestinationStore(api.server.db).get("hs.test") is None
    [entry] = await outbox_of(api, first.id)
    assert (entry.state, entry.attempts) == (PENDING, 1)
    [entry] = await outbox_of(api, second.id)
    assert entry.state == DELIVERED


async def test_permanent_refusal_fails_the_notification_until_retried(
    api: Api, clock: FakeClock
) -> None:
    pending = await queued_onbind(api)
    api.homeserver.onbind_statuses = [(400, {"errcode": "M_UNKNOWN", "error": "No such room"})]

    assert await deliver(api) == 0
    [entry] = await outbox_of(api, pending.id)
    assert (entry.state, entry.attempts) == (FAILED, 1)
    assert entry.last_error == "HTTP 400 M_UNKNOWN: No such room"
    clock.advance(30 * 86400)
    assert await deliver(api) == 0
    assert len(api.homeserver.onbind_bodies) == 1

    # The operator's retry makes it due again.
    assert await api.server.invites.retry(pending.id) == 1
    assert await deliver(api) == 1
    [entry] = await outbox_of(api, pending.id)
    assert (entry.state, entry.attempts) == (DELIVERED, 2)
    # Nothing left to retry once delivered.
    assert await api.server.invites.retry(pending.id) == 0
    assert await api.server.invites.retry("no-such-invite") == 0


class TestGiveUp:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "invites: {delivery: {retry_initial: 10s, retry_max: 1h, give_up_after: 1m}}"

    async def test_notification_failing_past_the_give_up_age_is_failed(
        self, api: Api, clock: FakeClock
    ) -> None:
        pending = await queued_onbind(api)
        api.homeserver.onbind_statuses = [500] * 10
        assert await deliver(api) == 0  # t0, next at t0+10
        clock.advance(10)
        assert await deliver(api) == 0  # t0+10, next at t0+30
        clock.advance(20)
        assert await deliver(api) == 0  # t0+30: the next try (t0+70) would be too late
        [entry] = await outbox_of(api, pending.id)
        assert (entry.state, entry.attempts) == (FAILED, 3)
        assert (
            entry.last_error == "gave up after 3 attempts: HTTP 500 M_UNKNOWN: planned failure 500"
        )
        clock.advance(3600)
        assert await deliver(api) == 0
        assert len(api.homeserver.onbind_bodies) == 3

        # A retry gets a fresh give-up age.
        api.homeserver.onbind_statuses = []
        assert await api.server.invites.retry(pending.id) == 1
        assert await deliver(api) == 1

    async def test_notifications_to_a_homeserver_down_past_the_give_up_age_are_failed(
        self, api: Api, clock: FakeClock
    ) -> None:
        probed = await queued_onbind(api)
        waiting = await queued_onbind(api, "carol@example.com", "@carol:hs.test")
        await api.homeserver.go_down()
        try:
            for _ in range(60 // 5 + 2):  # the job every 5 s for a little over a minute
                assert await deliver(api) == 0
                clock.advance(5)
        finally:
            await api.homeserver.come_up()
        for pending in (probed, waiting):
            [entry] = await outbox_of(api, pending.id)
            assert entry.state == FAILED
            assert entry.last_error is not None and entry.last_error.startswith("gave up")
        assert api.homeserver.onbind_accepted == []


async def test_notifications_of_a_worker_killed_mid_batch_are_delivered_after_the_lease(
    api: Api, clock: FakeClock
) -> None:
    invites = [await invite(api, f"guest{n}@example.com") for n in range(5)]
    for n in range(5):
        await api.add_binding("email", f"guest{n}@example.com", f"@guest{n}:hs.test")
    assert await api.server.resolution_job.run_once() == 5

    # A worker claims the batch and is killed while its requests are in flight.
    stuck = StuckFederation()
    doomed = OnbindDelivery(
        OutboxStore(api.server.db), stuck.client(), api.server.config.invites.delivery, clock
    )
    task = asyncio.create_task(doomed.deliver_due())
    await asyncio.wait_for(stuck.started.wait(), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    entries = [e for i in invites for e in await outbox_of(api, i.id)]
    assert all(e.state == PENDING and e.claimed_until is not None for e in entries)
    lease_s = (entries[0].claimed_until - clock.now_ms()) // 1000  # type: ignore[operator]
    assert lease_s > 0

    # Its claims hold until the lease ends, then a new process delivers everything.
    assert await deliver(api) == 0
    async with second_instance(api, clock) as restarted:
        clock.advance(lease_s - 1)
        assert await restarted.delivery.deliver_due() == 0
        clock.advance(1)
        assert await restarted.delivery.deliver_due() == 5
    tokens = sorted(b["invites"][0]["signed"]["token"] for b in api.homeserver.onbind_accepted)
    assert tokens == sorted(i.token for i in invites)
    assert len(api.homeserver.onbind_bodies) == 5


async def test_a_worker_that_lost_its_claim_neither_resends_nor_overwrites(
    api: Api, clock: FakeClock, config_yaml: str
) -> None:
    invites = [await invite(api, f"guest{n}@example.com") for n in range(3)]
    for n in range(3):
        await api.add_binding("email", f"guest{n}@example.com", f"@guest{n}:hs.test")
    assert await api.server.resolution_job.run_once() == 3

    # A slow worker (one request at a time) claims all three and hangs on the first.
    stuck = StuckFederation()
    stuck.answer = (400, {"errcode": "M_UNKNOWN", "error": "late refusal"})
    slow_config = api.server.config.invites.delivery
    slow = OnbindDelivery(
        OutboxStore(api.server.db),
        stuck.client(),
        type(slow_config)(**{**slow_config.__dict__, "concurrency": 1}),
        clock,
    )
    task = asyncio.create_task(slow.deliver_due())
    await asyncio.wait_for(stuck.started.wait(), 5)

    # Its lease runs out; the server delivers all three meanwhile.
    clock.advance(24 * 3600)
    assert await deliver(api) == 3
    stuck.release.set()
    assert await asyncio.wait_for(task, 5) == 0

    # The slow worker sent only the request it had started, and its late refusal changed nothing.
    assert len(stuck.calls) == 1
    for pending in invites:
        [entry] = await outbox_of(api, pending.id)
        assert (entry.state, entry.last_error) == (DELIVERED, None)
    assert len(api.homeserver.onbind_accepted) == 3


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_two_instances_deliver_a_thousand_notifications_exactly_once(
    api: Api, clock: FakeClock
) -> None:
    count = 1000
    now = clock.now_ms()
    server = api.server
    invite_rows: list[tuple[Any, ...]] = []
    outbox_rows: list[tuple[Any, ...]] = []
    for n in range(count):
        invite_id, token, mxid = f"inv{n}", secrets.token_urlsafe(32), f"@guest{n}:hs.test"
        invite_rows.append(
            (invite_id, token, "email", f"guest{n}@example.com", "!room:hs.test", "@alice:hs.test",
             "g…@e…", f"key{n}", "{}", now, "bound", mxid, now)
        )  # fmt: skip
        signed = server.keyring.sign({"mxid": mxid, "token": token}, "id.test")
        item = {
            "medium": "email",
            "address": f"guest{n}@example.com",
            "mxid": mxid,
            "room_id": "!room:hs.test",
            "sender": "@alice:hs.test",
            "signed": signed,
        }
        body = {"medium": "email", "address": item["address"], "mxid": mxid, "invites": [item]}
        outbox_rows.append((f"out{n}", invite_id, "hs.test", json.dumps(body), PENDING, now))
    async with server.db.transaction() as conn:
        await conn.executemany(
            "INSERT INTO invites (id, token, medium, address, room_id, sender, display_name,"
            " ephemeral_public_key, details, created_ts, state, resolved_mxid, resolved_ts)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            invite_rows,
        )
        await conn.executemany(
            "INSERT INTO onbind_outbox (id, invite_id, destination, body, state, created_ts,"
            " next_attempt_ts) VALUES ($1, $2, $3, $4, $5, $6, $6)",
            outbox_rows,
        )

    async with second_instance(api, clock) as other:
        first, second = await asyncio.wait_for(
            asyncio.gather(server.delivery.deliver_due(), other.delivery.deliver_due()), 30
        )
    assert first + second == count
    assert first > 0 and second > 0  # both took part
    assert len(api.homeserver.onbind_bodies) == count
    tokens = {b["invites"][0]["signed"]["token"] for b in api.homeserver.onbind_accepted}
    assert len(tokens) == count
    assert await OutboxStore(server.db).count_by_state() == {DELIVERED: count}
    assert INVITE_PENDING not in {(await invite_state(api, "inv0")).state}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_two_instances_probe_a_homeserver_that_is_down_once_per_interval(
    api: Api, clock: FakeClock
) -> None:
    """The backoff of a homeserver is shared: two instances running their delivery jobs at the
    same moments send one probe per interval between them, not one each, and once it is back
    they deliver every notification exactly once."""
    count = 20
    for n in range(count):
        await invite(api, f"guest{n}@example.com")
        await api.add_binding("email", f"guest{n}@example.com", f"@guest{n}:hs.test")
    assert await api.server.resolution_job.run_once() == count
    await api.homeserver.go_down()

    async def attempts() -> int:
        return int(await api.server.db.fetchval("SELECT SUM(attempts) FROM onbind_outbox"))

    async with second_instance(api, clock) as other:

        async def both() -> int:
            runs = await asyncio.wait_for(
                asyncio.gather(api.server.delivery_job.run_once(), other.delivery.deliver_due()),
                30,
            )
            return sum(int(r) for r in runs)

        try:
            # Ten minutes of outage, both jobs every poll_interval (5 s). The first runs find it
            # down with at most `concurrency` (8) requests each in flight; then one probe at a
            # time, between both instances.
            for run in range(600 // 5):
                before = await attempts()
                assert await both() == 0
                assert await attempts() - before <= (16 if run == 0 else 1), run
                clock.advance(5)
            requests_while_down = await attempts()
        finally:
            await api.homeserver.come_up()
        # Doubling from 2 s to homeserver_retry_max (10 s): about one probe per 10 s.
        assert requests_while_down <= 16 + 600 // 10 + 4
        clock.advance(10)
        assert await both() == count
    tokens = [b["invites"][0]["signed"]["token"] for b in api.homeserver.onbind_accepted]
    assert len(tokens) == len(set(tokens)) == count
    assert await OutboxStore(api.server.db).count_by_state() == {DELIVERED: count}
