"""Phone numbers through a real Synapse that uses our server as its SMS delegate
(``account_threepid_delegates.msisdn``): Synapse relays requestToken and submitToken to our v1
delegate paths and asks getValidated3pid; the SMS goes through the Twilio connector to a
loopback fake of Twilio's API."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from appservice.crypto.hashing import lookup_hash
from tests.e2e.conftest import RunningIdentityServer
from tests.e2e.flows import V2, bind_through_synapse, register_everywhere
from tests.support.synapse import SynapseServer, ensure_synapse_venv
from tests.support.tls import TestCertificates
from tests.support.twilio import FakeTwilio

pytestmark = pytest.mark.e2e

PASSWORD = "a long test password"
CLIENT = "/_matrix/client/v3"
# Synapse's submit_url path (MSC2078): the client gives the code to the homeserver.
SUBMIT_PATH = "/_matrix/client/unstable/add_threepid/msisdn/submit_token"


@pytest.fixture
def identity_port(msisdn_delegate_port: int) -> int:
    """Our server listens where the session's Synapse expects its SMS delegate."""
    return msisdn_delegate_port


@pytest.fixture
def delegate_settings() -> dict[str, Any]:
    """Extra settings of a test class (rate limits, networks)."""
    return {}


@pytest.fixture
def identity_settings(twilio: FakeTwilio, delegate_settings: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "notifications": {
            "sms": {
                "connector": "twilio",
                "twilio": {
                    "account_sid": twilio.account_sid,
                    "auth_token": twilio.auth_token,
                    "from_number": "+15005550006",
                    "base_url": twilio.base_url,
                },
            }
        },
        # Synapse calls from loopback: only it may use the delegate paths.
        "api": {"msisdn_delegate": {"allowed_networks": ["127.0.0.0/8", "::1/128"]}},
    }
    for key, value in delegate_settings.items():
        settings[key] = {**settings.get(key, {}), **value}
    return settings


def code_from(twilio: FakeTwilio, to: str) -> str:
    """The code in the last SMS to ``to``."""
    bodies = [sms.body for sms in twilio.messages if sms.to == to]
    assert bodies, f"no SMS to {to}: {twilio.messages}"
    match = re.search(r"\b(\d{6})\b", bodies[-1])
    assert match, bodies[-1]
    return match.group(1)


async def request_token(
    synapse: SynapseServer,
    hs_token: str | None,
    number: str,
    secret: str,
    attempt: int = 1,
    path: str = f"{CLIENT}/account/3pid/msisdn/requestToken",
) -> tuple[int, Any]:
    return await synapse.client_request(
        "POST",
        path,
        hs_token,
        json={
            "client_secret": secret,
            "country": "GB",
            "phone_number": number,
            "send_attempt": attempt,
        },
    )


async def submit_code(
    synapse: SynapseServer, submit_url: str, sid: str, secret: str, code: str
) -> tuple[int, Any]:
    """POST the code to Synapse's ``submit_url``. Its host is Synapse's public_baseurl (here the
    federation listener's name); the client-server listener serves the same path."""
    assert urlsplit(submit_url).path == SUBMIT_PATH, submit_url
    return await synapse.client_request(
        "POST", SUBMIT_PATH, json={"sid": sid, "client_secret": secret, "token": code}
    )


async def add_threepid(
    synapse: SynapseServer, user_id: str, hs_token: str, sid: str, secret: str
) -> tuple[int, Any]:
    """``POST /account/3pid/add`` with user-interactive auth (m.login.password)."""
    path = f"{CLIENT}/account/3pid/add"
    body: dict[str, Any] = {"sid": sid, "client_secret": secret}
    status, challenge = await synapse.client_request("POST", path, hs_token, json=body)
    assert status == 401, challenge
    assert ["m.login.password"] in [flow["stages"] for flow in challenge["flows"]], challenge
    body["auth"] = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user_id},
        "password": PASSWORD,
        "session": challenge["session"],
    }
    return await synapse.client_request("POST", path, hs_token, json=body)


async def account_threepids(synapse: SynapseServer, hs_token: str) -> list[dict[str, Any]]:
    status, body = await synapse.client_request("GET", f"{CLIENT}/account/3pid", hs_token)
    assert status == 200, body
    threepids: list[dict[str, Any]] = body["threepids"]
    return threepids


async def lookup_msisdn(ids: RunningIdentityServer, is_token: str, msisdn: str) -> str | None:
    """The Matrix ID a hashed lookup finds for a phone number."""
    _, details = await ids.request("GET", f"{V2}/hash_details", token=is_token)
    pepper = details["lookup_pepper"]
    h = lookup_hash(msisdn, "msisdn", pepper)
    status, body = await ids.request(
        "POST",
        f"{V2}/lookup",
        token=is_token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": [h]},
    )
    assert status == 200, body
    mxid: str | None = body["mappings"].get(h)
    return mxid


