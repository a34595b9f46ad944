"""``/v2/account``: OpenID registration, who am I, logout, and token transport."""

from __future__ import annotations

import asyncio
import logging

import pytest

from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.errors import MatrixError
from appservice.services.accounts import TOKEN_CACHE_TTL_S
from tests.support.api_server import Api

REGISTER = "/_matrix/identity/v2/account/register"
ACCOUNT = "/_matrix/identity/v2/account"


async def test_register_returns_token_that_identifies_user(api: Api) -> None:
    user_id, token = await api.register("alice")
    assert len(token) >= 40
    assert await api.request("GET", ACCOUNT, token=token) == (200, {"user_id": user_id})
    assert api.homeserver.requests == [("GET", "/_matrix/federation/v1/openid/userinfo")]


async def test_token_is_accepted_in_query_string(api: Api) -> None:
    user_id, token = await api.register()
    assert await api.request("GET", f"{ACCOUNT}?access_token={token}") == (
        200,
        {"user_id": user_id},
    )


async def test_tokens_are_not_stored_in_plain_text(api: Api) -> None:
    _, token = await api.register()
    rows = await api.server.db.fetch("SELECT token_hash FROM accounts")
    assert rows and all(row["token_hash"] != token for row in rows)


async def test_missing_token_is_401_unauthorized(api: Api) -> None:
    status, body = await api.request("GET", ACCOUNT)
    assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")


async def test_unknown_token_is_401_unauthorized(api: Api) -> None:
    status, body = await api.request("GET", ACCOUNT, token="not-a-token")
    assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")


async def test_non_bearer_authorization_is_401(api: Api) -> None:
    _, token = await api.register()
    status, body = await api.request("GET", ACCOUNT, headers={"Authorization": f"Basic {token}"})
    assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")


async def test_unknown_openid_token_is_401_unknown_token(api: Api) -> None:
    status, body = await api.request(
        "POST",
        REGISTER,
        json={
            "access_token": "forged",
            "token_type": "Bearer",
            "matrix_server_name": api.homeserver.server_name,
            "expires_in": 3600,
        },
    )
    assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")


async def test_openid_user_of_another_server_is_rejected(api: Api) -> None:
    credentials = api.homeserver.issue_openid_token("@mallory:evil.example", "tok-evil")
    status, body = await api.request("POST", REGISTER, json=credentials)
    assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")


async def test_wrong_token_type_is_400_invalid_param(api: Api) -> None:
    credentials = api.homeserver.issue_openid_token("@bob:hs.test", "tok-bob")
    status, body = await api.request("POST", REGISTER, json={**credentials, "token_type": "Mac"})
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


@pytest.mark.parametrize("server_name", ["hs.test/evil", "a b", "@x", "", "hs.test:99999999"])
async def test_invalid_server_name_is_400_invalid_param(api: Api, server_name: str) -> None:
    credentials = api.homeserver.issue_openid_token("@bob:hs.test", "tok-bob")
    status, body = await api.request(
        "POST", REGISTER, json={**credentials, "matrix_server_name": server_name}
    )
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
    assert api.homeserver.requests == []


async def test_unreachable_homeserver_is_502_and_not_500(api: Api) -> None:
    # Loopback is allowed only for the fake homeserver's override; this name resolves to
    # nothing reachable, so the request fails at the network and is reported as such.
    status, body = await api.request(
        "POST",
        REGISTER,
        json={
            "access_token": "x",
            "token_type": "Bearer",
            "matrix_server_name": "127.0.0.1:1",
            "expires_in": 3600,
        },
    )
    assert status == 502
    assert body["errcode"] == "M_UNKNOWN"


async def test_homeserver_error_is_502(api: Api) -> None:
    credentials = api.homeserver.issue_openid_token("@bob:hs.test", "tok-bob")
    api.homeserver.userinfo_status = 503
    status, body = await api.request("POST", REGISTER, json=credentials)
    assert (status, body["errcode"]) == (502, "M_UNKNOWN")


