"""Performing the recorded room actions through the homeserver: reject with a reason, notice
mode, retries with backoff, giving up; registering the users and pinging at start."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from mautrix.types import UserID

from appservice.clock import FakeClock
from appservice.db.appservice import DONE, FAILED, LEAVE, PENDING, REJECT, RoomAction
from appservice.matrix.actions import GIVE_UP_AFTER_S, RETRY_INITIAL_S, RoomActionWorker
from tests.api.test_invites import ROOM
from tests.matrix.conftest import (
    EXPIRED_USER,
    HomeserverSide,
    actions_of,
    member_event,
)
from tests.support.api_server import Api
from tests.support.client_api import FakeClientApi, no_such_room, not_in_room, not_invited

BOT = "@_identity_bot:hs.test"
NOTICE_MODE = pytest.mark.parametrize("appservice_extra", [{"post_notice": True}])


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``await condition()`` every 10 ms until it holds, at most 5 s."""
    for _ in range(500):
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def ping_is(api: Api, value: str) -> Callable[[], Awaitable[bool]]:
    """Whether the server's appservice status says the homeserver ping is ``value``."""

    async def check() -> bool:
        return api.server.appservice_status.get("ping") == value

    return check


async def record_invite(
    side: HomeserverSide, room_id: str = ROOM, txn_id: str | None = None
) -> dict[str, Any]:
    """The homeserver pushes an invite of the inviteExpired user; returns the event."""
    event = member_event(EXPIRED_USER, "invite", room_id=room_id)
    assert await side.transaction(txn_id or f"txn-{room_id}", [event]) == (200, {})
    return event


async def perform(api: Api) -> int:
    """One run of the server's action job."""
    assert api.server.actions_job is not None
    done = await api.server.actions_job.run_once()
    assert isinstance(done, int)
    return done


async def the_action(api: Api) -> RoomAction:
    [action] = await actions_of(api.server)
    return action


def assert_authenticated(fake: FakeClientApi) -> None:
    """Every request the appservice made carried the as_token."""
    assert fake.calls
    assert [c for c in fake.calls if c.status == 401] == []


# Rejecting.


async def test_expired_invite_is_rejected_with_leave_as_the_expired_user(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, clock: FakeClock
) -> None:
    await record_invite(homeserver_side)
    action = await the_action(quiet)
    assert action.kind == REJECT
    before = len(client_api.calls)

    assert await perform(quiet) == 1
    [leave] = client_api.calls_of("leave")
    assert (leave.status, leave.room_id, leave.user_id) == (200, ROOM, EXPIRED_USER)
    assert leave.body == {"reason": action.reason}
    assert client_api.membership_of(ROOM, EXPIRED_USER) == "leave"
    assert EXPIRED_USER in client_api.registered  # registered before acting as it
    assert client_api.calls_of("join") == client_api.calls_of("send") == []
    assert_authenticated(client_api)
    done = await the_action(quiet)
    assert (done.state, done.attempts, done.last_error) == (DONE, 1, None)

    # Done means done.
    clock.advance(3600)
    calls = len(client_api.calls)
    assert calls > before
    assert await perform(quiet) == 0
    assert len(client_api.calls) == calls


async def test_a_join_of_the_expired_user_is_left_without_a_reason(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi
) -> None:
    joined = member_event(EXPIRED_USER, "join", sender=EXPIRED_USER)
    assert await homeserver_side.transaction("j1", [joined]) == (200, {})
    assert (await the_action(quiet)).kind == LEAVE
    assert await perform(quiet) == 1
    [leave] = client_api.calls_of("leave")
    assert (leave.user_id, leave.body) == (EXPIRED_USER, {})


async def test_server_errors_are_retried_with_backoff_then_done_once(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, clock: FakeClock
) -> None:
    await record_invite(homeserver_side)
    client_api.fail_next("leave", 500, 502)

    assert await perform(quiet) == 0
    failed = await the_action(quiet)
    assert (failed.state, failed.attempts) == (PENDING, 1)
    assert failed.last_error is not None and "500" in failed.last_error
    # Not before its time.
    assert await perform(quiet) == 0
    assert len(client_api.calls_of("leave")) == 1

    clock.advance(RETRY_INITIAL_S)
    assert await perform(quiet) == 0
    assert (await the_action(quiet)).attempts == 2
    clock.advance(RETRY_INITIAL_S)  # the delay doubled
    assert await perform(quiet) == 0
    assert len(client_api.calls_of("leave")) == 2
    clock.advance(RETRY_INITIAL_S)
    assert await perform(quiet) == 1

    assert [c.status for c in client_api.calls_of("leave")] == [500, 502, 200]
    assert [m.membership for m in client_api.memberships] == ["leave"]
    done = await the_action(quiet)
    assert (done.state, done.attempts) == (DONE, 3)
    clock.advance(3600)
    assert await perform(quiet) == 0
    assert len(client_api.calls_of("leave")) == 3


