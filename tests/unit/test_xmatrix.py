"""Tests for X-Matrix request signatures: header parsing, server key fetching and verification."""

from __future__ import annotations

import asyncio
import copy
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import signedjson.key

from appservice.clock import FakeClock
from appservice.federation import (
    FederationClient,
    ServerKeyError,
    ServerKeyFetcher,
    XMatrixAuthorization,
    XMatrixError,
    parse_x_matrix,
    verify_x_matrix,
)
from appservice.federation.server_keys import parse_key_response
from tests.support.signing_homeserver import SigningHomeserver

LOOPBACK = ["127.0.0.0/8"]
HS = "hs.test"
IS = "id.test"
UNBIND = "/_matrix/identity/v2/3pid/unbind"
BODY = {"mxid": "@alice:hs.test", "threepid": {"medium": "email", "address": "a@example.com"}}
REFETCH_S = 60.0


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def hs(clock: FakeClock) -> AsyncIterator[SigningHomeserver]:
    async with SigningHomeserver(HS, clock=clock.time) as server:
        yield server


@pytest.fixture
async def hs2(clock: FakeClock) -> AsyncIterator[SigningHomeserver]:
    async with SigningHomeserver("hs2.test", clock=clock.time) as server:
        yield server


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def client(hs: SigningHomeserver, hs2: SigningHomeserver) -> AsyncIterator[FederationClient]:
    client = FederationClient(
        overrides={
            hs.server_name: hs.base_url,
            hs2.server_name: hs2.base_url,
            # Another name served by hs: its key response names hs.test.
            "alias.test": hs.base_url,
            "down.test": f"http://127.0.0.1:{_closed_port()}",
        },
        allowed_networks=LOOPBACK,
        timeout_s=5.0,
    )
    yield client
    await client.close()


@pytest.fixture
def fetcher(client: FederationClient, clock: FakeClock) -> ServerKeyFetcher:
    return ServerKeyFetcher(client, clock.time, min_refetch_interval_s=REFETCH_S)


async def verify(
    fetcher: ServerKeyFetcher,
    header: str | None,
    *,
    method: str = "POST",
    uri: str = UNBIND,
    content: Any | None = BODY,
    own_names: tuple[str, ...] = (IS,),
) -> str:
    return await verify_x_matrix(fetcher, header, method, uri, content, own_names)


async def verify_fails(fetcher: ServerKeyFetcher, header: str | None, **kwargs: Any) -> str:
    with pytest.raises(XMatrixError) as info:
        await verify(fetcher, header, **kwargs)
    assert info.value.status == 401
    assert str(info.value) == info.value.reason
    return info.value.reason


# --------------------------------------------------------------------------------------------
# Header parsing


def test_parse_quoted_values() -> None:
    auth = parse_x_matrix(
        'X-Matrix origin="hs.test",destination="id.test",key="ed25519:a",sig="c2"'
    )
    assert auth == XMatrixAuthorization("hs.test", "id.test", "ed25519:a", "c2")


def test_parse_unquoted_values_may_contain_colons() -> None:
    auth = parse_x_matrix("X-Matrix origin=hs.test:8448,key=ed25519:abc_1,sig=c2ln+/x")
    assert auth == XMatrixAuthorization("hs.test:8448", None, "ed25519:abc_1", "c2ln+/x")


def test_parse_backslash_escapes_in_quoted_values() -> None:
    auth = parse_x_matrix(r'X-Matrix origin="hs.test",key="ed25519:a\"b",sig="x\\y\z"')
    assert auth.key == 'ed25519:a"b'
    assert auth.sig == "x\\yz"


def test_parse_is_case_insensitive_in_any_order_with_whitespace() -> None:
    auth = parse_x_matrix(
        '  x-MATRIX   SIG = "s" ,\tKey="ed25519:k", Destination=id.test:8090 ,ORIGIN="hs.test"  '
    )
    assert auth == XMatrixAuthorization("hs.test", "id.test:8090", "ed25519:k", "s")


def test_parse_ignores_unknown_parameters() -> None:
    auth = parse_x_matrix(
        'X-Matrix foo="bar, baz=\\"1\\"",origin="hs.test",,x-extra=1:2,key="ed25519:k",sig="s",'
    )
    assert auth == XMatrixAuthorization("hs.test", None, "ed25519:k", "s")


