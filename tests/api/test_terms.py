"""``/v2/terms``: listing policies, accepting them and enforcement on authenticated endpoints."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from appservice.app import IdentityServer
from appservice.config import PolicyConfig, PolicyDocument, TermsConfig
from tests.api.test_bind import BIND, UNBIND, validated_session
from tests.api.test_validation import (
    EMAIL_REQUEST,
    EMAIL_SUBMIT,
    GET_VALIDATED,
    MSISDN_REQUEST,
    link_from_mail,
    request_email,
)
from tests.support.api_server import Api

TERMS = "/_matrix/identity/v2/terms"
ACCOUNT = "/_matrix/identity/v2/account"
PRIVACY_EN = "https://example.org/privacy-1.0-en.html"
PRIVACY_FR = "https://example.org/privacy-1.0-fr.html"
TOS_EN = "https://example.org/tos-2-en.html"
TOS_V3 = "https://example.org/tos-3-en.html"


@pytest.fixture
def config_yaml() -> str:
    return f"""
terms:
  policies:
    privacy_policy:
      version: "1.0"
      languages:
        en: {{name: Privacy Policy, url: "{PRIVACY_EN}"}}
        fr: {{name: Politique de confidentialité, url: "{PRIVACY_FR}"}}
    terms_of_service:
      version: "2"
      languages:
        en: {{name: Terms of Service, url: "{TOS_EN}"}}
"""


async def test_get_terms_lists_policies_without_auth(api: Api) -> None:
    status, body = await api.request("GET", TERMS)
    assert status == 200
    assert body == {
        "policies": {
            "privacy_policy": {
                "version": "1.0",
                "en": {"name": "Privacy Policy", "url": PRIVACY_EN},
                "fr": {"name": "Politique de confidentialité", "url": PRIVACY_FR},
            },
            "terms_of_service": {
                "version": "2",
                "en": {"name": "Terms of Service", "url": TOS_EN},
            },
        }
    }


async def test_authenticated_endpoints_need_terms_accepted(api: Api) -> None:
    _, token = await api.register()
    for method, path in [
        ("GET", "/_matrix/identity/v2/account"),
        ("GET", "/_matrix/identity/v2/hash_details"),
    ]:
        status, body = await api.request(method, path, token=token)
        assert (status, body["errcode"]) == (403, "M_TERMS_NOT_SIGNED")


async def test_lookup_needs_terms_accepted(api: Api) -> None:
    _, token = await api.register()
    status, body = await api.request(
        "POST",
        "/_matrix/identity/v2/lookup",
        token=token,
        json={"algorithm": "sha256", "pepper": "x", "addresses": []},
    )
    assert (status, body["errcode"]) == (403, "M_TERMS_NOT_SIGNED")


async def test_acceptance_is_appended_and_any_language_counts(api: Api) -> None:
    user_id, token = await api.register()
    assert await api.request("POST", TERMS, token=token, json={"user_accepts": [PRIVACY_FR]}) == (
        200,
        {},
    )
    status, body = await api.request("GET", "/_matrix/identity/v2/account", token=token)
    assert (status, body["errcode"]) == (403, "M_TERMS_NOT_SIGNED")
    assert "terms_of_service" in body["error"]
    assert await api.request("POST", TERMS, token=token, json={"user_accepts": [TOS_EN]}) == (
        200,
        {},
    )
    assert await api.request("GET", "/_matrix/identity/v2/account", token=token) == (
        200,
        {"user_id": user_id},
    )


async def test_logout_does_not_need_terms(api: Api) -> None:
    _, token = await api.register()
    assert await api.request("POST", "/_matrix/identity/v2/account/logout", token=token) == (
        200,
        {},
    )


async def test_post_terms_needs_auth(api: Api) -> None:
    status, body = await api.request("POST", TERMS, json={"user_accepts": [TOS_EN]})
    assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")


async def test_post_terms_needs_user_accepts_list(api: Api) -> None:
    _, token = await api.register()
    status, body = await api.request("POST", TERMS, token=token, json={})
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")
    status, body = await api.request("POST", TERMS, token=token, json={"user_accepts": "x"})
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")


async def test_unknown_urls_are_ignored(api: Api) -> None:
    _, token = await api.register()
    await api.request("POST", TERMS, token=token, json={"user_accepts": ["https://evil.example/x"]})
    rows = await api.server.db.fetch("SELECT url FROM terms_acceptances")
    assert rows == []


async def accept_terms(api: Api, token: str, urls: tuple[str, ...] = (PRIVACY_EN, TOS_EN)) -> None:
    assert await api.request("POST", TERMS, token=token, json={"user_accepts": list(urls)}) == (
        200,
        {},
    )


@contextlib.asynccontextmanager
async def restarted_with_tos_v3(api: Api) -> AsyncIterator[Api]:
    """The operator publishes version 3 of the terms of service and restarts on the same database
    (and clock, mail and SMS doubles); yields a client of the restarted server."""
    config = api.server.config
    policies = dict(config.terms.policies)
    policies["terms_of_service"] = PolicyConfig(
        version="3", languages={"en": PolicyDocument("Terms of Service", TOS_V3)}
    )
    restarted = IdentityServer(
        dataclasses.replace(config, terms=TermsConfig(policies=policies)), clock=api.server.clock
    )
    await restarted.start()
    client = TestClient(TestServer(restarted.public_app()))
    await client.start_server()
    try:
        yield Api(client, restarted, api.homeserver, api.smtp, api.twilio, api.signing_homeserver)
    finally:
        await client.close()
        await restarted.stop()


async def test_new_policy_version_must_be_accepted_again(api: Api) -> None:
    user_id, token = await api.register()
    await accept_terms(api, token)
    assert (await api.request("GET", ACCOUNT, token=token))[0] == 200

    async with restarted_with_tos_v3(api) as restarted:
        status, body = await restarted.request("GET", ACCOUNT, token=token)
        assert (status, body["errcode"]) == (403, "M_TERMS_NOT_SIGNED")
        await accept_terms(restarted, token, (TOS_V3,))
        assert await restarted.request("GET", ACCOUNT, token=token) == (200, {"user_id": user_id})


# Validation sessions and binds are authenticated too; the email link and unbind are not.

PENDING_EMAIL = "pending@example.com"
VALIDATED_EMAIL = "validated@example.com"
VALIDATED_SECRET = "v-secret"


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Sessions made by a user who accepted the terms, so that requests using them are valid."""

    pending: dict[str, str]  # sid, client_secret and token of a session not yet validated
    validated_sid: str  # a validated session of VALIDATED_EMAIL (client_secret VALIDATED_SECRET)


