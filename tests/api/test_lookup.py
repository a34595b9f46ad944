"""``/v2/hash_details`` and ``/v2/lookup`` with the sha256 and none algorithms."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.crypto.hashing import lookup_hash
from tests.support.api_server import Api

HASH_DETAILS = "/_matrix/identity/v2/hash_details"
LOOKUP = "/_matrix/identity/v2/lookup"


async def _pepper(api: Api, token: str) -> str:
    status, body = await api.request("GET", HASH_DETAILS, token=token)
    assert status == 200
    return str(body["lookup_pepper"])


async def test_hash_details_offers_sha256_and_an_alphanumeric_pepper(api: Api) -> None:
    _, token = await api.register()
    status, body = await api.request("GET", HASH_DETAILS, token=token)
    assert status == 200
    assert body["algorithms"] == ["sha256"]  # "none" only when configured
    assert body["lookup_pepper"].isalnum() and len(body["lookup_pepper"]) >= 32


async def test_hash_details_accepts_token_in_query_string_as_synapse_sends_it(api: Api) -> None:
    _, token = await api.register()
    status, body = await api.request("GET", f"{HASH_DETAILS}?access_token={token}")
    assert status == 200 and "lookup_pepper" in body


async def test_hash_details_needs_auth(api: Api) -> None:
    status, body = await api.request("GET", HASH_DETAILS)
    assert (status, body["errcode"]) == (401, "M_UNAUTHORIZED")


async def test_sha256_lookup_maps_hits_and_leaves_out_misses(api: Api) -> None:
    _, token = await api.register()
    pepper = await _pepper(api, token)
    await api.add_binding("email", "alice@example.com", "@alice:hs.test")
    await api.add_binding("msisdn", "18005552067", "@bob:hs.test")
    alice = lookup_hash("alice@example.com", "email", pepper)
    bob = lookup_hash("18005552067", "msisdn", pepper)
    missing = lookup_hash("carol@example.com", "email", pepper)
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": [alice, bob, missing, "junk"]},
    )
    assert status == 200
    assert body == {"mappings": {alice: "@alice:hs.test", bob: "@bob:hs.test"}}


async def test_addresses_that_are_no_sha256_hash_match_nothing(api: Api) -> None:
    _, token = await api.register()
    pepper = await _pepper(api, token)
    await api.add_binding("email", "alice@example.com", "@alice:hs.test")
    alice = lookup_hash("alice@example.com", "email", pepper)
    odd = ["\x00", f"{alice}\x00", f"{alice}\n", "x" * 3000, alice[:-1] + "=", alice + "A"]
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": [*odd, alice]},
    )
    assert (status, body) == (200, {"mappings": {alice: "@alice:hs.test"}})


async def test_repeated_addresses_are_answered_once(api: Api) -> None:
    _, token = await api.register()
    pepper = await _pepper(api, token)
    await api.add_binding("email", "alice@example.com", "@alice:hs.test")
    alice = lookup_hash("alice@example.com", "email", pepper)
    missing = lookup_hash("carol@example.com", "email", pepper)
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": [alice, missing] * 300},
    )
    assert (status, body) == (200, {"mappings": {alice: "@alice:hs.test"}})


async def test_none_is_refused_unless_configured(api: Api) -> None:
    _, token = await api.register()
    pepper = await _pepper(api, token)
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={"algorithm": "none", "pepper": pepper, "addresses": ["a@example.com email"]},
    )
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


class TestNoneOffered:
    @pytest.fixture
    def config_yaml(self) -> str:
        return "lookup: {algorithms: [sha256, none]}"

    async def test_hash_details_lists_it(self, api: Api) -> None:
        _, token = await api.register()
        status, body = await api.request("GET", HASH_DETAILS, token=token)
        assert (status, body["algorithms"]) == (200, ["sha256", "none"])

    async def test_none_lookup_casefolds_emails_and_keeps_addresses_as_sent(self, api: Api) -> None:
        _, token = await api.register()
        pepper = await _pepper(api, token)
        await api.add_binding("email", "strasse@example.com", "@s:hs.test")
        sent = [
            "Straße@Example.com email",
            "strasse@example.com email",
            "nobody@x.org email",
            "bad",
        ]
        status, body = await api.request(
            "POST",
            LOOKUP,
            token=token,
            json={"algorithm": "none", "pepper": pepper, "addresses": sent},
        )
        assert status == 200
        # Unicode case folding turns ß into ss, as the spec's "Caseless Matching" requires.
        assert body == {
            "mappings": {
                "Straße@Example.com email": "@s:hs.test",
                "strasse@example.com email": "@s:hs.test",
            }
        }


async def test_wrong_pepper_is_400_invalid_pepper_with_current_details(api: Api) -> None:
    _, token = await api.register()
    pepper = await _pepper(api, token)
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={"algorithm": "sha256", "pepper": "stale", "addresses": []},
    )
    assert status == 400
    assert body["errcode"] == "M_INVALID_PEPPER"
    assert body["lookup_pepper"] == pepper
    assert body["algorithm"] == "sha256"


async def test_unknown_algorithm_is_400_invalid_param(api: Api) -> None:
    _, token = await api.register()
    pepper = await _pepper(api, token)
    status, body = await api.request(
        "POST", LOOKUP, token=token, json={"algorithm": "md5", "pepper": pepper, "addresses": []}
    )
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


async def test_lookup_fields_are_checked(api: Api) -> None:
    _, token = await api.register()
    status, body = await api.request("POST", LOOKUP, token=token, json={"algorithm": "sha256"})
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAMS")
    assert "pepper" in body["error"] and "addresses" in body["error"]
    status, body = await api.request(
        "POST", LOOKUP, token=token, json={"algorithm": "sha256", "pepper": "p", "addresses": [1]}
    )
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={"algorithm": "sha256", "pepper": "p", "addresses": ["a", "b", None]},
    )
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")


async def test_ten_thousand_addresses_in_one_request(api: Api) -> None:
    _, token = await api.register()
    pepper = await _pepper(api, token)
    for i in range(0, 10_000, 1000):
        await api.add_binding("email", f"user{i}@example.com", f"@user{i}:hs.test")
    addresses = [lookup_hash(f"user{i}@example.com", "email", pepper) for i in range(10_000)]
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": addresses},
    )
    assert status == 200
    assert len(body["mappings"]) == 10
    assert body["mappings"][addresses[3000]] == "@user3000:hs.test"


async def test_more_than_the_configured_maximum_is_400(api: Api) -> None:
    _, token = await api.register()
    pepper = await _pepper(api, token)
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": ["x"] * 20_001},
    )
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")


@pytest.mark.parametrize("count", [1, 2, 1000, 20_000])
async def test_lookup_uses_the_hash_index(api: Api, count: int) -> None:
    db = api.server.db
    hashes = [f"h{i}" for i in range(count)]
    query, params = db.select_by_keys("bindings", ("lookup_hash", "mxid"), "lookup_hash", hashes)
    if db.is_postgres:
        async with db.transaction() as conn:
            await conn.execute("SET LOCAL enable_seqscan = off")
            rows = await conn.fetch(f"EXPLAIN {query}", *params)
        plan = " ".join(row[0] for row in rows)
    else:
        rows = await db.fetch(f"EXPLAIN QUERY PLAN {query}", *params)
        steps = [str(row["detail"]) for row in rows]
        # The asked values are the outer loop; each probes the covering index once.
        assert steps[0].startswith("SCAN wanted"), steps
        plan = " ".join(steps)
    assert "bindings_lookup_hash" in plan, plan


async def test_keys_with_json_special_characters_are_matched_exactly(api: Api) -> None:
    db = api.server.db
    odd = ['quote"d', "back\\slash", "new\nline", "ünïcødé 🔑", "tab\t", "[1]", "null"]
    for i, key in enumerate(odd):
        await db.execute(
            "INSERT INTO bindings (medium, address, mxid, lookup_hash, created_ts, not_before,"
            " not_after) VALUES ('email', $1, $2, $3, 0, 0, 1)",
            f"odd{i}@example.org",
            f"@odd{i}:hs.test",
            key,
        )
    asked = [*odd, *odd, "quote", "back\\", "1", "ünïcødé"]
    found = await api.server.bindings.mxids_by_hash(asked)
    assert found == {key: f"@odd{i}:hs.test" for i, key in enumerate(odd)}


async def test_hash_lists_of_every_length_find_exactly_their_bindings(api: Api) -> None:
    for i in range(40):
        await api.add_binding("email", f"len{i}@example.org", f"@len{i}:hs.test")
    hashes = [api.server.lookup.hash_of("email", f"len{i}@example.org") for i in range(40)]
    for count in (1, 2, 3, 5, 17, 33, 40):
        asked = [*hashes[:count], "unknown-hash"]
        found = await api.server.bindings.mxids_by_hash(asked)
        assert found == {hashes[i]: f"@len{i}:hs.test" for i in range(count)}
    many = [*hashes, *(f"miss{i}" for i in range(20_000))]
    assert len(await api.server.bindings.mxids_by_hash(many)) == 40


async def test_concurrent_lookups_each_get_exactly_their_own_bindings(api: Api) -> None:
    for i in range(30):
        await api.add_binding("email", f"con{i}@example.org", f"@con{i}:hs.test")
    hashes = [api.server.lookup.hash_of("email", f"con{i}@example.org") for i in range(30)]
    # Single hashes, small lists sharing hashes, misses and one list too long to be merged
    # (on PostgreSQL the small ones are read together in one statement).
    asked = [
        *([h] for h in hashes),
        *([hashes[i], hashes[(i + 7) % 30], f"miss{i}"] for i in range(30)),
        [f"miss-only{i}" for i in range(3)],
        [*hashes, *(f"long-miss{i}" for i in range(100))],
    ]
    answers = await asyncio.gather(*(api.server.bindings.mxids_by_hash(a) for a in asked))
    owner = {h: f"@con{i}:hs.test" for i, h in enumerate(hashes)}
    for question, answer in zip(asked, answers, strict=True):
        assert answer == {h: owner[h] for h in question if h in owner}


async def test_pepper_survives_a_restart(api: Api) -> None:
    _, token = await api.register()
    pepper = await _pepper(api, token)
    restarted = IdentityServer(api.server.config, clock=FakeClock())
    await restarted.start()
    client = TestClient(TestServer(restarted.public_app()))
    await client.start_server()
    try:
        headers = {"Authorization": f"Bearer {token}"}
        async with client.get(HASH_DETAILS, headers=headers) as resp:
            assert (await resp.json())["lookup_pepper"] == pepper
    finally:
        await client.close()
        await restarted.stop()