@pytest.mark.parametrize(
    "refusal",
    [not_invited(), not_in_room(EXPIRED_USER, ROOM), no_such_room()],
    ids=["not-invited", "not-in-room", "no-such-room"],
)
async def test_nothing_to_do_when_the_homeserver_says_the_invite_is_gone(
    quiet: Api,
    homeserver_side: HomeserverSide,
    client_api: FakeClientApi,
    clock: FakeClock,
    refusal: tuple[int, Any],
) -> None:
    await record_invite(homeserver_side)
    client_api.fail_next("leave", refusal)
    assert await perform(quiet) == 1
    done = await the_action(quiet)
    assert (done.state, done.attempts) == (DONE, 1)
    clock.advance(3600)
    assert await perform(quiet) == 0
    assert len(client_api.calls_of("leave")) == 1


async def test_an_unreachable_homeserver_is_retried(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, clock: FakeClock
) -> None:
    await record_invite(homeserver_side)
    await client_api.go_down()
    assert await perform(quiet) == 0
    failed = await the_action(quiet)
    assert (failed.state, failed.attempts) == (PENDING, 1)
    assert failed.last_error is not None and "Connection" in failed.last_error

    await client_api.come_up()
    clock.advance(RETRY_INITIAL_S)
    assert await perform(quiet) == 1
    assert client_api.membership_of(ROOM, EXPIRED_USER) == "leave"


async def test_it_gives_up_after_three_days(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, clock: FakeClock
) -> None:
    await record_invite(homeserver_side)
    await client_api.go_down()
    assert await perform(quiet) == 0
    clock.advance(GIVE_UP_AFTER_S)
    assert await perform(quiet) == 0
    failed = await the_action(quiet)
    assert (failed.state, failed.attempts) == (FAILED, 2)
    assert failed.last_error is not None and failed.last_error.startswith("gave up")

    await client_api.come_up()
    clock.advance(3600)
    assert await perform(quiet) == 0
    assert client_api.calls_of("leave") == []


async def test_one_failing_action_does_not_hold_up_the_others(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, clock: FakeClock
) -> None:
    for n in range(3):
        await record_invite(homeserver_side, f"!room{n}:hs.test")
        clock.advance(1)  # recorded in this order
    client_api.fail_next("leave", 500)
    assert await perform(quiet) == 2
    states = {a.room_id: a.state for a in await actions_of(quiet.server)}
    assert states == {"!room0:hs.test": PENDING, "!room1:hs.test": DONE, "!room2:hs.test": DONE}


async def test_concurrent_workers_perform_each_action_once(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, clock: FakeClock
) -> None:
    for n in range(6):
        await record_invite(homeserver_side, f"!room{n}:hs.test")
    matrix = quiet.server.matrix
    assert matrix is not None
    workers = [
        RoomActionWorker(
            quiet.server.appservice_store,
            lambda user_id: matrix.intent.user(UserID(user_id)),
            clock,
        )
        for _ in range(3)
    ]
    done = await asyncio.gather(*(w.perform_due() for w in workers))
    assert sum(done) == 6
    assert sorted(c.room_id or "" for c in client_api.calls_of("leave")) == [
        f"!room{n}:hs.test" for n in range(6)
    ]


# Notice mode.


@NOTICE_MODE
async def test_notice_mode_joins_posts_the_reason_and_leaves(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi
) -> None:
    await record_invite(homeserver_side)
    action = await the_action(quiet)
    assert await perform(quiet) == 1

    [message] = client_api.messages
    assert (message.room_id, message.user_id, message.event_type) == (
        ROOM,
        EXPIRED_USER,
        "m.room.message",
    )
    assert message.content["msgtype"] == "m.notice"
    assert message.content["body"] == action.reason
    assert [(m.membership, m.user_id) for m in client_api.memberships] == [
        ("join", EXPIRED_USER),
        ("leave", EXPIRED_USER),
    ]
    kinds = [c.kind for c in client_api.calls if c.kind in ("join", "send", "leave")]
    assert kinds == ["join", "send", "leave"]
    assert_authenticated(client_api)
    assert (await the_action(quiet)).state == DONE


@NOTICE_MODE
async def test_notice_mode_retries_from_the_start_after_a_failure(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, clock: FakeClock
) -> None:
    await record_invite(homeserver_side)
    client_api.fail_next("send", 500)
    assert await perform(quiet) == 0
    clock.advance(RETRY_INITIAL_S)
    assert await perform(quiet) == 1
    assert len(client_api.messages) == 1
    assert client_api.membership_of(ROOM, EXPIRED_USER) == "leave"


MAY_NOT_POST = {
    # The homeserver refuses the message.
    "send": (403, {"errcode": "M_FORBIDDEN", "error": "You don't have permission to post"}),
    # mautrix reads the power levels first and does not even try.
    "state": (200, {"users": {}, "users_default": 0, "events_default": 50}),
}