async def prepare_sessions(api: Api) -> Prepared:
    _, token = await api.register("alice")
    await accept_terms(api, token)
    assert (await request_email(api, token, email=PENDING_EMAIL, secret="p-secret"))[0] == 200
    await api.smtp.wait_for(1)
    pending = link_from_mail(api, 0)
    validated_sid = await validated_session(api, token, VALIDATED_EMAIL, secret=VALIDATED_SECRET)
    return Prepared(pending, validated_sid)


def request_for(endpoint: str, user_id: str, prepared: Prepared) -> tuple[str, str, Any]:
    """(method, path, JSON body) of a request to ``endpoint`` with valid fields."""
    validated = f"sid={prepared.validated_sid}&client_secret={VALIDATED_SECRET}"
    return {
        "email/requestToken": (
            "POST",
            EMAIL_REQUEST,
            {"client_secret": "b-secret", "email": "bob@example.com", "send_attempt": 1},
        ),
        "msisdn/requestToken": (
            "POST",
            MSISDN_REQUEST,
            {
                "client_secret": "b-secret",
                "country": "GB",
                "phone_number": "020 7946 0018",
                "send_attempt": 1,
            },
        ),
        "email/submitToken": ("POST", EMAIL_SUBMIT, prepared.pending),
        "3pid/bind": (
            "POST",
            BIND,
            {"sid": prepared.validated_sid, "client_secret": VALIDATED_SECRET, "mxid": user_id},
        ),
        "3pid/getValidated3pid": ("GET", f"{GET_VALIDATED}?{validated}", None),
    }[endpoint]


async def stored_and_sent(api: Api) -> dict[str, Any]:
    """Everything a request to these endpoints could change or send."""
    db = api.server.db
    sessions = await db.fetch(
        "SELECT sid, address, token_hash, send_attempt, modified_ts, validated_ts,"
        " failed_attempts FROM validation_sessions ORDER BY sid"
    )
    bindings = await db.fetch("SELECT medium, address, mxid FROM bindings ORDER BY address")
    return {
        "sessions": [tuple(row) for row in sessions],
        "bindings": [tuple(row) for row in bindings],
        "mails": len(api.smtp.mails),
        "smtp_connections": api.smtp.connections,
        "sms": len(api.twilio.messages),
    }


