"""Public key endpoints (v2 and v1) and the legacy v1 lookups."""

from __future__ import annotations

import pytest
import signedjson.key
import signedjson.sign
from unpaddedbase64 import decode_base64

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


async def test_unknown_key_is_404_not_found(api: Api) -> None:
    status, body = await api.request("GET", f"{V2}/pubkey/ed25519:nope")
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


async def test_v1_status(api: Api) -> None:
    assert await api.request("GET", V1) == (200, {})


async def test_v1_lookup_returns_signed_association(api: Api) -> None:
    await api.add_binding("email", "alice@example.com", "@alice:hs.test")
    status, body = await api.request("GET", f"{V1}/lookup?medium=email&address=Alice@Example.com")
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


async def test_v1_lookup_of_unbound_address_is_empty(api: Api) -> None:
    assert await api.request("GET", f"{V1}/lookup?medium=email&address=x@example.com") == (200, {})
    assert await api.request("GET", f"{V1}/lookup?medium=fax&address=1") == (200, {})


async def test_v1_lookup_needs_medium_and_address(api: Api) -> None:
    status, body = await api.request("GET", f"{V1}/lookup?medium=email")
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")


async def test_v1_bulk_lookup(api: Api) -> None:
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


async def test_v1_bulk_lookup_checks_shape(api: Api) -> None:
    status, body = await api.request("POST", f"{V1}/bulk_lookup", json={"threepids": [["email"]]})
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")
    status, body = await api.request("POST", f"{V1}/bulk_lookup", json={})
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")


class TestV1Disabled:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "api: {v1_enabled: false}"

    async def test_v1_paths_are_404(self, api: Api) -> None:
        for path in (V1, f"{V1}/pubkey/ed25519:0", f"{V1}/lookup?medium=email&address=a@b.c"):
            status, body = await api.request("GET", path)
            assert (status, body["errcode"]) == (404, "M_UNRECOGNIZED")
        status, _ = await api.request("GET", f"{V2}/pubkey/ed25519:0")
        assert status == 200