@NOTICE_MODE
@pytest.mark.parametrize("refused", sorted(MAY_NOT_POST))
async def test_notice_mode_still_leaves_with_the_reason_when_it_may_not_post(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, refused: str
) -> None:
    await record_invite(homeserver_side)
    action = await the_action(quiet)
    client_api.fail_next(refused, MAY_NOT_POST[refused])
    assert await perform(quiet) == 1
    assert client_api.messages == []
    # It must not stay in the room; the reason is given with the leave instead.
    assert client_api.membership_of(ROOM, EXPIRED_USER) == "leave"
    assert client_api.memberships[-1].reason == action.reason
    assert (await the_action(quiet)).state == DONE


@NOTICE_MODE
async def test_notice_mode_retries_a_malformed_answer(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, clock: FakeClock
) -> None:
    await record_invite(homeserver_side)
    client_api.fail_next("join", (200, {"not": "a join answer"}))
    assert await perform(quiet) == 0
    failed = await the_action(quiet)
    assert (failed.state, failed.attempts) == (PENDING, 1)
    clock.advance(RETRY_INITIAL_S)
    assert await perform(quiet) == 1
    assert client_api.membership_of(ROOM, EXPIRED_USER) == "leave"


# The running server: registration, ping, background work.


async def test_server_registers_its_users_and_pings_the_homeserver_at_start(
    api: Api, client_api: FakeClientApi
) -> None:
    await wait_until(ping_is(api, "ok"), "a successful ping")
    status, body = await api.request("GET", "/health")
    assert status == 200
    assert body["appservice"]["enabled"] is True
    assert body["appservice"]["ping"] == "ok"
    assert isinstance(body["appservice"]["duration_ms"], int)
    assert "error" not in body["appservice"]

    assert {BOT, EXPIRED_USER} <= client_api.registered
    registrations = client_api.calls_of("register")
    assert {c.body["username"] for c in registrations} == {
        "_identity_bot",
        "_identity_invite_expired",
    }
    assert all(c.body["inhibit_login"] is True for c in registrations)
    [ping] = client_api.calls_of("ping")
    assert ping.status == 200
    # The homeserver's half of the round trip reached the private listener with the hs_token.
    assert client_api.ping_answers == [(200, {})]
    assert_authenticated(client_api)


@pytest.mark.parametrize("homeserver_down", [True])
async def test_registration_is_retried_while_the_homeserver_is_down(
    api: Api, client_api: FakeClientApi
) -> None:
    await wait_until(ping_is(api, "failed"), "a failed ping")
    status, body = await api.request("GET", "/health")
    assert status == 200  # the identity service itself is fine
    assert body["appservice"]["ping"] == "failed"
    assert body["appservice"]["error"]
    assert client_api.calls == []

    await client_api.come_up()
    assert api.server.registration_job is not None
    api.server.registration_job.wake()
    await wait_until(ping_is(api, "ok"), "a successful ping")
    _, body = await api.request("GET", "/health")
    assert body["appservice"]["ping"] == "ok" and "error" not in body["appservice"]
    assert EXPIRED_USER in client_api.registered


async def test_a_recorded_rejection_is_performed_in_the_background(
    api: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi
) -> None:
    event = await record_invite(homeserver_side)
    # Woken by the transaction, not by its next poll (5 s later).
    await client_api.wait_for(
        lambda: client_api.membership_of(ROOM, EXPIRED_USER) == "leave", within=4
    )

    async def done() -> bool:
        return (await the_action(api)).state == DONE

    await wait_until(done, "the action to be marked done")
    assert (await the_action(api)).event_id == event["event_id"]


class _HangingIntent:
    """An intent whose first leave waits until released (an action in flight at the stop)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.left: list[str] = []

    async def ensure_registered(self) -> None:
        return None

    async def leave_room(self, room_id: str, reason: str | None = None) -> None:
        self.started.set()
        await self.release.wait()
        self.left.append(room_id)


async def test_a_stopping_worker_finishes_what_it_started_and_gives_back_the_rest(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, clock: FakeClock
) -> None:
    for n in range(6):
        await record_invite(homeserver_side, f"!room{n}:hs.test")
        clock.advance(1)
    intent = _HangingIntent()
    stopping = RoomActionWorker(quiet.server.appservice_store, lambda _user: intent, clock)
    run = asyncio.create_task(stopping.perform_due())
    await asyncio.wait_for(intent.started.wait(), 5)
    store = quiet.server.appservice_store
    assert await store.claimed_count() == 6  # the whole batch is claimed

    stopping.stop_claiming()
    intent.release.set()
    assert await asyncio.wait_for(run, 5) == 1  # the one in flight finished
    assert await stopping.release_claims() == 5
    assert await store.claimed_count() == 0
    assert intent.left == ["!room0:hs.test"]

    # Another instance performs the rest at once: no lease to wait for.
    assert await perform(quiet) == 5
    states = sorted(a.state for a in await actions_of(quiet.server))
    assert states == [DONE] * 6