@pytest.mark.parametrize(
    "endpoint",
    [
        "email/requestToken",
        "msisdn/requestToken",
        "email/submitToken",
        "3pid/bind",
        "3pid/getValidated3pid",
    ],
)
async def test_validation_and_bind_need_terms_accepted(api: Api, endpoint: str) -> None:
    prepared = await prepare_sessions(api)
    bob, token = await api.register("bob")
    method, path, body = request_for(endpoint, bob, prepared)
    before = await stored_and_sent(api)

    status, answer = await api.request(method, path, token=token, json=body)
    assert (status, answer["errcode"]) == (403, "M_TERMS_NOT_SIGNED")
    assert "privacy_policy" in answer["error"] and "terms_of_service" in answer["error"]
    assert VALIDATED_EMAIL not in str(answer)
    assert await stored_and_sent(api) == before  # nothing stored, validated, bound or sent

    # The very same request works once the terms are accepted: the 403 was the terms.
    await accept_terms(api, token)
    status, answer = await api.request(method, path, token=token, json=body)
    assert status == 200, answer
    db = api.server.db
    if endpoint == "email/requestToken":
        assert isinstance(answer["sid"], str) and answer["sid"]
        mails = await api.smtp.wait_for(before["mails"] + 1)
        assert mails[-1].rcpt_tos == ("bob@example.com",)
        assert link_from_mail(api)["sid"] == answer["sid"]
    elif endpoint == "msisdn/requestToken":
        assert isinstance(answer["sid"], str) and answer["sid"]
        assert [sms.to for sms in api.twilio.messages] == ["+442079460018"]
        query = "SELECT address FROM validation_sessions WHERE sid = $1"
        assert await db.fetchval(query, answer["sid"]) == "442079460018"
    elif endpoint == "email/submitToken":
        assert answer == {"success": True}
        query = "SELECT validated_ts FROM validation_sessions WHERE sid = $1"
        assert await db.fetchval(query, prepared.pending["sid"]) == api.server.clock.now_ms()
    elif endpoint == "3pid/bind":
        assert (answer["mxid"], answer["medium"], answer["address"]) == (
            bob,
            "email",
            VALIDATED_EMAIL,
        )
        assert (await stored_and_sent(api))["bindings"] == [("email", VALIDATED_EMAIL, bob)]
    else:
        assert (answer["medium"], answer["address"]) == ("email", VALIDATED_EMAIL)


async def test_email_link_works_for_a_user_with_new_terms_to_accept(api: Api) -> None:
    _, token = await api.register()
    await accept_terms(api, token)
    status, body = await request_email(api, token)
    assert status == 200
    await api.smtp.wait_for(1)
    link = link_from_mail(api)
    assert link["sid"] == body["sid"]
    validated_ts = "SELECT validated_ts FROM validation_sessions WHERE sid = $1"

    async with restarted_with_tos_v3(api) as restarted:
        # The user now has terms to accept: the authenticated JSON submitToken is refused...
        status, answer = await restarted.request("POST", EMAIL_SUBMIT, token=token, json=link)
        assert (status, answer["errcode"]) == (403, "M_TERMS_NOT_SIGNED")
        assert await restarted.server.db.fetchval(validated_ts, link["sid"]) is None
        # ...but the link in the email, which carries no access token, still validates.
        async with restarted.client.get(EMAIL_SUBMIT, params=link, allow_redirects=False) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            page = await resp.text()
        assert "<html" in page and "verified" in page.lower()
        assert await restarted.server.db.fetchval(validated_ts, link["sid"]) == (
            api.server.clock.now_ms()
        )


async def test_unbind_with_session_works_for_a_user_with_new_terms_to_accept(api: Api) -> None:
    user_id, token = await api.register("alice")
    await accept_terms(api, token)
    sid = await validated_session(api, token)
    status, _ = await api.request(
        "POST", BIND, token=token, json={"sid": sid, "client_secret": "s3cret", "mxid": user_id}
    )
    assert status == 200
    count = "SELECT COUNT(*) FROM bindings WHERE address = 'alice@example.com'"
    assert await api.server.db.fetchval(count) == 1

    async with restarted_with_tos_v3(api) as restarted:
        status, answer = await restarted.request("GET", ACCOUNT, token=token)
        assert (status, answer["errcode"]) == (403, "M_TERMS_NOT_SIGNED")
        status, answer = await restarted.request(
            "POST",
            UNBIND,
            json={
                "sid": sid,
                "client_secret": "s3cret",
                "mxid": user_id,
                "threepid": {"medium": "email", "address": "alice@example.com"},
            },
        )
        assert (status, answer) == (200, {})
        assert await restarted.server.db.fetchval(count) == 0


async def test_unbind_signed_by_the_homeserver_ignores_terms(api: Api) -> None:
    await api.add_binding("email", "bob@example.com", "@bob:signing.test")
    body = {
        "mxid": "@bob:signing.test",
        "threepid": {"medium": "email", "address": "bob@example.com"},
    }
    auth = api.signing_homeserver.sign_request("POST", UNBIND, "id.test", body)
    status, answer = await api.request("POST", UNBIND, json=body, headers={"Authorization": auth})
    assert (status, answer) == (200, {})
    count = "SELECT COUNT(*) FROM bindings WHERE address = 'bob@example.com'"
    assert await api.server.db.fetchval(count) == 0