async def test_user_adds_validates_and_binds_a_phone_number(
    synapse: SynapseServer, identity_server: RunningIdentityServer, twilio: FakeTwilio
) -> None:
    ids = identity_server
    user_id, hs_token, is_token = await register_everywhere(synapse, ids, "phoebe")
    secret = "phoebes-secret"
    started = time.perf_counter()

    # Synapse relays requestToken to our delegate path; the SMS goes to (fake) Twilio.
    status, body = await request_token(synapse, hs_token, "020 7946 0101", secret)
    assert status == 200, body
    sid, submit_url = body["sid"], body["submit_url"]
    code = code_from(twilio, "+442079460101")
    requested = time.perf_counter()

    # The user gives the code to Synapse, which relays it to our submitToken.
    assert await submit_code(synapse, submit_url, sid, secret, code) == (200, {"success": True})
    # Synapse asks our getValidated3pid, then adds the number to the account.
    status, body = await add_threepid(synapse, user_id, hs_token, sid, secret)
    assert (status, body) == (200, {}), body
    added = time.perf_counter()
    threepids = await account_threepids(synapse, hs_token)
    assert [(t["medium"], t["address"]) for t in threepids] == [("msisdn", "442079460101")]

    # Bound here (Synapse calls /v2/3pid/bind with the same session), found by hashed lookup.
    await bind_through_synapse(synapse, ids, hs_token, is_token, sid, secret)
    assert await lookup_msisdn(ids, is_token, "442079460101") == user_id
    bound = time.perf_counter()
    print(
        f"\nmsisdn via Synapse: requestToken+SMS {1000 * (requested - started):.0f} ms, "
        f"submit+3pid/add {1000 * (added - requested):.0f} ms, "
        f"bind+lookup {1000 * (bound - added):.0f} ms, total {1000 * (bound - started):.0f} ms"
    )


async def test_wrong_code_as_synapse_shows_it(
    synapse: SynapseServer, identity_server: RunningIdentityServer, twilio: FakeTwilio
) -> None:
    user_id, hs_token, _ = await register_everywhere(synapse, identity_server, "wendy")
    secret = "wendys-secret"
    status, body = await request_token(synapse, hs_token, "020 7946 0102", secret)
    assert status == 200, body
    good = code_from(twilio, "+442079460102")
    wrong = "000000" if good != "000000" else "111111"
    # Synapse hides our M_TOKEN_INCORRECT behind its own 400.
    status, err = await submit_code(synapse, body["submit_url"], body["sid"], secret, wrong)
    assert (status, err["errcode"]) == (400, "M_UNKNOWN"), err
    assert err["error"] == "Error contacting the identity server"
    # Our getValidated3pid says "not validated": Synapse refuses to add the number.
    status, err = await add_threepid(synapse, user_id, hs_token, body["sid"], secret)
    assert (status, err["errcode"]) == (400, "M_THREEPID_AUTH_FAILED"), err
    # The right code still works (attempts left).
    status, ok = await submit_code(synapse, body["submit_url"], body["sid"], secret, good)
    assert (status, ok) == (200, {"success": True})
    assert (await add_threepid(synapse, user_id, hs_token, body["sid"], secret))[0] == 200


async def test_used_up_attempts_as_synapse_shows_them(
    synapse: SynapseServer, identity_server: RunningIdentityServer, twilio: FakeTwilio
) -> None:
    user_id, hs_token, _ = await register_everywhere(synapse, identity_server, "ursula")
    secret = "ursulas-secret"
    _, body = await request_token(synapse, hs_token, "020 7946 0105", secret)
    good = code_from(twilio, "+442079460105")
    wrong = "000000" if good != "000000" else "111111"
    for _ in range(5):  # session.max_attempts
        status, _err = await submit_code(synapse, body["submit_url"], body["sid"], secret, wrong)
        assert status == 400
    status, err = await submit_code(synapse, body["submit_url"], body["sid"], secret, good)
    assert (status, err["errcode"]) == (400, "M_UNKNOWN"), err
    status, err = await add_threepid(synapse, user_id, hs_token, body["sid"], secret)
    assert (status, err["errcode"]) == (400, "M_THREEPID_AUTH_FAILED"), err


async def test_expired_session_as_synapse_shows_it(
    synapse: SynapseServer, identity_server: RunningIdentityServer, twilio: FakeTwilio
) -> None:
    ids = identity_server
    user_id, hs_token, _ = await register_everywhere(synapse, ids, "edith")
    secret = "ediths-secret"
    status, body = await request_token(synapse, hs_token, "020 7946 0103", secret)
    assert status == 200, body
    code = code_from(twilio, "+442079460103")
    # Age the session past session.lifetime (24 h) instead of waiting for it.
    lifetime_ms = 24 * 3600 * 1000
    await ids.server.db.execute(
        "UPDATE validation_sessions SET modified_ts = modified_ts - $1 WHERE sid = $2",
        lifetime_ms + 1000,
        body["sid"],
    )
    status, err = await submit_code(synapse, body["submit_url"], body["sid"], secret, code)
    assert (status, err["errcode"]) == (400, "M_UNKNOWN"), err
    status, err = await add_threepid(synapse, user_id, hs_token, body["sid"], secret)
    assert (status, err["errcode"]) == (400, "M_THREEPID_AUTH_FAILED"), err
    # Asking again starts a new session with a new code, which works.
    status, again = await request_token(synapse, hs_token, "020 7946 0103", secret)
    assert status == 200, again
    assert again["sid"] != body["sid"]
    code = code_from(twilio, "+442079460103")
    assert (await submit_code(synapse, again["submit_url"], again["sid"], secret, code))[0] == 200
    assert (await add_threepid(synapse, user_id, hs_token, again["sid"], secret))[0] == 200