def test_parse_accepts_signature_for_sig() -> None:
    auth = parse_x_matrix('X-Matrix origin="hs.test",key="ed25519:k",signature="s"')
    assert auth.sig == "s"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("", "not an X-Matrix"),
        ("Bearer abcdef", "not an X-Matrix"),
        ('X-Matrixorigin="hs.test"', "not an X-Matrix"),
        ("X-Matrix", "missing 'origin'"),
        ('X-Matrix key="ed25519:k",sig="s"', "missing 'origin'"),
        ('X-Matrix origin="hs.test",sig="s"', "missing 'key'"),
        ('X-Matrix origin="hs.test",key="ed25519:k"', "missing 'sig'"),
        ('X-Matrix origin="hs.test",key="ed25519:k",sig=""', "missing 'sig'"),
        ('X-Matrix origin="hs.test",key="ed25519:k",sig="s', "unterminated"),
        ('X-Matrix origin="hs.test" key="ed25519:k",sig="s"', "expected a comma"),
        ('X-Matrix origin="hs.test",key,sig="s"', "has no value"),
        ('X-Matrix origin="hs.test",key=,sig="s"', "has no value"),
        ('X-Matrix ="hs.test",key="ed25519:k",sig="s"', "expected a parameter name"),
        ('X-Matrix origin="hs.test",origin="evil.test",key="k",sig="s"', "more than once"),
        ('X-Matrix origin="hs.test",key="k",sig="s",signature="t"', "more than once"),
        ('X-Matrix origin="hs test",key="ed25519:k",sig="s"', "not a valid server name"),
        ('X-Matrix origin="evil.test/x",key="ed25519:k",sig="s"', "not a valid server name"),
        ('X-Matrix origin="hs.test",key="ed25519:\x00",sig="s"', "control character"),
        ("X-Matrix origin=hs.test,key=ed25519:k\x01,sig=s", "control character"),
        ("X-Matrix " + "a" * 9000, "too long"),
    ],
)
def test_parse_rejects_garbage(header: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_x_matrix(header)


# --------------------------------------------------------------------------------------------
# Verification


async def test_verify_synapse_destination_is(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    header = hs.sign_request("POST", UNBIND, IS, BODY)
    assert await verify(fetcher, header) == HS
    assert hs.key_requests == 1


async def test_verify_homeserver_style_destination(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    header = hs.sign_request("POST", UNBIND, IS, BODY, destination_field="destination")
    assert await verify(fetcher, header) == HS


async def test_verify_without_header_destination_tries_each_own_name(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    header = hs.sign_request("POST", UNBIND, "id.test:8090", BODY, include_destination=False)
    assert await verify(fetcher, header, own_names=(IS, "id.test:8090")) == HS
    await verify_fails(fetcher, header, own_names=(IS,))


async def test_verify_request_without_body(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    header = hs.sign_request("GET", "/_matrix/identity/v2/x?a=1", IS)
    assert await verify(
        fetcher, header, method="GET", uri="/_matrix/identity/v2/x?a=1", content=None
    )
    await verify_fails(fetcher, header, method="GET", uri="/_matrix/identity/v2/x?a=1", content={})


async def test_verify_rejects_other_header_destination_without_fetching(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    header = hs.sign_request("POST", UNBIND, "evil.test", BODY)
    reason = await verify_fails(fetcher, header)
    assert "different destination" in reason
    assert hs.key_requests == 0


async def test_verify_rejects_signature_for_another_destination(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    # The header names us, but the signature covers another identity server.
    header = hs.sign_request("POST", UNBIND, "evil.test", BODY, header_destination=IS)
    reason = await verify_fails(fetcher, header)
    assert "does not match" in reason


@pytest.mark.parametrize(
    "tamper",
    [
        {"method": "PUT"},
        {"uri": "/_matrix/identity/v2/3pid/bind"},
        {"uri": UNBIND + "?x=1"},
        {"content": {**BODY, "mxid": "@mallory:hs.test"}},
        {"content": None},
    ],
    ids=["method", "uri", "query", "content", "no-content"],
)
async def test_verify_rejects_tampered_request(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver, tamper: dict[str, Any]
) -> None:
    header = hs.sign_request("POST", UNBIND, IS, BODY)
    reason = await verify_fails(fetcher, header, **tamper)
    assert "does not match this request" in reason


async def test_verify_uses_uri_with_query_exactly(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    uri = UNBIND + "?a=b%20c&d"
    header = hs.sign_request("POST", uri, IS, BODY)
    assert await verify(fetcher, header, uri=uri) == HS
    await verify_fails(fetcher, header, uri=UNBIND + "?a=b+c&d")


@pytest.mark.parametrize("header", [None, ""])
async def test_verify_rejects_missing_header(fetcher: ServerKeyFetcher, header: str | None) -> None:
    assert "missing" in await verify_fails(fetcher, header)


async def test_verify_rejects_malformed_header(fetcher: ServerKeyFetcher) -> None:
    reason = await verify_fails(fetcher, 'X-Matrix origin="hs.test",key="ed25519:k"')
    assert reason.startswith("malformed X-Matrix Authorization header")


@pytest.mark.parametrize("sig", ["not base64!", "c2ln"], ids=["not-base64", "too-short"])
async def test_verify_rejects_malformed_signature_without_fetching(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver, sig: str
) -> None:
    header = f'X-Matrix origin="{HS}",destination="{IS}",key="{hs.key_id}",sig="{sig}"'
    assert "malformed signature" in await verify_fails(fetcher, header)
    assert hs.key_requests == 0


async def test_verify_rejects_unsupported_key_algorithm(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    header = hs.sign_request("POST", UNBIND, IS, BODY).replace("ed25519:", "curve25519:")
    assert "unsupported" in await verify_fails(fetcher, header)
    assert hs.key_requests == 0


async def test_verify_rejects_float_in_body(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    content = {**BODY, "n": 1.5}
    header = hs.sign_request("POST", UNBIND, IS, content)
    assert "canonical JSON" in await verify_fails(fetcher, header, content=content)


async def test_verify_rejects_other_servers_key(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver, hs2: SigningHomeserver
) -> None:
    # hs signs but claims to be hs2: hs2's key (same key id) does not verify it.
    assert hs.key_id == hs2.key_id
    header = hs.sign_request("POST", UNBIND, IS, BODY, origin=hs2.server_name)
    assert "does not match" in await verify_fails(fetcher, header)
    assert (hs.key_requests, hs2.key_requests) == (0, 1)


# --------------------------------------------------------------------------------------------
# Key fetching: unknown keys, rotation, bad key responses


async def test_unknown_key_refetches_once_then_is_rate_limited(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver, clock: FakeClock
) -> None:
    assert await verify(fetcher, hs.sign_request("POST", UNBIND, IS, BODY)) == HS
    clock.advance(REFETCH_S)
    unknown = signedjson.key.generate_signing_key("unknown")
    header = hs.sign_request("POST", UNBIND, IS, BODY, signing_key=unknown)
    reason = await verify_fails(fetcher, header)
    assert reason == (
        "could not verify the X-Matrix signature: hs.test has no current key ed25519:unknown"
    )
    assert hs.key_requests == 2
    # Within the interval: no new fetch, however many requests.
    for _ in range(5):
        reason = await verify_fails(fetcher, header)
        assert "not fetching them again yet" in reason
    assert hs.key_requests == 2
    # Known keys are still served from the cache meanwhile.
    assert await verify(fetcher, hs.sign_request("POST", UNBIND, IS, BODY)) == HS
    clock.advance(REFETCH_S)
    await verify_fails(fetcher, header)
    assert hs.key_requests == 3


async def test_unknown_key_right_after_first_fetch_is_not_refetched(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    unknown = signedjson.key.generate_signing_key("unknown")
    header = hs.sign_request("POST", UNBIND, IS, BODY, signing_key=unknown)
    await verify_fails(fetcher, header)
    await verify_fails(fetcher, header)
    assert hs.key_requests == 1


async def test_rotated_key_is_picked_up_and_old_key_is_not_valid(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver, clock: FakeClock
) -> None:
    old_header = hs.sign_request("POST", UNBIND, IS, BODY)
    assert await verify(fetcher, old_header) == HS
    hs.rotate_key()
    new_header = hs.sign_request("POST", UNBIND, IS, BODY)
    # The cached keys are still valid; the old key keeps working until they are refetched.
    assert await verify(fetcher, old_header) == HS
    clock.advance(REFETCH_S)
    assert await verify(fetcher, new_header) == HS
    assert hs.key_requests == 2
    # Now the old key is only in old_verify_keys, which are not valid for request signing.
    assert "has no current key" in await verify_fails(fetcher, old_header)
    assert hs.key_requests == 2
    assert hs.key_response()["old_verify_keys"]


async def test_old_verify_keys_are_not_usable(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    old_key_id = hs.key_id
    hs.rotate_key("b_2")
    with pytest.raises(ServerKeyError, match="has no current key"):
        await fetcher.verify_key(HS, old_key_id)
    assert await fetcher.verify_key(HS, "ed25519:b_2")


async def test_bad_self_signature_is_rejected(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    hs.bad_self_signature = True
    reason = await verify_fails(fetcher, hs.sign_request("POST", UNBIND, IS, BODY))
    assert "could not fetch the keys of hs.test" in reason
    assert f"self-signature with {hs.key_id} does not verify" in reason


async def test_expired_key_response_is_rejected(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    hs.valid_for_s = -10
    reason = await verify_fails(fetcher, hs.sign_request("POST", UNBIND, IS, BODY))
    assert "expired" in reason


async def test_key_response_for_other_server_name_is_rejected(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    # alias.test is served by hs, which answers (correctly self-signed) as hs.test.
    header = hs.sign_request("POST", UNBIND, IS, BODY, origin="alias.test")
    reason = await verify_fails(fetcher, header)
    assert "different server_name" in reason
    hs.served_server_name = "evil.test"
    reason = await verify_fails(fetcher, hs.sign_request("POST", UNBIND, IS, BODY))
    assert "different server_name" in reason


async def test_key_endpoint_error_is_remembered_for_the_refetch_interval(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver, clock: FakeClock
) -> None:
    hs.key_status = 500
    header = hs.sign_request("POST", UNBIND, IS, BODY)
    reason = await verify_fails(fetcher, header)
    assert "could not fetch the keys of hs.test" in reason
    assert "HTTP 500" in reason
    hs.key_status = None
    assert "not retrying yet" in await verify_fails(fetcher, header)
    assert hs.key_requests == 1
    clock.advance(REFETCH_S)
    assert await verify(fetcher, header) == HS
    assert hs.key_requests == 2


async def test_unreachable_homeserver(fetcher: ServerKeyFetcher, hs: SigningHomeserver) -> None:
    header = hs.sign_request("POST", UNBIND, IS, BODY, origin="down.test")
    reason = await verify_fails(fetcher, header)
    assert reason.startswith("could not verify the X-Matrix signature")
    assert "could not fetch the keys of down.test" in reason
    assert "could not connect" in reason


# --------------------------------------------------------------------------------------------
# Caching and concurrency


async def test_keys_are_cached_until_valid_until_ts(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver, clock: FakeClock
) -> None:
    header = hs.sign_request("POST", UNBIND, IS, BODY)
    hs.valid_for_s = 3600
    assert await verify(fetcher, header) == HS
    assert await verify(fetcher, header) == HS
    assert hs.key_requests == 1
    clock.advance(3599)
    assert await verify(fetcher, header) == HS
    assert hs.key_requests == 1
    clock.advance(2)
    assert await verify(fetcher, header) == HS
    assert hs.key_requests == 2


async def test_cache_time_is_capped(
    client: FederationClient, hs: SigningHomeserver, clock: FakeClock
) -> None:
    fetcher = ServerKeyFetcher(client, clock.time, max_cache_s=7 * 86400)
    hs.valid_for_s = 365 * 86400
    await fetcher.verify_key(HS, hs.key_id)
    cached = fetcher.cached_keys(HS)
    assert cached is not None
    assert cached.valid_until == clock.time() + 7 * 86400
    clock.advance(7 * 86400 - 1)
    await fetcher.verify_key(HS, hs.key_id)
    assert hs.key_requests == 1
    clock.advance(2)
    assert fetcher.cached_keys(HS) is None
    await fetcher.verify_key(HS, hs.key_id)
    assert hs.key_requests == 2


async def test_concurrent_verifications_share_one_fetch(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    headers = [hs.sign_request("POST", UNBIND, IS, {**BODY, "n": n}) for n in range(10)]
    results = await asyncio.gather(
        *(verify(fetcher, h, content={**BODY, "n": n}) for n, h in enumerate(headers))
    )
    assert results == [HS] * 10
    assert hs.key_requests == 1


async def test_concurrent_failures_share_one_fetch(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    hs.bad_self_signature = True
    header = hs.sign_request("POST", UNBIND, IS, BODY)
    results = await asyncio.gather(
        *(verify(fetcher, header) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, XMatrixError) and r.status == 401 for r in results)
    assert hs.key_requests == 1


async def test_cancelled_waiter_does_not_cancel_shared_fetch(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver
) -> None:
    first = asyncio.create_task(fetcher.verify_key(HS, hs.key_id))
    second = asyncio.create_task(fetcher.verify_key(HS, hs.key_id))
    await asyncio.sleep(0)
    first.cancel()
    key = await second
    assert signedjson.key.encode_verify_key_base64(key) == signedjson.key.encode_verify_key_base64(
        signedjson.key.get_verify_key(hs.signing_key)
    )
    with pytest.raises(asyncio.CancelledError):
        await first
    assert hs.key_requests == 1


async def test_cache_is_bounded(
    client: FederationClient,
    hs: SigningHomeserver,
    hs2: SigningHomeserver,
    clock: FakeClock,
) -> None:
    fetcher = ServerKeyFetcher(client, clock.time, max_servers=1)
    await fetcher.verify_key(HS, hs.key_id)
    await fetcher.verify_key(hs2.server_name, hs2.key_id)
    assert fetcher.cached_keys(HS) is None
    await fetcher.verify_key(HS, hs.key_id)
    assert (hs.key_requests, hs2.key_requests) == (2, 1)


@pytest.mark.parametrize(
    ("server_name", "key_id", "message"),
    [
        ("hs test", "ed25519:a", "invalid server name"),
        (HS, "curve25519:a", "unsupported key id"),
        (HS, "ed25519:", "unsupported key id"),
        (HS, "ed25519", "unsupported key id"),
        (HS, "ed25519:a b", "unsupported key id"),
    ],
)
async def test_verify_key_rejects_bad_arguments(
    fetcher: ServerKeyFetcher, hs: SigningHomeserver, server_name: str, key_id: str, message: str
) -> None:
    with pytest.raises(ServerKeyError, match=message):
        await fetcher.verify_key(server_name, key_id)
    assert hs.key_requests == 0


# --------------------------------------------------------------------------------------------
# Key response validation


def _mutated(hs: SigningHomeserver, change: str) -> dict[str, Any]:
    body = copy.deepcopy(hs.key_response())
    if change == "float":
        body["extra"] = 1.0
    elif change == "no-verify-keys":
        del body["verify_keys"]
    elif change == "bool-valid-until":
        body["valid_until_ts"] = True
    elif change == "no-signatures":
        del body["signatures"]
    elif change == "signed-by-other":
        body["signatures"] = {"other.test": body["signatures"][HS]}
    elif change == "signed-with-unlisted-key":
        body["signatures"] = {HS: {"ed25519:other": body["signatures"][HS][hs.key_id]}}
    elif change == "bad-key-base64":
        body["verify_keys"][hs.key_id]["key"] = "!!!"
    elif change == "short-key":
        body["verify_keys"][hs.key_id]["key"] = "c2hvcnQ"
    elif change == "only-other-algorithms":
        body["verify_keys"] = {"curve25519:x": {"key": "c2hvcnQ"}}
    elif change == "not-object":
        return {"list": [body]}
    return body


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("float", "not canonical JSON"),
        ("no-verify-keys", "verify_keys is missing"),
        ("bool-valid-until", "valid_until_ts is missing or not an integer"),
        ("no-signatures", "not signed by any of its own verify_keys"),
        ("signed-by-other", "not signed by any of its own verify_keys"),
        ("signed-with-unlisted-key", "not signed by any of its own verify_keys"),
        ("bad-key-base64", "not valid base64"),
        ("short-key", "not an ed25519 public key"),
        ("only-other-algorithms", "no ed25519 verify_keys"),
        ("not-object", "different server_name"),
    ],
)
def test_parse_key_response_rejects(
    hs: SigningHomeserver, clock: FakeClock, change: str, message: str
) -> None:
    with pytest.raises(ServerKeyError, match=message):
        parse_key_response(HS, _mutated(hs, change), clock.time(), max_cache_s=86400)


def test_parse_key_response_accepts_valid_response(hs: SigningHomeserver, clock: FakeClock) -> None:
    hs.rotate_key()
    keys = parse_key_response(HS, hs.key_response(), clock.time(), max_cache_s=600)
    assert list(keys.verify_keys) == [hs.key_id]
    assert keys.valid_until == clock.time() + 600
    assert keys.fetched_at == clock.time()
    with pytest.raises(ServerKeyError, match="not a JSON object"):
        parse_key_response(HS, [], clock.time(), max_cache_s=600)
