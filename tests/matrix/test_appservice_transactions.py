"""The private appservice listener: hs_token auth, transactions recorded once and durably."""

from __future__ import annotations

import asyncio
import datetime
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.db.appservice import LEAVE, PENDING, REJECT
from appservice.db.invites import InviteStore
from appservice.services.expired_invites import TRANSACTION_MEMORY_S, human_duration
from tests.api.test_invites import ROOM, invite
from tests.matrix.conftest import (
    BOT,
    EXPIRED_USER,
    GENERIC_REASON,
    TXN,
    HomeserverSide,
    actions_of,
    appservice_settings,
    member_event,
    message_event,
)
from tests.support.api_server import Api, make_config
from tests.support.client_api import FakeClientApi


async def test_transaction_with_the_hs_token_is_acknowledged(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    assert await homeserver_side.transaction("t1", []) == (200, {})
    legacy = await homeserver_side.request("PUT", "/transactions/t2", json={"events": []})
    assert legacy == (200, {})


ENDPOINTS: list[tuple[str, str, Any]] = [
    ("PUT", f"{TXN}/auth1", {"events": []}),
    ("PUT", "/transactions/auth1", {"events": []}),
    ("POST", "/_matrix/app/v1/ping", {}),
    ("GET", "/_matrix/app/v1/users/@_identity_bot:hs.test", None),
    ("GET", "/users/@_identity_bot:hs.test", None),
    ("GET", "/_matrix/app/v1/rooms/%23alias:hs.test", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
async def test_homeserver_endpoints_need_the_hs_token(
    quiet: Api, homeserver_side: HomeserverSide, method: str, path: str, body: Any
) -> None:
    status, answer = await homeserver_side.request(method, path, token=None, json=body)
    assert (status, answer["errcode"]) == (401, "M_UNAUTHORIZED")
    for wrong in ("wrong", "", homeserver_side.hs_token + "x", homeserver_side.hs_token[:-1]):
        status, answer = await homeserver_side.request(method, path, token=wrong, json=body)
        assert (status, answer["errcode"]) == (403, "M_FORBIDDEN"), wrong
    # Another scheme with the right token is not a bearer token.
    async with homeserver_side.session.request(
        method,
        homeserver_side.base_url + path,
        headers={"Authorization": f"Basic {homeserver_side.hs_token}"},
        json=body,
    ) as resp:
        assert resp.status == 403
    # Refused requests were not processed: the transaction id is still unused.
    assert await homeserver_side.transaction("auth1", [member_event(EXPIRED_USER, "invite")]) == (
        200,
        {},
    )
    assert len(await actions_of(quiet.server)) == 1


async def test_ping_and_user_query_answer_with_the_token(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    assert await homeserver_side.request(
        "POST", "/_matrix/app/v1/ping", json={"transaction_id": "p1"}
    ) == (200, {})
    status, _ = await homeserver_side.request("GET", "/_matrix/app/v1/users/@nobody:hs.test")
    assert status == 404


async def test_query_string_token_is_refused_without_legacy_auth(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    hs_token = homeserver_side.hs_token
    status, answer = await homeserver_side.transaction("q1", [], token=None, query_token=hs_token)
    assert (status, answer["errcode"]) == (401, "M_UNAUTHORIZED")
    # The header decides; the query parameter is not looked at.
    assert await homeserver_side.transaction("q1", [], query_token="other") == (200, {})


@pytest.mark.parametrize("appservice_extra", [{"legacy_query_auth": True}])
async def test_legacy_query_token_when_enabled_must_match_the_header(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    hs_token = homeserver_side.hs_token
    side = homeserver_side
    assert await side.transaction("l1", [], token=None, query_token=hs_token) == (200, {})
    assert await side.transaction("l2", [], query_token=hs_token) == (200, {})
    for token, query_token in (
        (None, "wrong"),
        ("hs_token", "wrong"),
        ("wrong", hs_token),
    ):
        status, answer = await side.transaction("l3", [], token=token, query_token=query_token)
        assert (status, answer["errcode"]) == (403, "M_FORBIDDEN"), (token, query_token)
    status, answer = await side.transaction("l3", [], token=None)
    assert (status, answer["errcode"]) == (401, "M_UNAUTHORIZED")


@pytest.mark.parametrize("appservice_extra", [{"legacy_query_auth": True}])
async def test_the_hs_token_is_not_written_to_the_access_log(
    quiet: Api, homeserver_side: HomeserverSide, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hs_token = homeserver_side.hs_token
    assert await homeserver_side.transaction("log1", [], query_token=hs_token) == (200, {})
    await homeserver_side.transaction("log2", [], token="wrong", query_token=hs_token + "x")
    assert "log1" in caplog.text  # the request was logged...
    assert hs_token not in caplog.text  # ...without the token


async def test_access_log_lines_carry_a_request_id(
    quiet: Api, homeserver_side: HomeserverSide, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert await homeserver_side.transaction("id1", []) == (200, {})
    assert await homeserver_side.transaction("id2", []) == (200, {})

    def access_ids() -> list[Any]:
        return [
            getattr(r, "request_id", None)
            for r in caplog.records
            if r.name == "aiohttp.access" and "/transactions/id" in r.getMessage()
        ]

    for _ in range(100):  # the access line is written just after the response is sent
        if len(access_ids()) == 2:
            break
        await asyncio.sleep(0.01)
    ids = access_ids()
    assert len(ids) == 2
    assert all(ids) and ids[0] != ids[1]


# Malformed requests.


async def test_unknown_paths_and_methods_are_unrecognized(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    status, answer = await homeserver_side.request("GET", "/_matrix/app/v1/nothing-here")
    assert (status, answer["errcode"]) == (404, "M_UNRECOGNIZED")
    status, answer = await homeserver_side.request("GET", f"{TXN}/t1")
    assert (status, answer["errcode"]) == (405, "M_UNRECOGNIZED")


async def test_malformed_transactions_are_refused_and_not_remembered(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    status, answer = await homeserver_side.request("PUT", f"{TXN}/m1", data=b"{not json")
    assert (status, answer["errcode"]) == (400, "M_NOT_JSON")
    status, answer = await homeserver_side.request("PUT", f"{TXN}/m1", json={"ephemeral": []})
    assert (status, answer["errcode"]) == (400, "M_BAD_JSON")
    bodies: list[Any] = [{"events": {}}, {"events": ["x"]}, [], "events"]
    for body in bodies:
        status, answer = await homeserver_side.request("PUT", f"{TXN}/m1", json=body)
        assert (status, answer["errcode"]) == (400, "M_BAD_JSON"), body
    assert await actions_of(quiet.server) == []
    # The id was not used up: the homeserver's proper retry is processed.
    assert await homeserver_side.transaction("m1", [member_event(EXPIRED_USER, "invite")]) == (
        200,
        {},
    )
    assert len(await actions_of(quiet.server)) == 1


# What a transaction records.


async def test_expired_invite_of_a_stored_invite_is_rejected_with_its_details(
    quiet: Api, homeserver_side: HomeserverSide, clock: FakeClock
) -> None:
    pending = await invite(quiet, "bob@example.com")
    event = member_event(
        EXPIRED_USER, "invite", sender=pending.sender, token=pending.token, display_name="x"
    )
    assert await homeserver_side.transaction("i1", [event]) == (200, {})

    [action] = await actions_of(quiet.server)
    invited_on = datetime.datetime.fromtimestamp(pending.created_ts / 1000, datetime.UTC)
    assert pending.display_name != "bob@example.com" and "…" in pending.display_name
    assert action.reason == (
        f"The invitation sent to {pending.display_name} by {pending.sender} on "
        f"{invited_on:%Y-%m-%d} expired after 7 days and was withdrawn."
    )
    assert "bob@example.com" not in action.reason
    assert (action.kind, action.state, action.attempts) == (REJECT, PENDING, 0)
    assert (action.room_id, action.user_id, action.event_id) == (
        ROOM,
        EXPIRED_USER,
        event["event_id"],
    )
    assert action.created_ts == clock.now_ms()


async def test_invite_without_one_of_our_tokens_gets_a_generic_reason(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    plain = member_event(EXPIRED_USER, "invite", room_id="!one:hs.test")
    unknown = member_event(EXPIRED_USER, "invite", room_id="!two:hs.test", token="not-ours")
    assert await homeserver_side.transaction("g1", [plain, unknown]) == (200, {})
    first, second = sorted(await actions_of(quiet.server), key=lambda a: a.room_id)
    assert first.reason == GENERIC_REASON
    assert first.room_id == "!one:hs.test"
    # Not one of ours, but the homeserver told us who was invited and by whom.
    assert (
        second.reason == "The invitation sent to a…@e… by @alice:hs.test expired and was withdrawn."
    )


async def test_a_retried_transaction_records_nothing_new(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    events = [member_event(EXPIRED_USER, "invite")]
    assert await homeserver_side.transaction("r1", events) == (200, {})
    assert await homeserver_side.transaction("r1", events) == (200, {})
    # Through the legacy path as well.
    legacy = await homeserver_side.request("PUT", "/transactions/r1", json={"events": events})
    assert legacy == (200, {})
    [action] = await actions_of(quiet.server)
    # A new transaction id with the same event (a homeserver bug) still gives one action.
    assert await homeserver_side.transaction("r2", events) == (200, {})
    assert await actions_of(quiet.server) == [action]


async def test_unrelated_events_are_ignored(quiet: Api, homeserver_side: HomeserverSide) -> None:
    other_invite = member_event("@carol:hs.test", "invite")
    bot_left = member_event(BOT, "leave", sender=BOT)  # its own leave (a kick records one)
    elsewhere = member_event("@_identity_invite_expired:other.test", "invite")
    left = member_event(EXPIRED_USER, "leave")
    banned = member_event(EXPIRED_USER, "ban")
    no_event_id = member_event(EXPIRED_USER, "invite")
    del no_event_id["event_id"]
    no_content = member_event(EXPIRED_USER, "invite")
    no_content["content"] = "invite"
    not_state = {k: v for k, v in member_event(EXPIRED_USER, "invite").items() if k != "state_key"}
    events = [
        other_invite,
        bot_left,
        elsewhere,
        left,
        banned,
        message_event(),
        no_event_id,
        no_content,
        not_state,
        {"type": "m.typing"},
        {},
    ]
    assert await homeserver_side.transaction("u1", events) == (200, {})
    assert await actions_of(quiet.server) == []


async def test_a_join_of_the_expired_user_records_a_leave(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    joined = member_event(EXPIRED_USER, "join", sender=EXPIRED_USER)
    invited = member_event(EXPIRED_USER, "invite", room_id="!other:hs.test")
    assert await homeserver_side.transaction("j1", [message_event(), joined, invited]) == (200, {})
    actions = await actions_of(quiet.server)
    assert sorted((a.kind, a.room_id, a.event_id) for a in actions) == sorted(
        [(LEAVE, ROOM, joined["event_id"]), (REJECT, "!other:hs.test", invited["event_id"])]
    )
    [leave] = [a for a in actions if a.kind == LEAVE]
    assert leave.reason == ""


async def test_a_transaction_that_cannot_be_recorded_fails_so_the_homeserver_retries(
    quiet: Api, homeserver_side: HomeserverSide, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = quiet.server.appservice_store
    add_action = store.add_action

    async def broken(*args: Any) -> bool:
        raise ConnectionError("database went away")

    monkeypatch.setattr(store, "add_action", broken)
    events = [member_event(EXPIRED_USER, "invite")]
    status, answer = await homeserver_side.transaction("f1", events)
    assert (status, answer["errcode"]) == (500, "M_UNKNOWN")
    assert await actions_of(quiet.server) == []

    monkeypatch.setattr(store, "add_action", add_action)
    # The transaction id was rolled back with the rest: the retry is processed.
    assert await homeserver_side.transaction("f1", events) == (200, {})
    assert len(await actions_of(quiet.server)) == 1


async def test_the_public_listener_does_not_serve_the_appservice_api(quiet: Api) -> None:
    hs_token = quiet.server.config.appservice.hs_token
    for path in (f"{TXN}/p1", "/transactions/p1"):
        status, answer = await quiet.request("PUT", path, token=hs_token, json={"events": []})
        assert (status, answer["errcode"]) == (404, "M_UNRECOGNIZED"), path
    status, _ = await quiet.request("POST", "/_matrix/app/v1/ping", token=hs_token, json={})
    assert status == 404


# Across restarts (no api fixture: this test stops and starts the server itself).


async def test_a_transaction_retried_after_a_restart_records_nothing_new(
    tmp_path: Path, database_url: str, client_api: FakeClientApi, clock: FakeClock
) -> None:
    config = make_config(
        tmp_path, database_url, {}, yaml.safe_dump({"appservice": appservice_settings(client_api)})
    )
    events = [member_event(EXPIRED_USER, "invite"), member_event(EXPIRED_USER, "join")]

    async def run_once(expected_actions: int) -> None:
        server = IdentityServer(config, clock=clock)
        await server.start()
        try:
            for job in server.jobs:  # the actions stay pending, for counting
                await job.stop()
            async with aiohttp.ClientSession() as session:
                assert client_api.appservice_url is not None
                side = HomeserverSide(session, client_api.appservice_url, client_api.hs_token)
                assert await side.transaction("restart-1", events) == (200, {})
            assert len(await actions_of(server)) == expected_actions
        finally:
            await server.stop()

    # The join comes while the reject is still to be done (which leaves anyway): one action.
    await run_once(1)
    await run_once(1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (7 * 86400, "7 days"),
        (86400, "1 day"),
        (60 * 3600, "60 hours"),
        (36 * 3600, "36 hours"),
        (3600, "1 hour"),
        (60, "1 minute"),
        (90, "90 seconds"),
        (1000, "17 minutes"),
        (7 * 86400 + 3, "7 days"),
        (45, "45 seconds"),
        (1, "1 second"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


async def test_handled_transaction_ids_are_forgotten_after_a_week(
    quiet: Api, homeserver_side: HomeserverSide, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    assert await homeserver_side.transaction("old", []) == (200, {})
    clock.advance(TRANSACTION_MEMORY_S - 1)
    assert await homeserver_side.transaction("young", []) == (200, {})
    assert await quiet.server.expired_invites.purge() == 0
    clock.advance(2)
    assert await quiet.server.expired_invites.purge() == 1
    # The homeserver stopped retrying long ago; the young one is still remembered.
    caplog.set_level(logging.INFO)
    assert await homeserver_side.transaction("young", []) == (200, {})
    assert "transaction young was already handled" in caplog.text
    caplog.clear()
    assert await homeserver_side.transaction("old", []) == (200, {})
    assert "already handled" not in caplog.text


# The homeserver's user query (GET /users/{userId}): 200 only once the user exists on the
# homeserver. With the homeserver down at start-up, the background registration has registered
# nobody, so the query itself must register.

EXPIRED_LOCALPART = EXPIRED_USER[1:].split(":")[0]
BOT_LOCALPART = BOT[1:].split(":")[0]


@pytest.mark.parametrize("homeserver_down", [True])
async def test_user_query_for_the_expired_user_registers_it_first(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi
) -> None:
    await client_api.come_up()
    assert EXPIRED_USER not in client_api.registered
    # Synapse percent-encodes the user ID in the path.
    path = "/_matrix/app/v1/users/%40_identity_invite_expired%3Ahs.test"
    assert await homeserver_side.request("GET", path) == (200, {})
    [register] = client_api.calls_of("register")
    assert register.status == 200
    assert register.body["username"] == EXPIRED_LOCALPART
    assert register.body["type"] == "m.login.application_service"
    assert EXPIRED_USER in client_api.registered
    # Asked again (here on the legacy path): still 200, and not registered a second time.
    assert await homeserver_side.request("GET", f"/users/{EXPIRED_USER}") == (200, {})
    assert len(client_api.calls_of("register")) == 1


@pytest.mark.parametrize("homeserver_down", [True])
async def test_user_query_for_the_bot_accepts_that_it_already_exists(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi
) -> None:
    await client_api.come_up()
    # The homeserver created the bot (sender_localpart) itself: registering it is M_USER_IN_USE.
    assert await homeserver_side.request("GET", f"/_matrix/app/v1/users/{BOT}") == (200, {})
    [register] = client_api.calls_of("register")
    assert (register.status, register.body["username"]) == (400, BOT_LOCALPART)
    assert await homeserver_side.request("GET", f"/users/{BOT}") == (200, {})
    assert len(client_api.calls_of("register")) == 1


@pytest.mark.parametrize("homeserver_down", [True])
@pytest.mark.parametrize("user_id", [EXPIRED_USER, BOT])
async def test_user_query_is_502_when_the_user_cannot_be_registered(
    quiet: Api, homeserver_side: HomeserverSide, client_api: FakeClientApi, user_id: str
) -> None:
    path = f"/_matrix/app/v1/users/{user_id}"
    # The homeserver cannot be reached (it went down after asking)...
    status, answer = await homeserver_side.request("GET", path)
    assert (status, answer["errcode"]) == (502, "M_UNKNOWN")
    assert client_api.calls == []
    # ...or refuses the registration.
    await client_api.come_up()
    refusals: list[Any] = [500, (403, {"errcode": "M_EXCLUSIVE", "error": "not yours"})]
    client_api.fail_next("register", *refusals)
    for refusal in refusals:
        status, answer = await homeserver_side.request("GET", path)
        assert (status, answer["errcode"]) == (502, "M_UNKNOWN"), refusal
    assert [c.status for c in client_api.calls_of("register")] == [500, 403]
    assert client_api.registered == {client_api.bot_user_id}  # as before: nothing new
    # A failure is not remembered as a registration: the next query registers and says 200.
    assert await homeserver_side.request("GET", path) == (200, {})
    assert len(client_api.calls_of("register")) == 3
    assert user_id in client_api.registered


async def test_an_invite_withdrawn_by_a_member_is_rejected_naming_them(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    pending = await invite(quiet, "carol@example.com")
    invites = quiet.server.invites
    assert await invites.withdraw(pending.id, "@alice:hs.test")
    assert not await invites.withdraw(pending.id, "@alice:hs.test")  # once
    resolved = await InviteStore(quiet.server.db).by_id(pending.id)
    assert resolved is not None
    assert (resolved.state, resolved.resolved_mxid) == ("expired", EXPIRED_USER)
    event = member_event(EXPIRED_USER, "invite", sender=pending.sender, token=pending.token)
    assert await homeserver_side.transaction("w1", [event]) == (200, {})
    [action] = await actions_of(quiet.server)
    assert action.kind == REJECT
    assert action.reason.endswith(" was withdrawn by @alice:hs.test.")
    assert action.reason.startswith(f"The invitation sent to {pending.display_name} by ")


async def test_an_invite_of_the_bot_records_its_join(
    quiet: Api, homeserver_side: HomeserverSide
) -> None:
    event = member_event(BOT, "invite")
    assert await homeserver_side.transaction("b1", [event]) == (200, {})
    assert await homeserver_side.transaction("b1", [event]) == (200, {})  # a retry
    [action] = await actions_of(quiet.server)
    assert (action.kind, action.user_id, action.event_id) == ("bot_join", BOT, event["event_id"])