class TestRateLimit:
    @pytest.fixture
    def delegate_settings(self) -> dict[str, Any]:
        return {"ratelimits": {"msisdn_delegate_per_number": {"limit": 1, "period": "1h"}}}

    async def test_rate_limit_as_synapse_shows_it(
        self, synapse: SynapseServer, identity_server: RunningIdentityServer, twilio: FakeTwilio
    ) -> None:
        _, hs_token, _ = await register_everywhere(synapse, identity_server, "rita")
        status, body = await request_token(synapse, hs_token, "020 7946 0104", "first")
        assert status == 200, body
        # Synapse passes our 429 through, retry_after_ms included.
        status, err = await request_token(synapse, hs_token, "020 7946 0104", "second")
        assert (status, err["errcode"]) == (429, "M_LIMIT_EXCEEDED"), err
        assert 0 < err["retry_after_ms"] <= 3_600_000
        assert len(twilio.messages) == 1


class TestNotAnAllowedNetwork:
    @pytest.fixture
    def delegate_settings(self) -> dict[str, Any]:
        return {"api": {"msisdn_delegate": {"allowed_networks": ["10.0.0.0/8"]}}}

    async def test_refused_homeserver_as_synapse_shows_it(
        self, synapse: SynapseServer, identity_server: RunningIdentityServer, twilio: FakeTwilio
    ) -> None:
        _, hs_token, _ = await register_everywhere(synapse, identity_server, "nora")
        status, err = await request_token(synapse, hs_token, "020 7946 0106", "secret")
        assert (status, err["errcode"]) == (403, "M_FORBIDDEN"), err
        assert twilio.requests == []


@pytest.fixture(scope="module")
def msisdn_registration_synapse(
    tmp_path_factory: pytest.TempPathFactory,
    test_certificates: TestCertificates,
    msisdn_delegate_port: int,
) -> Iterator[SynapseServer]:
    """A second Synapse (the session's one keeps its registration rules) where registering
    requires a phone number, validated by the same delegate."""
    server = SynapseServer(
        tmp_path_factory.mktemp("synapse-msisdn"),
        test_certificates,
        venv=ensure_synapse_venv(),
        extra_config={
            "enable_registration": True,
            "registrations_require_3pid": ["msisdn"],
            "account_threepid_delegates": {"msisdn": f"https://localhost:{msisdn_delegate_port}"},
        },
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_registration_with_a_phone_number(
    msisdn_registration_synapse: SynapseServer,
    identity_server: RunningIdentityServer,
    twilio: FakeTwilio,
) -> None:
    hs = msisdn_registration_synapse
    register = f"{CLIENT}/register"
    status, challenge = await hs.client_request("POST", register, json={})
    assert status == 401, challenge
    assert [flow["stages"] for flow in challenge["flows"]] == [["m.login.msisdn"]], challenge
    secret = "registering-secret"
    status, body = await request_token(
        hs, None, "020 7946 0107", secret, path=f"{CLIENT}/register/msisdn/requestToken"
    )
    assert status == 200, body
    code = code_from(twilio, "+442079460107")
    assert await submit_code(hs, body["submit_url"], body["sid"], secret, code) == (
        200,
        {"success": True},
    )
    status, registered = await hs.client_request(
        "POST",
        register,
        json={
            "username": "mobile",
            "password": PASSWORD,
            "auth": {
                "type": "m.login.msisdn",
                "threepid_creds": {"sid": body["sid"], "client_secret": secret},
                "session": challenge["session"],
            },
        },
    )
    assert status == 200, registered
    threepids = await account_threepids(hs, registered["access_token"])
    assert [(t["medium"], t["address"]) for t in threepids] == [("msisdn", "442079460107")]


async def test_registration_without_a_validated_number_is_refused(
    msisdn_registration_synapse: SynapseServer,
    identity_server: RunningIdentityServer,
    twilio: FakeTwilio,
) -> None:
    hs = msisdn_registration_synapse
    register = f"{CLIENT}/register"
    _, challenge = await hs.client_request("POST", register, json={})
    secret = "unvalidated-secret"
    status, body = await request_token(
        hs, None, "020 7946 0108", secret, path=f"{CLIENT}/register/msisdn/requestToken"
    )
    assert status == 200, body
    status, err = await hs.client_request(
        "POST",
        register,
        json={
            "username": "nocode",
            "password": PASSWORD,
            "auth": {
                "type": "m.login.msisdn",
                "threepid_creds": {"sid": body["sid"], "client_secret": secret},
                "session": challenge["session"],
            },
        },
    )
    assert status == 401, err
    assert err["errcode"] == "M_UNAUTHORIZED", err
