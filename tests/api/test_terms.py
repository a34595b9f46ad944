"""``/v2/terms``: listing policies, accepting them and enforcement on authenticated endpoints."""

from __future__ import annotations

import dataclasses

import pytest
from aiohttp.test_utils import TestClient, TestServer

from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.config import PolicyConfig, PolicyDocument, TermsConfig
from tests.support.api_server import Api

TERMS = "/_matrix/identity/v2/terms"
PRIVACY_EN = "https://example.org/privacy-1.0-en.html"
PRIVACY_FR = "https://example.org/privacy-1.0-fr.html"
TOS_EN = "https://example.org/tos-2-en.html"


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


async def test_new_policy_version_must_be_accepted_again(api: Api) -> None:
    user_id, token = await api.register()
    await api.request("POST", TERMS, token=token, json={"user_accepts": [PRIVACY_EN, TOS_EN]})
    assert (await api.request("GET", "/_matrix/identity/v2/account", token=token))[0] == 200

    # The operator publishes version 3 of the terms of service and restarts on the same database.
    config = api.server.config
    tos_v3 = "https://example.org/tos-3-en.html"
    policies = dict(config.terms.policies)
    policies["terms_of_service"] = PolicyConfig(
        version="3", languages={"en": PolicyDocument("Terms of Service", tos_v3)}
    )
    restarted = IdentityServer(
        dataclasses.replace(config, terms=TermsConfig(policies=policies)), clock=FakeClock()
    )
    await restarted.start()
    client = TestClient(TestServer(restarted.public_app()))
    await client.start_server()
    try:
        headers = {"Authorization": f"Bearer {token}"}
        async with client.get("/_matrix/identity/v2/account", headers=headers) as resp:
            assert resp.status == 403
            assert (await resp.json())["errcode"] == "M_TERMS_NOT_SIGNED"
        async with client.post(TERMS, headers=headers, json={"user_accepts": [tos_v3]}) as resp:
            assert resp.status == 200
        async with client.get("/_matrix/identity/v2/account", headers=headers) as resp:
            assert (resp.status, await resp.json()) == (200, {"user_id": user_id})
    finally:
        await client.close()
        await restarted.stop()
