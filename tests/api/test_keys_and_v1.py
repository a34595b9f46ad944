"""Public key endpoints (v2 and v1) and the legacy v1 lookups."""

from __future__ import annotations

import asyncio

import pytest
import signedjson.key
import signedjson.sign
from unpaddedbase64 import decode_base64

from appservice.clock import FakeClock
from tests.support.api_server import Api

V2 = "/_matrix/identity/v2"
V1 = "/_matrix/identity/api/v1"


def _urlsafe(key: str) -> str:
    return key.replace("+", "-").replace("/", "_")


@pytest.mark.parametrize("prefix", [V2, V1])
async def test_pubkey_serves_the_current_key(api: Api, prefix: str) -> None:
    current = api.server.keyring.current
    assert current.key_id == "ed25519:0"
    status, body = await api.request("GET", f"{prefix}/pubkey/ed25519:0")
    assert (status, body) == (200, {"public_key": current.public_key})
    assert len(decode_base64(body["public_key"])) == 32


@pytest.mark.parametrize("key_id", ["ed25519:nope", "ed25519:%00", "%00", "x" * 3000])
async def test_unknown_key_is_404_not_found(api: Api, key_id: str) -> None:
    status, body = await api.request("GET", f"{V2}/pubkey/{key_id}")
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")


@pytest.mark.parametrize("prefix", [V2, V1])
async def test_isvalid_accepts_current_key_in_either_alphabet(api: Api, prefix: str) -> None:
    key = api.server.keyring.current.public_key
    for spelling in (key, _urlsafe(key), key + "="):
        assert await api.request("GET", f"{prefix}/pubkey/isvalid?public_key={_q(spelling)}") == (
            200,
            {"valid": True},
        )


def _q(value: str) -> str:
    return value.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")


async def test_isvalid_is_false_for_other_keys(api: Api) -> None:
    other = signedjson.key.encode_verify_key_base64(
        signedjson.key.get_verify_key(signedjson.key.generate_signing_key("x"))
    )
    for value in (other, "not base64!", ""):
        assert await api.request("GET", f"{V2}/pubkey/isvalid?public_key={_q(value)}") == (
            200,
            {"valid": False},
        )


async def test_isvalid_needs_public_key(api: Api) -> None:
    status, body = await api.request("GET", f"{V2}/pubkey/isvalid")
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")


async def test_ephemeral_isvalid_is_false_for_a_long_term_key(api: Api) -> None:
    key = api.server.keyring.current.public_key
    assert await api.request("GET", f"{V2}/pubkey/ephemeral/isvalid?public_key={_q(key)}") == (
        200,
        {"valid": False},
    )


class TestV1Enabled:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "api: {v1_enabled: true}"

    async def test_v1_status(self, api: Api) -> None:
        assert await api.request("GET", V1) == (200, {})

    async def test_v1_lookup_returns_signed_association(self, api: Api) -> None:
        await api.add_binding("email", "alice@example.com", "@alice:hs.test")
        status, body = await api.request(
            "GET", f"{V1}/lookup?medium=email&address=Alice@Example.com"
        )
        assert status == 200
        assert body["mxid"] == "@alice:hs.test"
        assert body["address"] == "alice@example.com"
        assert body["medium"] == "email"
        assert body["not_before"] <= body["ts"] < body["not_after"]
        server_name = api.server.config.server.name
        verify_key = signedjson.key.decode_verify_key_base64(
            "ed25519", "0", api.server.keyring.current.public_key
        )
        signedjson.sign.verify_signed_json(body, server_name, verify_key)

    async def test_v1_lookup_of_unbound_address_is_empty(self, api: Api) -> None:
        assert await api.request("GET", f"{V1}/lookup?medium=email&address=x@example.com") == (
            200,
            {},
        )
        assert await api.request("GET", f"{V1}/lookup?medium=fax&address=1") == (200, {})

    async def test_v1_lookup_needs_medium_and_address(self, api: Api) -> None:
        status, body = await api.request("GET", f"{V1}/lookup?medium=email")
        assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")

    async def test_v1_bulk_lookup(self, api: Api) -> None:
        await api.add_binding("email", "alice@example.com", "@alice:hs.test")
        await api.add_binding("msisdn", "447700900001", "@bob:hs.test")
        status, body = await api.request(
            "POST",
            f"{V1}/bulk_lookup",
            json={
                "threepids": [
                    ["email", "alice@example.com"],
                    ["msisdn", "447700900001"],
                    ["email", "nobody@example.com"],
                ]
            },
        )
        assert status == 200
        assert sorted(body["threepids"]) == [
            ["email", "alice@example.com", "@alice:hs.test"],
            ["msisdn", "447700900001", "@bob:hs.test"],
        ]

    async def test_v1_bulk_lookup_checks_shape(self, api: Api) -> None:
        status, body = await api.request(
            "POST", f"{V1}/bulk_lookup", json={"threepids": [["email"]]}
        )
        assert (status, body["errcode"]) == (400, "M_BAD_JSON")
        status, body = await api.request("POST", f"{V1}/bulk_lookup", json={})
        assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")


