"""Steps the end-to-end tests share: users on Synapse and our server, validation, binding,
rooms and 3PID invites, polling the room state."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from appservice.crypto.hashing import lookup_hash
from tests.e2e.conftest import RunningIdentityServer
from tests.support.synapse import SynapseServer

V2 = "/_matrix/identity/v2"


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], what: str, within: float = 20.0
) -> None:
    """Poll ``await predicate()`` every 0.1 s until true (bounded)."""
    for _ in range(int(within * 10)):
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def register_everywhere(
    synapse: SynapseServer, ids: RunningIdentityServer, localpart: str
) -> tuple[str, str, str]:
    """A Synapse user with an identity-server token: (user_id, hs token, IS token)."""
    user_id, hs_token = await synapse.register_user(localpart, "a long test password")
    credentials = await synapse.request_openid_token(user_id, hs_token)
    status, body = await ids.request("POST", f"{V2}/account/register", json=credentials)
    assert status == 200, body
    return user_id, hs_token, body["token"]


async def lookup(ids: RunningIdentityServer, token: str, address: str) -> str | None:
    """The Matrix ID a hashed lookup finds for an email address."""
    _, details = await ids.request("GET", f"{V2}/hash_details", token=token)
    h = lookup_hash(address, "email", details["lookup_pepper"])
    status, body = await ids.request(
        "POST",
        f"{V2}/lookup",
        token=token,
        json={"algorithm": "sha256", "pepper": details["lookup_pepper"], "addresses": [h]},
    )
    assert status == 200, body
    mxid: str | None = body["mappings"].get(h)
    return mxid


async def validate_email(
    ids: RunningIdentityServer, is_token: str, address: str, client_secret: str
) -> str:
    """Validate ``address`` with the token from the real mail; returns the sid."""
    before = len(ids.smtp.mails)
    status, body = await ids.request(
        "POST",
        f"{V2}/validate/email/requestToken",
        token=is_token,
        json={"client_secret": client_secret, "email": address, "send_attempt": 1},
    )
    assert status == 200, body
    sid: str = body["sid"]
    mails = await ids.smtp.wait_for(before + 1)
    text = mails[-1].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    link = re.search(r"https://\S+/validate/email/submitToken\?\S+", text)
    assert link, text
    token = parse_qs(urlsplit(link.group(0)).query)["token"][0]
    status, body = await ids.request(
        "POST",
        f"{V2}/validate/email/submitToken",
        token=is_token,
        json={"sid": sid, "client_secret": client_secret, "token": token},
    )
    assert (status, body) == (200, {"success": True})
    return sid


async def bind_through_synapse(
    synapse: SynapseServer,
    ids: RunningIdentityServer,
    hs_token: str,
    is_token: str,
    sid: str,
    client_secret: str,
) -> None:
    """``POST /account/3pid/bind`` on Synapse, which calls our ``/v2/3pid/bind``."""
    status, body = await synapse.client_request(
        "POST",
        "/_matrix/client/v3/account/3pid/bind",
        hs_token,
        json={
            "client_secret": client_secret,
            "id_server": ids.name,
            "id_access_token": is_token,
            "sid": sid,
        },
    )
    assert status == 200, body


async def create_room_and_invite(
    synapse: SynapseServer, ids: RunningIdentityServer, hs_token: str, is_token: str, address: str
) -> str:
    """A new room of the user, with a 3PID invite of ``address`` through our server."""
    status, body = await synapse.client_request(
        "POST", "/_matrix/client/v3/createRoom", hs_token, json={"name": "Garden club"}
    )
    assert status == 200, body
    room_id: str = body["room_id"]
    status, body = await synapse.client_request(
        "POST",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/invite",
        hs_token,
        json={
            "id_server": ids.name,
            "id_access_token": is_token,
            "medium": "email",
            "address": address,
        },
    )
    assert status == 200, body
    return room_id


async def room_state(synapse: SynapseServer, hs_token: str, room_id: str) -> list[dict[str, Any]]:
    """The room's current state events."""
    status, body = await synapse.client_request(
        "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state", hs_token
    )
    assert status == 200, body
    state: list[dict[str, Any]] = body
    return state


async def wait_for_member(
    synapse: SynapseServer, hs_token: str, room_id: str, user_id: str, membership: str
) -> dict[str, Any]:
    """Poll the room state (bounded) until ``user_id`` has ``membership``; that event."""
    found: dict[str, Any] = {}

    async def has_membership() -> bool:
        for event in await room_state(synapse, hs_token, room_id):
            if (
                event["type"] == "m.room.member"
                and event["state_key"] == user_id
                and event["content"].get("membership") == membership
            ):
                found.update(event)
                return True
        return False

    await wait_until(has_membership, f"{user_id} to be {membership} in {room_id}", within=15)
    return found


async def membership_history(
    synapse: SynapseServer, hs_token: str, room_id: str, user_id: str
) -> list[dict[str, Any]]:
    """The ``m.room.member`` events of ``user_id`` in the room, oldest first."""
    status, body = await synapse.client_request(
        "GET",
        f"/_matrix/client/v3/rooms/{quote(room_id)}/messages?dir=b&limit=100",
        hs_token,
    )
    assert status == 200, body
    events = [
        e for e in body["chunk"]
        if e["type"] == "m.room.member" and e.get("state_key") == user_id
    ]  # fmt: skip
    return list(reversed(events))


async def register_admin(synapse: SynapseServer, localpart: str) -> str:
    """A new Synapse server admin; returns its access token."""
    _, token = await synapse.register_user(localpart, "a long test password", admin=True)
    return token


async def set_threepids(
    synapse: SynapseServer, admin_token: str, user_id: str, threepids: list[tuple[str, str]]
) -> None:
    """Give ``user_id`` exactly these 3PIDs with Synapse's admin API."""
    status, body = await synapse.client_request(
        "PUT",
        f"/_synapse/admin/v2/users/{quote(user_id, safe='')}",
        admin_token,
        json={"threepids": [{"medium": m, "address": a} for m, a in threepids]},
    )
    assert status == 200, body