@pytest.mark.parametrize(
    ("server_name", "why"),
    [
        # Loopback is in federation.allowed_networks: nothing listens on port 1.
        ("127.0.0.1:1", "could not connect to 127.0.0.1:1"),
        # Not in allowed_networks: refused before any connection.
        ("10.1.2.3:22", "address not allowed"),
    ],
)
async def test_register_does_not_tell_why_the_homeserver_could_not_be_asked(
    api: Api, caplog: pytest.LogCaptureFixture, server_name: str, why: str
) -> None:
    # Otherwise anyone could scan ports through the server (what is open, refused, filtered).
    status, body = await api.request(
        "POST",
        REGISTER,
        json={
            "access_token": "x",
            "token_type": "Bearer",
            "matrix_server_name": server_name,
            "expires_in": 3600,
        },
    )
    assert (status, body) == (
        502,
        {"errcode": "M_UNKNOWN", "error": f"Could not verify the OpenID token with {server_name}"},
    )
    [record] = [r for r in caplog.records if r.name == "appservice.services.accounts"]
    assert record.levelno == logging.WARNING
    assert why in record.getMessage()


async def test_register_does_not_echo_what_the_homeserver_answered(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    credentials = api.homeserver.issue_openid_token("@bob:hs.test", "tok-bob")
    api.homeserver.userinfo_status = 404
    status, body = await api.request("POST", REGISTER, json=credentials)
    assert (status, body) == (401, {"errcode": "M_UNKNOWN_TOKEN", "error": "OpenID token rejected"})
    [record] = [r for r in caplog.records if r.name == "appservice.services.accounts"]
    assert record.levelno == logging.WARNING
    assert "HTTP 404" in record.getMessage()


async def test_logout_invalidates_token(api: Api) -> None:
    _, token = await api.register()
    assert await api.request("POST", f"{ACCOUNT}/logout", token=token) == (200, {})
    status, body = await api.request("GET", ACCOUNT, token=token)
    assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")


async def test_logout_with_unknown_token_is_401_unknown_token(api: Api) -> None:
    status, body = await api.request("POST", f"{ACCOUNT}/logout", token="nope")
    assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")


async def test_logout_accepts_an_empty_body(api: Api) -> None:
    _, token = await api.register()
    async with api.client.post(
        f"{ACCOUNT}/logout", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 200


class TestAllowedHomeservers:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "accounts: {allowed_homeservers: [other.example]}"

    async def test_user_of_other_homeserver_is_403(self, api: Api) -> None:
        credentials = api.homeserver.issue_openid_token("@bob:hs.test", "tok-bob")
        status, body = await api.request("POST", REGISTER, json=credentials)
        assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
        assert api.homeserver.requests == []


async def test_logout_on_another_instance_takes_effect_within_the_cache_time(
    api: Api, clock: FakeClock
) -> None:
    user_id, token = await api.register()
    other = IdentityServer(api.server.config, clock=clock)
    await other.open()
    try:
        assert (await other.accounts.authenticate(token)).user_id == user_id
        await api.request("POST", f"{ACCOUNT}/logout", token=token)
        # This instance forgot the token at once; the other trusts its cache a little longer.
        status, _ = await api.request("GET", ACCOUNT, token=token)
        assert status == 401
        assert (await other.accounts.authenticate(token)).user_id == user_id
        clock.advance(TOKEN_CACHE_TTL_S)
        with pytest.raises(MatrixError) as info:
            await other.accounts.authenticate(token)
        assert info.value.errcode == "M_UNAUTHORIZED"
    finally:
        await other.stop()


class TestRegisterRateLimit:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "ratelimits: {register_per_ip: {limit: 3, period: 1h}}"

    async def test_register_is_limited_per_client_ip_before_asking_the_homeserver(
        self, api: Api, clock: FakeClock
    ) -> None:
        for n in range(3):
            await api.register(f"user{n}")
        credentials = api.homeserver.issue_openid_token("@mallory:hs.test", "tok-mallory")
        async with api.client.post(REGISTER, json=credentials) as resp:
            assert resp.status == 429
            body = await resp.json()
            assert body["errcode"] == "M_LIMIT_EXCEEDED"
            assert 0 < body["retry_after_ms"] <= 3_600_000
            assert int(resp.headers["Retry-After"]) > 0
        # Refused before the homeserver was asked, and no account was made.
        assert len(api.homeserver.requests) == 3
        assert await api.server.db.fetchval("SELECT COUNT(*) FROM accounts") == 3
        clock.advance(3600)
        status, body = await api.request("POST", REGISTER, json=credentials)
        assert status == 200, body

    async def test_failed_registrations_count_too(self, api: Api) -> None:
        bad = {**api.homeserver.issue_openid_token("@x:hs.test", "t"), "access_token": "wrong"}
        for _ in range(3):
            status, body = await api.request("POST", REGISTER, json=bad)
            assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")
        credentials = api.homeserver.issue_openid_token("@bob:hs.test", "tok-bob")
        status, body = await api.request("POST", REGISTER, json=credentials)
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")


class TestRegisterRateLimitUnderConcurrency:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "ratelimits: {register_per_ip: {limit: 20, period: 1h}}"

    async def test_parallel_registrations_from_one_ip_make_exactly_the_limit(
        self, api: Api
    ) -> None:
        bodies = [
            api.homeserver.issue_openid_token(f"@u{i}:hs.test", f"tok{i}") for i in range(250)
        ]
        results = await asyncio.gather(
            *(api.request("POST", REGISTER, json=body) for body in bodies)
        )
        statuses = [status for status, _ in results]
        assert statuses.count(200) == 20
        assert statuses.count(429) == 230
        assert await api.server.db.fetchval("SELECT COUNT(*) FROM accounts") == 20
        assert len(api.homeserver.requests) <= 20


class TestRegisterRateLimitBehindAProxy:
    @pytest.fixture
    def config_yaml(self) -> str:
        return (
            "ratelimits: {register_per_ip: {limit: 1, period: 1h}}\n"
            "listen: {trusted_proxies: [127.0.0.1/32]}"
        )

    async def test_each_client_behind_a_trusted_proxy_has_its_own_budget(self, api: Api) -> None:
        for n, ip in enumerate(("203.0.113.1", "203.0.113.2", "203.0.113.1")):
            credentials = api.homeserver.issue_openid_token(f"@c{n}:hs.test", f"tok-c{n}")
            status, _ = await api.request(
                "POST", REGISTER, json=credentials, headers={"X-Forwarded-For": ip}
            )
            assert status == (429 if n == 2 else 200)


@pytest.mark.parametrize(
    "dropped", [("token_type",), ("expires_in",), ("token_type", "expires_in")]
)
async def test_register_needs_only_access_token_and_server_name(
    api: Api, dropped: tuple[str, ...]
) -> None:
    """What matrix-is-tester and other tools send: {access_token, matrix_server_name}."""
    credentials = api.homeserver.issue_openid_token("@bob:hs.test", "tok-bob")
    body = {k: v for k, v in credentials.items() if k not in dropped}
    status, answer = await api.request("POST", REGISTER, json=body)
    assert status == 200, answer
    assert await api.request("GET", ACCOUNT, token=answer["token"]) == (
        200,
        {"user_id": "@bob:hs.test"},
    )


@pytest.mark.parametrize(
    ("change", "errcode"),
    [
        ({"token_type": 5}, "M_BAD_JSON"),
        ({"expires_in": "soon"}, "M_BAD_JSON"),
        ({"access_token": None}, "M_MISSING_PARAMS"),
        ({"matrix_server_name": None}, "M_MISSING_PARAMS"),
    ],
)
async def test_register_checks_the_optional_fields_it_is_given(
    api: Api, change: dict[str, object], errcode: str
) -> None:
    credentials = api.homeserver.issue_openid_token("@bob:hs.test", "tok-bob")
    body = {k: v for k, v in (credentials | change).items() if v is not None}
    status, answer = await api.request("POST", REGISTER, json=body)
    assert (status, answer["errcode"]) == (400, errcode)
    assert api.homeserver.requests == []
