"""The invite proxy: client-server invite requests checked by ``invites.policy`` and forwarded to
a loopback homeserver that records exactly what it receives."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from yarl import URL

from appservice.clock import FakeClock
from appservice.identity_stores import StoreError
from tests.support.api_server import Api
from tests.support.recording_client_api import Answer, RecordingClientApi

ROOM = "!garden:hs.test"
ROOM_PATH = "%21garden%3Ahs.test"
INVITE = f"/_matrix/client/v3/rooms/{ROOM_PATH}/invite"
ALICE, CAROL = "@alice:hs.test", "@carol:hs.test"
ALICE_TOKEN, CAROL_TOKEN, AS_TOKEN = "alice-token", "carol-token", "as-token"
THREEPID = {
    "id_server": "id.test",
    "id_access_token": "is-token",
    "medium": "email",
    "address": "bob@example.org",
}
ROLES_POLICY: dict[str, Any] = {
    "stores": {"order": ["static"], "static": {"roles": {ALICE: ["inviters"], CAROL: ["other"]}}},
    "invites": {"policy": {"roles": ["inviters"]}},
}


@pytest.fixture
async def hs_api() -> AsyncIterator[RecordingClientApi]:
    """The homeserver's client-server API, recording what the proxy sends it."""
    fake = RecordingClientApi()
    fake.tokens.update({ALICE_TOKEN: ALICE, CAROL_TOKEN: CAROL})
    fake.appservice_tokens.add(AS_TOKEN)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def policy_settings() -> dict[str, Any]:
    """Stores and ``invites.policy`` of the server under test (overridden per class)."""
    return {}


@pytest.fixture
def config_yaml(hs_api: RecordingClientApi, policy_settings: dict[str, Any]) -> str:
    return yaml.safe_dump({"appservice": {"homeserver_url": hs_api.base_url}, **policy_settings})


