"""A transaction is a retry only if its id came before with the same events.

Synapse on SQLite numbers its transactions from 1 again after a restart (its sequence starts
from the largest id still in its table, and delivered transactions are deleted), so an id seen
before may carry new events: those must be handled, not dropped as a retry.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.db.appservice import AppserviceStore
from appservice.services.expired_invites import events_digest
from tests.matrix.conftest import (
    EXPIRED_USER,
    HomeserverSide,
    actions_of,
    appservice_settings,
    member_event,
    message_event,
)
from tests.support.api_server import Api, make_config
from tests.support.client_api import FakeClientApi


class Recorded:
    """What ``record_transaction`` answered, per call (True: handled as new)."""

    def __init__(self, store: AppserviceStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers: list[tuple[str, bool]] = []
        record = store.record_transaction

        async def spy(txn_id: str, digest: str, now_ms: int) -> bool:
            answer = await record(txn_id, digest, now_ms)
            self.answers.append((txn_id, answer))
            return answer

        monkeypatch.setattr(store, "record_transaction", spy)

    def handled(self) -> list[str]:
        return [txn_id for txn_id, answer in self.answers if answer]


@pytest.fixture
def recorded(quiet: Api, monkeypatch: pytest.MonkeyPatch) -> Recorded:
    return Recorded(quiet.server.appservice_store, monkeypatch)


async def stored_transactions(server: IdentityServer) -> list[tuple[str, str]]:
    rows = await server.db.fetch(
        "SELECT txn_id, events_digest FROM appservice_transactions ORDER BY received_ts, txn_id"
    )
    return [(row["txn_id"], row["events_digest"]) for row in rows]


# The digest.


def test_the_digest_depends_on_the_event_ids_not_their_order() -> None:
    a, b = member_event(EXPIRED_USER, "invite"), member_event(EXPIRED_USER, "join")
    assert events_digest([a, b]) == events_digest([b, a])
    assert events_digest([a]) != events_digest([b])
    assert events_digest([a]) != events_digest([a, b])
    assert events_digest([a]) != events_digest([a, a])
    assert events_digest([]) != events_digest([a])
    # Only the id counts for an event that has one (the homeserver sends the same event again).
    assert events_digest([{**a, "unsigned": {"age": 5}}]) == events_digest([a])


def test_events_without_an_id_count_by_their_content() -> None:
    typing_1 = {"type": "m.typing", "content": {"user_ids": ["@a:hs.test"]}}
    typing_2 = {"type": "m.typing", "content": {"user_ids": ["@b:hs.test"]}}
    same_as_1 = {"content": {"user_ids": ["@a:hs.test"]}, "type": "m.typing"}
    assert events_digest([typing_1]) == events_digest([same_as_1])
    assert events_digest([typing_1]) != events_digest([typing_2])
    # An id that is not a string is content like any other.
    assert events_digest([{"event_id": 1}]) != events_digest([{"event_id": 2}])
    # Whatever JSON parsing lets through is digested without an error.
    odd = {"event_id": "$\ud800", "content": {"n": float("nan"), "f": 1.5, "s": "\ud800"}}
    assert len(events_digest([odd, {"x": "\ud800"}])) == 64


# Through the appservice listener, on both databases.


async def test_the_same_id_with_the_same_events_is_a_retry(
    quiet: Api,
    homeserver_side: HomeserverSide,
    recorded: Recorded,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    a, b = member_event(EXPIRED_USER, "invite"), message_event()
    assert await homeserver_side.transaction("1", [a, b]) == (200, {})
    assert await homeserver_side.transaction("1", [a, b]) == (200, {})
    assert await homeserver_side.transaction("1", [b, a]) == (200, {})
    assert recorded.handled() == ["1"]
    assert len(recorded.answers) == 3
    assert caplog.text.count("transaction 1 was already handled") == 2
    assert len(await actions_of(quiet.server)) == 1
    assert await stored_transactions(quiet.server) == [("1", events_digest([a, b]))]


async def test_the_same_id_with_new_events_is_handled(
    quiet: Api,
    homeserver_side: HomeserverSide,
    recorded: Recorded,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    first = member_event(EXPIRED_USER, "invite", room_id="!before:hs.test")
    assert await homeserver_side.transaction("1", [first]) == (200, {})
    # The homeserver restarted and numbers from 1 again: a new invite under an old id.
    second = member_event(EXPIRED_USER, "invite", room_id="!after:hs.test")
    assert await homeserver_side.transaction("1", [second]) == (200, {})
    assert recorded.handled() == ["1", "1"]
    assert "transaction 1 reuses an id with other events" in caplog.text
    actions = await actions_of(quiet.server)
    assert sorted(a.room_id for a in actions) == ["!after:hs.test", "!before:hs.test"]
    # An empty transaction under a used id is new too (and records nothing).
    assert await homeserver_side.transaction("1", []) == (200, {})
    assert recorded.handled() == ["1", "1", "1"]
    assert len(await actions_of(quiet.server)) == 2


async def test_an_older_transaction_retried_after_a_newer_one_with_its_id_is_a_retry(
    quiet: Api, homeserver_side: HomeserverSide, recorded: Recorded
) -> None:
    older = [member_event(EXPIRED_USER, "invite", room_id="!older:hs.test")]
    newer = [member_event(EXPIRED_USER, "invite", room_id="!newer:hs.test")]
    assert await homeserver_side.transaction("7", older) == (200, {})
    assert await homeserver_side.transaction("7", newer) == (200, {})
    assert await homeserver_side.transaction("7", older) == (200, {})
    assert await homeserver_side.transaction("7", newer) == (200, {})
    assert recorded.handled() == ["7", "7"]
    assert len(recorded.answers) == 4
    assert len(await actions_of(quiet.server)) == 2
    assert sorted(await stored_transactions(quiet.server)) == sorted(
        [("7", events_digest(older)), ("7", events_digest(newer))]
    )


async def test_a_transaction_that_failed_is_not_remembered_with_its_events(
    quiet: Api,
    homeserver_side: HomeserverSide,
    recorded: Recorded,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = quiet.server.appservice_store
    add_action = store.add_action

    async def broken(*args: Any) -> bool:
        raise ConnectionError("database went away")

    events = [member_event(EXPIRED_USER, "invite")]
    monkeypatch.setattr(store, "add_action", broken)
    status, _ = await homeserver_side.transaction("f1", events)
    assert status == 500
    monkeypatch.setattr(store, "add_action", add_action)
    assert await stored_transactions(quiet.server) == []
    assert await homeserver_side.transaction("f1", events) == (200, {})
    assert recorded.handled() == ["f1", "f1"]  # the first was rolled back
    assert len(await actions_of(quiet.server)) == 1


@pytest.mark.parametrize("same_events", [True, False], ids=["same-events", "other-events"])
async def test_concurrent_transactions_with_one_id(
    quiet: Api,
    homeserver_side: HomeserverSide,
    recorded: Recorded,
    monkeypatch: pytest.MonkeyPatch,
    same_events: bool,
) -> None:
    """Identical transactions at once (several instances on PostgreSQL see this when the
    homeserver retries a slow one): exactly one records the actions. Different events under one
    id at once: each is recorded."""
    store = quiet.server.appservice_store
    add_action = store.add_action
    added: list[str] = []

    async def slow(*args: Any) -> bool:
        # Hold the database transaction open while the others try to record the same id.
        await asyncio.sleep(0.05)
        added.append(args[5])
        return await add_action(*args)

    monkeypatch.setattr(store, "add_action", slow)
    count = 12
    if same_events:
        event = member_event(EXPIRED_USER, "invite")
        bodies = [[event] for _ in range(count)]
    else:
        bodies = [
            [member_event(EXPIRED_USER, "invite", room_id=f"!r{i}:hs.test")] for i in range(count)
        ]
    answers = await asyncio.gather(*(homeserver_side.transaction("c1", b) for b in bodies))
    assert answers == [(200, {})] * count
    expected = 1 if same_events else count
    assert len(recorded.answers) == count
    assert len(recorded.handled()) == expected
    assert len(added) == expected
    assert len(await actions_of(quiet.server)) == expected
    assert len(await stored_transactions(quiet.server)) == expected


# Across restarts of our server (the records are durable).


async def test_after_our_restart_a_retry_is_still_recognised_and_new_events_are_not(
    tmp_path: Path,
    database_url: str,
    client_api: FakeClientApi,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = make_config(
        tmp_path, database_url, {}, yaml.safe_dump({"appservice": appservice_settings(client_api)})
    )
    first = [member_event(EXPIRED_USER, "invite", room_id="!one:hs.test")]
    second = [member_event(EXPIRED_USER, "invite", room_id="!two:hs.test")]

    async def run_once(send: list[list[dict[str, Any]]]) -> tuple[list[bool], list[str]]:
        server = IdentityServer(config, clock=clock)
        await server.start()
        try:
            for job in server.jobs:  # the actions stay pending, for counting
                await job.stop()
            answers: list[bool] = []
            store = server.appservice_store
            record = store.record_transaction

            async def spy(txn_id: str, digest: str, now_ms: int) -> bool:
                answers.append(await record(txn_id, digest, now_ms))
                return answers[-1]

            monkeypatch.setattr(store, "record_transaction", spy)
            async with aiohttp.ClientSession() as session:
                assert client_api.appservice_url is not None
                side = HomeserverSide(session, client_api.appservice_url, client_api.hs_token)
                for events in send:
                    assert await side.transaction("1", events) == (200, {})
            return answers, sorted(a.room_id for a in await actions_of(server))
        finally:
            await server.stop()

    assert await run_once([first]) == ([True], ["!one:hs.test"])
    assert await run_once([first, second, first]) == (
        [False, True, False],
        ["!one:hs.test", "!two:hs.test"],
    )