async def test_v1_lookups_are_off_by_default(api: Api) -> None:
    assert api.server.config.api.v1_enabled is False
    for method, path in (
        ("GET", V1),
        ("GET", f"{V1}/lookup?medium=email&address=a@b.c"),
        ("POST", f"{V1}/bulk_lookup"),
    ):
        status, body = await api.request(method, path, json={"threepids": [["email", "a@b.c"]]})
        assert (status, body["errcode"]) == (404, "M_UNRECOGNIZED"), path
    assert await api.server.db.fetchval("SELECT COUNT(*) FROM rate_limits") == 0


async def test_v1_key_and_unbind_paths_are_served_without_v1_lookups(api: Api) -> None:
    """Homeservers still reach these through URLs in existing rooms' invite events."""
    key = api.server.keyring.current.public_key
    assert await api.request("GET", f"{V1}/pubkey/isvalid?public_key={_q(key)}") == (
        200,
        {"valid": True},
    )
    assert await api.request("GET", f"{V1}/pubkey/ephemeral/isvalid?public_key={_q(key)}") == (
        200,
        {"valid": False},
    )
    assert (await api.request("GET", f"{V1}/pubkey/ed25519:0"))[0] == 200
    # Routed (and refused for want of any authorisation), not 404.
    status, body = await api.request(
        "POST",
        f"{V1}/3pid/unbind",
        json={"mxid": "@a:hs.test", "threepid": {"medium": "email", "address": "a@b.c"}},
    )
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")


class TestV1LookupRateLimit:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "api: {v1_enabled: true}\nratelimits: {v1_lookup_per_ip: {limit: 5, period: 1h}}"

    async def test_each_address_counts_and_the_limit_refuses_with_retry_after(
        self, api: Api, clock: FakeClock
    ) -> None:
        await api.add_binding("email", "alice@example.com", "@alice:hs.test")
        bulk = {"threepids": [["email", f"u{i}@example.com"] for i in range(3)]}
        assert (await api.request("POST", f"{V1}/bulk_lookup", json=bulk))[0] == 200
        for _ in range(2):
            status, _body = await api.request(
                "GET", f"{V1}/lookup?medium=email&address=alice@example.com"
            )
            assert status == 200
        # 3 + 1 + 1 addresses: the budget is spent.
        async with api.client.get(f"{V1}/lookup?medium=email&address=alice@example.com") as resp:
            assert resp.status == 429
            body = await resp.json()
            assert body["errcode"] == "M_LIMIT_EXCEEDED"
            assert 0 < body["retry_after_ms"] <= 3_600_000
            assert int(resp.headers["Retry-After"]) > 0
        status, body = await api.request("POST", f"{V1}/bulk_lookup", json=bulk)
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        clock.advance(3600)
        assert (await api.request("POST", f"{V1}/bulk_lookup", json=bulk))[0] == 200
        status, body = await api.request("POST", f"{V1}/bulk_lookup", json=bulk)
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")

    async def test_a_bulk_lookup_larger_than_the_limit_is_400(self, api: Api) -> None:
        bulk = {"threepids": [["email", f"u{i}@example.com"] for i in range(6)]}
        status, body = await api.request("POST", f"{V1}/bulk_lookup", json=bulk)
        assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
        assert await api.server.db.fetchval("SELECT COUNT(*) FROM rate_limits") == 0

    async def test_the_limit_holds_under_concurrency(self, api: Api) -> None:
        await api.add_binding("email", "alice@example.com", "@alice:hs.test")
        path = f"{V1}/lookup?medium=email&address=alice@example.com"
        results = await asyncio.gather(*(api.request("GET", path) for _ in range(300)))
        statuses = sorted(status for status, _ in results)
        assert statuses.count(200) == 5
        assert statuses.count(429) == 295