async def send(
    api: Api,
    path: str = INVITE,
    *,
    token: str | None = None,
    body: Any = None,
    method: str = "POST",
) -> tuple[int, Any]:
    """A client-server request through the proxy, its path sent exactly as written (no
    requoting); (status, JSON body or text)."""
    url = URL(str(api.client.make_url("/")).rstrip("/") + path, encoded=True)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with api.client.session.request(method, url, json=body, headers=headers) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def raw_exchange(api: Api, request: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send hand-written HTTP/1.1 bytes (``Connection: close``); (status, headers, body)."""
    url = api.client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines)]
    return int(status_line.split()[1]), headers, body


def without(headers: Any, *names: str) -> list[tuple[str, str]]:
    """Headers without ``names`` (case-insensitive), sorted for comparison."""
    drop = {n.lower() for n in names}
    return sorted((k, v) for k, v in headers if k.lower() not in drop)


class TestForwarding:
    async def test_mxid_invite_is_forwarded_byte_identical_without_whoami(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        body = b'{ "user_id" :"@bob:hs.test",  "reason": "caf\xc3\xa9"}'
        target = f"/_matrix/client/r0/rooms/{ROOM_PATH}/invite?foo=a%2Bb&foo=c&access_token=t%3D"
        sent_headers = [
            ("Authorization", "Bearer alice-token"),
            ("X-Custom", "one"),
            ("X-Custom", "two"),
            ("x-lower-case", "Mixed Value"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "for this hop only"),
            ("Keep-Alive", "timeout=5"),
        ]
        request = f"POST {target} HTTP/1.1\r\nHost: matrix.example.org\r\n".encode()
        request += b"".join(f"{k}: {v}\r\n".encode() for k, v in sent_headers) + b"\r\n" + body
        hs_api.answers.append(
            Answer(
                headers=[
                    ("Content-Type", "application/json"),
                    ("X-Answer", "1"),
                    ("X-Answer", "2"),
                    ("Connection", "X-Upstream-Hop"),
                    ("X-Upstream-Hop", "secret"),
                ],
                chunks=[b'{"answer":', b"true}"],
            )
        )

        status, headers, answer = await raw_exchange(api, request)

        assert (status, answer) == (200, b'{"answer":true}')
        assert [v for k, v in headers if k == "X-Answer"] == ["1", "2"]
        assert not [k for k, _ in headers if k.lower() == "x-upstream-hop"]
        assert ("Access-Control-Allow-Origin", "*") in headers
        [received] = hs_api.received
        assert (received.method, received.target, received.body) == ("POST", target, body)
        assert without(received.headers, "Host") == without(
            sent_headers, "Connection", "X-Hop", "Keep-Alive"
        )
        assert dict(received.headers)["Host"] == f"127.0.0.1:{hs_api.port}"
        assert hs_api.whoamis() == []

    async def test_large_answer_is_streamed_chunk_by_chunk(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        hold = asyncio.Event()
        rest = os.urandom(3 * 1024 * 1024)
        hs_api.answers.append(
            Answer(
                status=207,
                headers=[("Content-Type", "application/octet-stream")],
                chunks=[b"first"] + [rest[i : i + 100_000] for i in range(0, len(rest), 100_000)],
                content_length=False,
                hold=hold,
            )
        )
        async with api.client.post(INVITE, json={"user_id": "@bob:hs.test"}) as resp:
            # The first chunk arrives while the homeserver still holds the rest back.
            assert await asyncio.wait_for(resp.content.readexactly(5), 5) == b"first"
            hold.set()
            assert resp.status == 207
            assert await asyncio.wait_for(resp.content.read(), 10) == rest

    async def test_answer_cut_by_the_homeserver_is_cut_for_the_client(
        self, api: Api, hs_api: RecordingClientApi, caplog: pytest.LogCaptureFixture
    ) -> None:
        hs_api.answers.append(Answer(chunks=[b'{"partial":', b"true}"], cut=True))
        async with api.client.post(INVITE, json={"user_id": "@bob:hs.test"}) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(resp.read(), 10)
        assert any("broke off" in r.getMessage() for r in caplog.records)
        # The proxy keeps working.
        assert (await send(api, body={"user_id": "@bob:hs.test"}))[0] == 200

    async def test_error_answer_and_compressed_body_pass_through(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        error = gzip.compress(b'{"errcode":"M_FORBIDDEN","error":"You are not in this room"}')
        hs_api.answers.append(
            Answer(
                status=403,
                headers=[
                    ("Content-Type", "application/json"),
                    ("Content-Encoding", "gzip"),
                    ("Access-Control-Allow-Origin", "https://client.example"),
                ],
                chunks=[error],
            )
        )
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.post(
                api.client.make_url(INVITE),
                json={"user_id": "@bob:hs.test"},
                headers={"Accept-Encoding": "gzip"},
            ) as resp,
        ):
            assert resp.status == 403
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers.getall("Access-Control-Allow-Origin") == ["https://client.example"]
            assert await resp.read() == error
        assert dict(hs_api.received[0].headers)["Accept-Encoding"] == "gzip"

    @pytest.mark.parametrize("encoding", ["gzip", "GZip", "deflate"])
    async def test_compressed_request_is_forwarded_decoded(
        self, api: Api, hs_api: RecordingClientApi, encoding: str
    ) -> None:
        # aiohttp decodes the body it reads: forwarding it still labelled as compressed made
        # every compressed request fail at the homeserver.
        plain = b'{"user_id": "@bob:hs.test", "reason": "' + b"x" * 2000 + b'"}'
        compressed = gzip.compress(plain) if encoding != "deflate" else zlib.compress(plain)
        async with api.client.post(
            INVITE,
            data=compressed,
            headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 200
        [forwarded] = hs_api.forwarded()
        assert forwarded.body == plain
        headers = {k.lower(): v for k, v in forwarded.headers}
        assert "content-encoding" not in headers
        assert headers["content-length"] == str(len(plain))

    @pytest.mark.parametrize(
        "encodings", [["compress"], ["x-gzip"], ["gzip, gzip"], ["gzip", "gzip"]]
    )
    async def test_body_in_an_encoding_not_decoded_is_415(
        self, api: Api, hs_api: RecordingClientApi, encodings: list[str]
    ) -> None:
        # Its invites could not be checked.
        request = f"POST {INVITE} HTTP/1.1\r\nHost: id.test\r\nConnection: close\r\n".encode()
        request += b"".join(f"Content-Encoding: {e}\r\n".encode() for e in encodings)
        body = gzip.compress(json.dumps(THREEPID).encode())
        request += f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        status, _, answer = await raw_exchange(api, request)
        assert status == 415
        assert b"M_UNRECOGNIZED" in answer
        assert hs_api.received == []

    async def test_body_not_json_is_forwarded_for_the_homeserver_to_refuse(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        hs_api.answers.append(
            Answer(status=400, chunks=[b'{"errcode":"M_NOT_JSON","error":"Content not JSON."}'])
        )
        status, body = await api.request(
            "POST", INVITE, data=b'{"medium": "email", "address":', token=ALICE_TOKEN
        )
        assert (status, body["errcode"]) == (400, "M_NOT_JSON")
        assert hs_api.forwarded()[0].body == b'{"medium": "email", "address":'
        assert hs_api.whoamis() == []

    async def test_preflight_is_answered_with_cors(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        async with api.client.options(INVITE) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert hs_api.received == []

    async def test_homeserver_down_is_502(self, api: Api, hs_api: RecordingClientApi) -> None:
        await hs_api.go_down()
        status, body = await send(api, body={"user_id": "@bob:hs.test"})
        assert (status, body["errcode"]) == (502, "M_UNKNOWN")
        assert "homeserver" in body["error"]
        status, body = await send(api, token=ALICE_TOKEN, body=THREEPID)
        assert (status, body["errcode"]) == (502, "M_UNKNOWN")
        assert "who you are" in body["error"]


class TestNoPolicy:
    async def test_every_threepid_invite_is_allowed_and_logged_without_the_address(
        self, api: Api, hs_api: RecordingClientApi, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, "appservice.services.invite_policy")
        status, _ = await send(api, token=CAROL_TOKEN, body=THREEPID)
        assert status == 200
        [forwarded] = hs_api.forwarded()
        assert forwarded.json() == THREEPID
        [whoami] = hs_api.whoamis()
        assert dict(whoami.headers)["Authorization"] == f"Bearer {CAROL_TOKEN}"
        [line] = [r.getMessage() for r in caplog.records if "invite policy" in r.getMessage()]
        assert CAROL in line and ROOM in line and "allowed" in line
        assert "bob@example.org" not in line

    async def test_unknown_or_missing_token_gets_the_homeserver_answer(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        async with api.client.post(
            INVITE, json=THREEPID, headers={"Authorization": "Bearer wrong"}
        ) as resp:
            assert resp.status == 401
            assert resp.headers["X-Whoami"] == "refused"
            assert (await resp.json())["errcode"] == "M_UNKNOWN_TOKEN"
        status, body = await send(api, body=THREEPID)
        assert (status, body["errcode"]) == (401, "M_MISSING_TOKEN")
        assert hs_api.forwarded() == []


class TestRoles:
    @pytest.fixture
    def policy_settings(self) -> dict[str, Any]:
        return ROLES_POLICY

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("POST", INVITE),
            ("POST", f"/_matrix/client/r0/rooms/{ROOM_PATH}/invite"),
            ("POST", f"/_matrix/client/unstable/rooms/{ROOM_PATH}/invite"),
            ("POST", f"/_matrix/client/api/v1/rooms/{ROOM_PATH}/invite"),
            ("PUT", f"/_matrix/client/v3/rooms/{ROOM_PATH}/invite/txn1"),
        ],
    )
    async def test_sender_with_a_role_is_allowed_and_others_are_denied(
        self, api: Api, hs_api: RecordingClientApi, method: str, path: str
    ) -> None:
        status, body = await send(api, path, method=method, token=CAROL_TOKEN, body=THREEPID)
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        assert body["error"].startswith("You are not allowed to invite by email: ")
        assert hs_api.forwarded() == []
        status, _ = await send(api, path, method=method, token=ALICE_TOKEN, body=THREEPID)
        assert status == 200
        [forwarded] = hs_api.forwarded()
        assert (forwarded.method, forwarded.target, forwarded.json()) == (method, path, THREEPID)

    async def test_compressed_threepid_invite_is_checked_and_forwarded_decoded(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        compressed = gzip.compress(json.dumps(THREEPID).encode())
        for token, expected in ((CAROL_TOKEN, 403), (ALICE_TOKEN, 200)):
            async with api.client.post(
                INVITE,
                data=compressed,
                headers={"Authorization": f"Bearer {token}", "Content-Encoding": "gzip"},
            ) as resp:
                assert resp.status == expected
        [forwarded] = hs_api.forwarded()
        assert forwarded.json() == THREEPID
        assert "content-encoding" not in {k.lower() for k, _ in forwarded.headers}

    async def test_mxid_invite_needs_no_role(self, api: Api, hs_api: RecordingClientApi) -> None:
        status, _ = await send(api, token=CAROL_TOKEN, body={"user_id": "@bob:hs.test"})
        assert status == 200
        assert len(hs_api.forwarded()) == 1 and hs_api.whoamis() == []

    async def test_user_id_next_to_medium_and_address_is_still_a_threepid_invite(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        status, _ = await send(api, token=CAROL_TOKEN, body={**THREEPID, "user_id": "@bob:hs.test"})
        assert status == 403
        assert hs_api.forwarded() == []

    async def test_phone_invites_are_checked_too(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        body = {**THREEPID, "medium": "msisdn", "address": "447700900123"}
        status, answer = await send(api, token=CAROL_TOKEN, body=body)
        assert (status, answer["errcode"]) == (403, "M_FORBIDDEN")
        assert "invite by phone number" in answer["error"]

    async def test_token_in_query_and_appservice_user_are_asked_as_sent(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        status, _ = await send(api, f"{INVITE}?access_token={ALICE_TOKEN}", body=THREEPID)
        assert status == 200
        status, _ = await send(
            api, f"{INVITE}?user_id=%40carol%3Ahs.test", token=AS_TOKEN, body=THREEPID
        )
        assert status == 403
        status, _ = await send(
            api, f"{INVITE}?user_id=%40alice%3Ahs.test", token=AS_TOKEN, body=THREEPID
        )
        assert status == 200
        assert [dict(URL(w.target).query) for w in hs_api.whoamis()] == [
            {"access_token": ALICE_TOKEN},
            {"user_id": CAROL},
            {"user_id": ALICE},
        ]
        assert len(hs_api.forwarded()) == 2

    async def test_create_room_with_threepid_invites_is_checked(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        create = "/_matrix/client/v3/createRoom"
        room = {"name": "Garden", "invite_3pid": [THREEPID]}
        status, body = await send(api, create, token=CAROL_TOKEN, body=room)
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        status, _ = await send(api, create, token=CAROL_TOKEN, body={"name": "Garden"})
        assert status == 200
        status, _ = await send(api, create, token=ALICE_TOKEN, body=room)
        assert status == 200
        assert [r.json() for r in hs_api.forwarded()] == [{"name": "Garden"}, room]
        assert len(hs_api.whoamis()) == 2

    async def test_store_failure_is_503_not_a_guess(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        api.server.stores.all = (*api.server.stores.all, BrokenStore())
        status, body = await send(api, token=ALICE_TOKEN, body=THREEPID)
        assert (status, body["errcode"]) == (503, "M_UNKNOWN")
        assert "cannot check your roles right now" in body["error"]
        assert hs_api.forwarded() == []


class BrokenStore:
    """A store whose backend is down."""

    name = "broken"
    listable = False

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def find(self, threepids: Any) -> dict[Any, str]:
        raise StoreError("directory unreachable")

    async def roles(self, mxid: str) -> frozenset[str]:
        raise StoreError("directory unreachable")


class TestAllowedSenders:
    @pytest.fixture
    def policy_settings(self) -> dict[str, Any]:
        return {"invites": {"policy": {"allowed_senders": [r"@.*:trusted\.test"]}}}

    @pytest.mark.parametrize(
        ("sender", "allowed"),
        [
            ("@dave:trusted.test", True),
            ("@dave:hs.test", False),
            ("@dave:trusted.test.evil", False),
        ],
    )
    async def test_user_id_must_fully_match_a_pattern(
        self, api: Api, hs_api: RecordingClientApi, sender: str, allowed: bool
    ) -> None:
        hs_api.tokens["dave-token"] = sender
        status, _ = await send(api, token="dave-token", body=THREEPID)
        assert status == (200 if allowed else 403)
        assert len(hs_api.forwarded()) == (1 if allowed else 0)


class TestDomains:
    @pytest.fixture
    def policy_settings(self) -> dict[str, Any]:
        return {
            "invites": {
                "policy": {
                    "allowed_domains": ["example.org", "Partner.test", "straße.test"],
                    "denied_domains": ["bad.example.org"],
                }
            }
        }

    @pytest.mark.parametrize(
        ("address", "allowed"),
        [
            ("bob@example.org", True),
            ("BOB@Sub.Example.ORG", True),
            ("bob@partner.test", True),
            ("bob@bad.example.org", False),
            ("bob@x.bad.example.org", False),
            ("bob@notexample.org", False),
            ("bob@example.org.evil", False),
            ("bob@STRAẞE.test", True),
            # Under IDNA2008 strasse.test is another domain than straße.test.
            ("bob@strasse.test", False),
        ],
    )
    async def test_invitee_domain_is_checked(
        self, api: Api, hs_api: RecordingClientApi, address: str, allowed: bool
    ) -> None:
        status, body = await send(api, token=CAROL_TOKEN, body={**THREEPID, "address": address})
        if allowed:
            assert status == 200
        else:
            assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
            assert "may be invited" in body["error"] or "may not be invited" in body["error"]
        assert len(hs_api.forwarded()) == (1 if allowed else 0)

    async def test_domains_do_not_apply_to_phone_numbers(
        self, api: Api, hs_api: RecordingClientApi
    ) -> None:
        body = {**THREEPID, "medium": "msisdn", "address": "447700900123"}
        status, _ = await send(api, token=CAROL_TOKEN, body=body)
        assert status == 200


class TestDailyLimit:
    @pytest.fixture
    def policy_settings(self) -> dict[str, Any]:
        return {"invites": {"policy": {"max_per_day": 2}}}

    async def test_invites_over_the_daily_limit_are_refused_until_the_next_day(
        self, api: Api, hs_api: RecordingClientApi, clock: FakeClock
    ) -> None:
        for _ in range(2):
            status, _ = await send(api, token=CAROL_TOKEN, body=THREEPID)
            assert status == 200
        status, body = await send(api, token=CAROL_TOKEN, body=THREEPID)
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        assert body["retry_after_ms"] > 0
        assert len(hs_api.forwarded()) == 2
        # Another sender has their own count; invites by user ID are not counted.
        assert (await send(api, token=ALICE_TOKEN, body=THREEPID))[0] == 200
        assert (await send(api, token=CAROL_TOKEN, body={"user_id": "@bob:hs.test"}))[0] == 200
        clock.advance(86_400)
        assert (await send(api, token=CAROL_TOKEN, body=THREEPID))[0] == 200
