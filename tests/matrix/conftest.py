"""The appservice under test: the API tests' server (both databases) with the appservice
enabled, its homeserver being a fake client-server API (a fault-injection double; the real flows
run against Synapse in tests/e2e), and what the tests send as the homeserver."""

from __future__ import annotations

import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml

from appservice.app import IdentityServer
from appservice.db.appservice import RoomAction
from tests.api.test_invites import ROOM, stop_background_jobs
from tests.support.api_server import Api
from tests.support.client_api import FakeClientApi

EXPIRED_USER = "@_identity_invite_expired:hs.test"
BOT = "@_identity_bot:hs.test"
TXN = "/_matrix/app/v1/transactions"
GENERIC_REASON = "This invitation expired and was withdrawn."


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def appservice_settings(fake: FakeClientApi, **extra: Any) -> dict[str, Any]:
    """The ``appservice:`` section for a server whose homeserver is ``fake``, listening on a
    free port that the fake pings."""
    port = free_port()
    fake.appservice_url = f"http://127.0.0.1:{port}"
    return {
        "as_token": fake.as_token,
        "hs_token": fake.hs_token,
        "homeserver_url": fake.base_url,
        "homeserver_domain": fake.server_name,
        "url": fake.appservice_url,
        "listen": {"host": "127.0.0.1", "port": port},
        **extra,
    }


@pytest.fixture
def homeserver_down() -> bool:
    """Whether the fake client API refuses connections when the server starts."""
    return False


@pytest.fixture
async def client_api(homeserver_down: bool) -> AsyncIterator[FakeClientApi]:
    """The homeserver's client-server API, as the appservice uses it."""
    async with FakeClientApi() as fake:
        # Synapse creates the sender_localpart user itself when it loads the registration.
        fake.registered.add(fake.bot_user_id)
        if homeserver_down:
            await fake.go_down()
        yield fake


@pytest.fixture
def appservice_extra() -> dict[str, Any]:
    """More ``appservice:`` options (parametrize to change)."""
    return {}


@pytest.fixture
def config_yaml(client_api: FakeClientApi, appservice_extra: dict[str, Any]) -> str:
    return yaml.safe_dump({"appservice": appservice_settings(client_api, **appservice_extra)})


@pytest.fixture
async def homeserver_side(client_api: FakeClientApi) -> AsyncIterator[HomeserverSide]:
    """An HTTP client playing the homeserver's part towards the private listener."""
    async with aiohttp.ClientSession() as session:
        assert client_api.appservice_url is not None
        yield HomeserverSide(session, client_api.appservice_url, client_api.hs_token)


class HomeserverSide:
    """Sends what a homeserver sends to the appservice."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, hs_token: str) -> None:
        self.session = session
        self.base_url = base_url
        self.hs_token = hs_token

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "hs_token",
        query_token: str | None = None,
        json: Any = None,
        data: bytes | None = None,
    ) -> tuple[int, Any]:
        """(status, JSON body or text); ``token="hs_token"`` means the right one."""
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.hs_token if token == 'hs_token' else token}"
        params = {"access_token": query_token} if query_token is not None else None
        async with self.session.request(
            method,
            self.base_url + path,
            headers=headers,
            params=params,
            json=json,
            data=data,
        ) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()

    async def transaction(
        self, txn_id: str, events: list[dict[str, Any]], **kwargs: Any
    ) -> tuple[int, Any]:
        """``PUT /_matrix/app/v1/transactions/{txn_id}``."""
        return await self.request("PUT", f"{TXN}/{txn_id}", json={"events": events}, **kwargs)


def member_event(
    state_key: str,
    membership: str,
    *,
    room_id: str = ROOM,
    sender: str = "@alice:hs.test",
    token: str | None = None,
    display_name: str | None = None,
) -> dict[str, Any]:
    """An ``m.room.member`` event as a homeserver pushes it."""
    content: dict[str, Any] = {"membership": membership}
    if token is not None or display_name is not None:
        third_party: dict[str, Any] = {"display_name": display_name or "a…@e…"}
        if token is not None:
            third_party["signed"] = {"mxid": state_key, "token": token, "signatures": {}}
        content["third_party_invite"] = third_party
    return {
        "type": "m.room.member",
        "state_key": state_key,
        "sender": sender,
        "room_id": room_id,
        "event_id": f"${secrets.token_urlsafe(12)}",
        "origin_server_ts": 1_700_000_000_000,
        "content": content,
    }


def message_event(room_id: str = ROOM) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "sender": "@alice:hs.test",
        "room_id": room_id,
        "event_id": f"${secrets.token_urlsafe(12)}",
        "origin_server_ts": 1_700_000_000_000,
        "content": {"msgtype": "m.text", "body": f"hello {EXPIRED_USER}"},
    }


async def actions_of(server: IdentityServer) -> list[RoomAction]:
    return await server.appservice_store.actions()


@pytest.fixture
async def quiet(api: Api) -> AsyncIterator[Api]:
    """The server with its background jobs stopped (recorded actions stay pending)."""
    await stop_background_jobs(api)
    yield api


# Authentication.
