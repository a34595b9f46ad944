"""The SMS delegate paths a homeserver calls (``account_threepid_delegates.msisdn``): v1
``validate/msisdn/requestToken|submitToken`` and ``3pid/getValidated3pid``, without a token."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from appservice.clock import FakeClock
from appservice.config import ConfigError, load_config_text
from tests.support.api_server import Api

V1 = "/_matrix/identity/api/v1"
REQUEST = f"{V1}/validate/msisdn/requestToken"
SUBMIT = f"{V1}/validate/msisdn/submitToken"
GET_VALIDATED = f"{V1}/3pid/getValidated3pid"
NUMBER = "020 7946 0018"
MSISDN = "442079460018"


async def request_token(
    api: Api,
    number: str = NUMBER,
    secret: str = "s3cret",
    attempt: int = 1,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    return await api.request(
        "POST",
        REQUEST,
        json={
            "client_secret": secret,
            "country": "GB",
            "phone_number": number,
            "send_attempt": attempt,
        },
        headers=headers,
    )


def last_code(api: Api) -> str:
    """The code in the last SMS the fake Twilio accepted."""
    match = re.search(r"\b(\d{6})\b", api.twilio.messages[-1].body)
    assert match, api.twilio.messages[-1].body
    return match.group(1)


async def submit(
    api: Api, sid: str, token: str, secret: str = "s3cret", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    return await api.request(
        "POST",
        SUBMIT,
        json={"sid": sid, "client_secret": secret, "token": token},
        headers=headers,
    )


async def get_validated(
    api: Api, sid: str, secret: str = "s3cret", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    return await api.request(
        "GET", f"{GET_VALIDATED}?sid={sid}&client_secret={secret}", headers=headers
    )


async def test_delegate_validates_a_number_without_an_access_token(
    api: Api, clock: FakeClock
) -> None:
    status, body = await request_token(api)
    assert status == 200, body
    sid = body["sid"]
    assert [sms.to for sms in api.twilio.messages] == [f"+{MSISDN}"]

    status, body = await get_validated(api, sid)
    assert (status, body["errcode"]) == (400, "M_SESSION_NOT_VALIDATED")

    clock.advance(5)
    assert await submit(api, sid, last_code(api)) == (200, {"success": True})
    assert await get_validated(api, sid) == (
        200,
        {"medium": "msisdn", "address": MSISDN, "validated_at": clock.now_ms()},
    )


async def test_number_validated_through_the_delegate_binds_with_v2(api: Api) -> None:
    _, body = await request_token(api)
    sid = body["sid"]
    assert (await submit(api, sid, last_code(api)))[0] == 200
    user_id, token = await api.register()
    status, bound = await api.request(
        "POST",
        "/_matrix/identity/v2/3pid/bind",
        token=token,
        json={"sid": sid, "client_secret": "s3cret", "mxid": user_id},
    )
    assert status == 200, bound
    assert (bound["medium"], bound["address"], bound["mxid"]) == ("msisdn", MSISDN, user_id)


async def test_send_attempt_repeats_nothing_and_a_higher_one_sends_a_new_code(api: Api) -> None:
    _, first = await request_token(api, attempt=1)
    _, again = await request_token(api, attempt=1)
    assert again["sid"] == first["sid"]
    assert len(api.twilio.messages) == 1
    old_code = last_code(api)
    _, resent = await request_token(api, attempt=2)
    assert resent["sid"] == first["sid"]
    assert len(api.twilio.messages) == 2
    new_code = last_code(api)
    if new_code != old_code:  # one in a million they are equal
        status, err = await submit(api, first["sid"], old_code)
        assert (status, err["errcode"]) == (400, "M_TOKEN_INCORRECT")
    assert await submit(api, first["sid"], new_code) == (200, {"success": True})


async def test_wrong_code_counts_until_the_session_dies(api: Api) -> None:
    _, body = await request_token(api)
    sid = body["sid"]
    good = last_code(api)
    wrong = "000000" if good != "000000" else "111111"
    for left in (4, 3, 2, 1, 0):
        status, err = await submit(api, sid, wrong)
        assert (status, err["errcode"]) == (400, "M_TOKEN_INCORRECT")
        assert f"({left} attempt" in err["error"]
    status, err = await submit(api, sid, good)
    assert (status, err["errcode"]) == (400, "M_SESSION_EXPIRED")
    status, err = await get_validated(api, sid)
    assert (status, err["errcode"]) == (400, "M_SESSION_NOT_VALIDATED")


async def test_wrong_codes_at_once_are_compared_at_most_max_attempts_times(api: Api) -> None:
    _, body = await request_token(api)
    sid = body["sid"]
    good = last_code(api)
    wrong = "000000" if good != "000000" else "111111"
    results = await asyncio.gather(*(submit(api, sid, wrong) for _ in range(200)))
    codes = [err["errcode"] for _status, err in results]
    assert codes.count("M_TOKEN_INCORRECT") == 5
    assert codes.count("M_SESSION_EXPIRED") == 195
    status, err = await submit(api, sid, good)
    assert (status, err["errcode"]) == (400, "M_SESSION_EXPIRED")


async def test_expired_session_cannot_be_validated_or_read(api: Api, clock: FakeClock) -> None:
    _, body = await request_token(api)
    sid = body["sid"]
    clock.advance(24 * 3600 + 1)
    status, err = await submit(api, sid, last_code(api))
    assert (status, err["errcode"]) == (400, "M_SESSION_EXPIRED")
    status, err = await get_validated(api, sid)
    assert (status, err["errcode"]) == (400, "M_SESSION_EXPIRED")


async def test_validated_session_expires_for_get_validated_too(api: Api, clock: FakeClock) -> None:
    _, body = await request_token(api)
    sid = body["sid"]
    assert (await submit(api, sid, last_code(api)))[0] == 200
    clock.advance(24 * 3600 + 1)
    status, err = await get_validated(api, sid)
    assert (status, err["errcode"]) == (400, "M_SESSION_EXPIRED")


async def test_unknown_session_or_wrong_secret_is_404_no_valid_session(api: Api) -> None:
    _, body = await request_token(api)
    for sid, secret in [("nope", "s3cret"), (body["sid"], "other")]:
        status, err = await submit(api, sid, "123456", secret=secret)
        assert (status, err["errcode"]) == (404, "M_NO_VALID_SESSION")
        status, err = await get_validated(api, sid, secret=secret)
        assert (status, err["errcode"]) == (404, "M_NO_VALID_SESSION")


async def test_request_checks_fields_and_the_number(api: Api) -> None:
    status, err = await api.request("POST", REQUEST, json={"client_secret": "s"})
    assert (status, err["errcode"]) == (400, "M_MISSING_PARAMS")
    assert "country" in err["error"] and "send_attempt" in err["error"]
    status, err = await request_token(api, number="12")
    assert (status, err["errcode"]) == (400, "M_INVALID_ADDRESS")
    status, err = await request_token(api, secret="not a secret!")
    assert (status, err["errcode"]) == (400, "M_INVALID_PARAM")
    status, err = await api.request("GET", f"{GET_VALIDATED}?sid=x")
    assert (status, err["errcode"]) == (400, "M_MISSING_PARAMS")
    assert api.twilio.messages == []


async def test_sms_refused_by_twilio_is_reported_and_stores_nothing(api: Api) -> None:
    api.twilio.blocked_prefixes.add("+44")
    status, err = await request_token(api)
    assert (status, err["errcode"]) == (400, "M_DESTINATION_REJECTED")
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 0


ALL_PATHS = [("POST", REQUEST), ("POST", SUBMIT), ("GET", GET_VALIDATED)]


class TestSwitchedOff:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "api: {msisdn_delegate: {enabled: false}}"

    async def test_paths_are_unrecognized(self, api: Api) -> None:
        for method, path in ALL_PATHS:
            status, err = await api.request(method, path, json={})
            assert (status, err["errcode"]) == (404, "M_UNRECOGNIZED"), path
        assert api.twilio.messages == []

    async def test_v2_msisdn_validation_is_unaffected(self, api: Api) -> None:
        _, token = await api.register()
        status, body = await api.request(
            "POST",
            "/_matrix/identity/v2/validate/msisdn/requestToken",
            token=token,
            json={"client_secret": "s", "country": "GB", "phone_number": NUMBER, "send_attempt": 1},
        )
        assert status == 200, body


class TestSwitchedOffButV1On:
    """The general v1 API serves the same paths to anyone, under the v2 request limits."""

    @pytest.fixture
    def config_yaml(self) -> str:
        return (
            "api: {v1_enabled: true, msisdn_delegate: {enabled: false}}\n"
            "ratelimits: {request_token_per_ip: {limit: 1, period: 1h}}"
        )

    async def test_paths_are_served_as_v1_under_the_v2_limits(self, api: Api) -> None:
        status, body = await request_token(api)
        assert status == 200, body
        assert (await submit(api, body["sid"], last_code(api)))[0] == 200
        assert (await get_validated(api, body["sid"]))[0] == 200
        status, err = await request_token(api, number="020 7946 0019")
        assert (status, err["errcode"]) == (429, "M_LIMIT_EXCEEDED")


class TestValidationDisabled:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "session: {policy: {validation: {enabled: false}}}"

    async def test_request_and_submit_are_403_forbidden(self, api: Api) -> None:
        status, err = await request_token(api)
        assert (status, err["errcode"]) == (403, "M_FORBIDDEN")
        status, err = await submit(api, "sid", "123456")
        assert (status, err["errcode"]) == (403, "M_FORBIDDEN")
        assert api.twilio.requests == []


class TestAllowedNetworks:
    @pytest.fixture
    def config_yaml(self) -> str:
        # The test client connects from 127.0.0.1, a trusted proxy here: X-Forwarded-For names
        # the caller, as behind a reverse proxy.
        return (
            "listen: {trusted_proxies: [127.0.0.1/32]}\n"
            "api: {msisdn_delegate: {allowed_networks: [203.0.113.0/24, '2001:db8::/32']}}"
        )

    async def test_callers_outside_are_403_forbidden_on_every_path(self, api: Api) -> None:
        for caller in ("198.51.100.7", "127.0.0.1", "2001:db9::1"):
            headers = {"X-Forwarded-For": caller}
            status, err = await request_token(api, headers=headers)
            assert (status, err["errcode"]) == (403, "M_FORBIDDEN"), caller
            status, err = await submit(api, "sid", "123456", headers=headers)
            assert (status, err["errcode"]) == (403, "M_FORBIDDEN"), caller
            status, err = await get_validated(api, "sid", headers=headers)
            assert (status, err["errcode"]) == (403, "M_FORBIDDEN"), caller
        # Without the header the caller is the proxy itself, outside too.
        status, err = await request_token(api)
        assert (status, err["errcode"]) == (403, "M_FORBIDDEN")
        assert api.twilio.requests == []
        assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 0

    async def test_a_spoofed_header_behind_the_proxy_does_not_help(self, api: Api) -> None:
        # The client sent "203.0.113.9"; the proxy appended the real peer: the rightmost
        # untrusted hop counts.
        headers = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}
        status, err = await request_token(api, headers=headers)
        assert (status, err["errcode"]) == (403, "M_FORBIDDEN")

    @pytest.mark.parametrize("caller", ["203.0.113.7", "2001:db8::7", "::ffff:203.0.113.7"])
    async def test_callers_inside_are_served(self, api: Api, caller: str) -> None:
        headers = {"X-Forwarded-For": caller}
        status, body = await request_token(api, headers=headers)
        assert status == 200, body
        assert (await submit(api, body["sid"], last_code(api), headers=headers))[0] == 200
        status, validated = await get_validated(api, body["sid"], headers=headers)
        assert (status, validated["address"]) == (200, MSISDN)


class TestAllowedNetworksWithV1On:
    """With v1 on, callers outside allowed_networks are v1 clients: served, with v2's limits."""

    @pytest.fixture
    def config_yaml(self) -> str:
        return (
            "listen: {trusted_proxies: [127.0.0.1/32]}\n"
            "api: {v1_enabled: true, msisdn_delegate: {allowed_networks: [203.0.113.0/24]}}\n"
            "ratelimits: {request_token_per_ip: {limit: 1, period: 1h}}"
        )

    async def test_outsiders_get_the_v1_limits_and_the_homeserver_its_own(self, api: Api) -> None:
        client = {"X-Forwarded-For": "198.51.100.7"}
        assert (await request_token(api, number="020 7946 0001", headers=client))[0] == 200
        status, err = await request_token(api, number="020 7946 0002", headers=client)
        assert (status, err["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        homeserver = {"X-Forwarded-For": "203.0.113.7"}
        for i in range(3, 6):
            number = f"020 7946 000{i}"
            assert (await request_token(api, number=number, headers=homeserver))[0] == 200


class TestRateLimits:
    @pytest.fixture
    def config_yaml(self) -> str:
        return (
            "ratelimits: {msisdn_delegate_per_number: {limit: 2, period: 1h},"
            " msisdn_delegate_per_ip: {limit: 4, period: 1h},"
            " request_token_per_ip: {limit: 1, period: 1h},"
            " request_token_per_address: {limit: 1, period: 1h}}"
        )

    async def test_per_number_limit(self, api: Api, clock: FakeClock) -> None:
        for secret in ("a", "b"):
            assert (await request_token(api, secret=secret))[0] == 200
        status, err = await request_token(api, secret="c")
        assert (status, err["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        assert 0 < int(err["retry_after_ms"]) <= 3_600_000
        assert len(api.twilio.messages) == 2
        # Another number is not limited by this one.
        assert (await request_token(api, number="020 7946 0019", secret="c"))[0] == 200
        clock.advance(3600)
        assert (await request_token(api, secret="d"))[0] == 200

    async def test_per_ip_limit_is_the_delegates_own(self, api: Api) -> None:
        # request_token_per_ip (1) and request_token_per_address (1) do not apply: 4 do.
        for i in range(4):
            status, body = await request_token(api, number=f"020 7946 000{i}")
            assert status == 200, body
        async with api.client.post(
            REQUEST,
            json={
                "client_secret": "s",
                "country": "GB",
                "phone_number": "020 7946 0009",
                "send_attempt": 1,
            },
        ) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) > 0
            assert (await resp.json())["errcode"] == "M_LIMIT_EXCEEDED"
        assert len(api.twilio.messages) == 4


class TestRateLimitUnderConcurrency:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "ratelimits: {msisdn_delegate_per_ip: {limit: 20, period: 1h}}"

    async def test_parallel_requests_send_at_most_the_limit(self, api: Api) -> None:
        results = await asyncio.gather(
            *(request_token(api, number=f"020 7946 0{i:03d}") for i in range(200))
        )
        statuses = [status for status, _ in results]
        assert statuses.count(200) == 20
        assert statuses.count(429) == 180
        assert len(api.twilio.messages) == 20
        assert await api.server.db.fetchval("SELECT COUNT(*) FROM validation_sessions") == 20


def test_allowed_networks_must_be_networks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"api\.msisdn_delegate\.allowed_networks\[1\]"):
        load_config_text(
            "api: {msisdn_delegate: {allowed_networks: [10.0.0.0/8, not-a-network]}}",
            tmp_path,
            environ={},
        )
    with pytest.raises(ConfigError, match=r"ratelimits\.msisdn_delegate_per_ip"):
        load_config_text(
            "ratelimits: {msisdn_delegate_per_ip: {limit: 0, period: 1h}}", tmp_path, environ={}
        )
