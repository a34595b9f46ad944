"""The ``rest`` store against a loopback backend speaking its JSON contract."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appservice.config import ConfigError, load_config_text
from appservice.config.model import Duration, RestStoreConfig
from appservice.identity_stores.base import StoreEntry, StoreError, Threepid
from appservice.identity_stores.rest import MAX_ANSWER_BYTES, RestStore
from tests.support.rest_backend import BackendRequest, RestBackend

ALICE: Threepid = ("email", "alice@example.org")
BOB: Threepid = ("msisdn", "4915112345678")
CAROL: Threepid = ("email", "carol@example.org")
NOBODY: Threepid = ("email", "nobody@example.org")
MXIDS = {
    ALICE: "@alice:example.org",
    BOB: "@bob:example.org",
    CAROL: "@carol:example.org",
}

MakeStore = Callable[..., Awaitable[RestStore]]


@pytest.fixture
async def backend() -> AsyncIterator[RestBackend]:
    """A backend knowing Alice, Bob and Carol; Alice has the inviters role."""
    server = RestBackend(MXIDS, {"@alice:example.org": ["inviters", "staff"]})
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def make_store(backend: RestBackend) -> AsyncIterator[MakeStore]:
    """Started stores pointing at ``backend`` (options as in ``RestStoreConfig``)."""
    opened: list[RestStore] = []

    async def make(**options: Any) -> RestStore:
        store = RestStore(RestStoreConfig(base_url=backend.base_url + "/", **options))
        await store.start()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def _all(entries: AsyncIterator[StoreEntry]) -> list[StoreEntry]:
    return [entry async for entry in entries]


async def test_one_threepid_is_looked_up_with_lookup(
    backend: RestBackend, make_store: MakeStore
) -> None:
    store = await make_store()
    assert store.name == "rest"
    assert await store.find([ALICE]) == {ALICE: "@alice:example.org"}
    assert backend.requests == [
        BackendRequest(
            "POST", "/lookup", {}, {"medium": "email", "address": "alice@example.org"}, None
        )
    ]


@pytest.mark.parametrize("as_404", [False, True], ids=["empty-object", "404"])
async def test_unknown_threepid_is_not_found(
    backend: RestBackend, make_store: MakeStore, as_404: bool
) -> None:
    backend.unknown_as_404 = as_404
    store = await make_store()
    assert await store.find([NOBODY]) == {}
    assert await store.find([NOBODY, ("email", "nobody2@example.org")]) == {}


async def test_lookup_answer_with_null_mxid_is_unknown(
    backend: RestBackend, make_store: MakeStore
) -> None:
    backend.answers["/lookup"] = {"mxid": None}
    store = await make_store()
    assert await store.find([ALICE]) == {}


async def test_several_threepids_are_looked_up_in_one_bulk_request(
    backend: RestBackend, make_store: MakeStore
) -> None:
    store = await make_store()
    found = await store.find([ALICE, NOBODY, BOB])
    assert found == {ALICE: "@alice:example.org", BOB: "@bob:example.org"}
    assert [(r.method, r.path) for r in backend.requests] == [("POST", "/bulk_lookup")]
    assert backend.requests[0].body == {
        "threepids": [
            {"medium": "email", "address": "alice@example.org"},
            {"medium": "email", "address": "nobody@example.org"},
            {"medium": "msisdn", "address": "4915112345678"},
        ]
    }


async def test_bulk_lookup_is_sent_in_chunks_of_1000(
    backend: RestBackend, make_store: MakeStore
) -> None:
    asked = [("email", f"user{i}@example.org") for i in range(2500)]
    for i in range(0, 2500, 100):
        backend.mxids[asked[i]] = f"@user{i}:example.org"
    store = await make_store()
    found = await store.find(asked)
    assert found == {asked[i]: f"@user{i}:example.org" for i in range(0, 2500, 100)}
    assert [len(r.body["threepids"]) for r in backend.requests] == [1000, 1000, 500]
    sent = [(t["medium"], t["address"]) for r in backend.requests for t in r.body["threepids"]]
    assert sent == asked


async def test_duplicates_and_unknown_mediums_are_not_sent(
    backend: RestBackend, make_store: MakeStore
) -> None:
    store = await make_store()
    assert await store.find([ALICE, ("matrix", "@x:example.org"), ALICE]) == {
        ALICE: "@alice:example.org"
    }
    assert [r.path for r in backend.requests] == ["/lookup"]
    assert await store.find([("matrix", "@x:example.org")]) == {}
    assert len(backend.requests) == 1


async def test_answers_for_threepids_not_asked_are_ignored(
    backend: RestBackend, make_store: MakeStore
) -> None:
    backend.answers["/bulk_lookup"] = {
        "threepids": [
            {"medium": "email", "address": "alice@example.org", "mxid": "@alice:example.org"},
            {"medium": "email", "address": "eve@example.org", "mxid": "@eve:example.org"},
        ]
    }
    store = await make_store()
    assert await store.find([ALICE, NOBODY]) == {ALICE: "@alice:example.org"}


async def test_answered_addresses_are_canonicalised_and_unknown_mediums_skipped(
    backend: RestBackend, make_store: MakeStore
) -> None:
    backend.answers["/bulk_lookup"] = {
        "threepids": [
            {"medium": "email", "address": "Alice@EXAMPLE.org", "mxid": "@alice:example.org"},
            {"medium": "msisdn", "address": "+4915112345678", "mxid": "@bob:example.org"},
            {"medium": "pigeon", "address": "loft 7", "mxid": "@carol:example.org"},
        ],
        "extra": "ignored",
    }
    store = await make_store()
    assert await store.find([ALICE, BOB, CAROL]) == {
        ALICE: "@alice:example.org",
        BOB: "@bob:example.org",
    }


async def test_token_is_sent_as_bearer(backend: RestBackend, make_store: MakeStore) -> None:
    backend.token = "s3cret-token"
    store = await make_store(token="s3cret-token")
    assert await store.find([ALICE]) == {ALICE: "@alice:example.org"}
    assert backend.requests[0].authorization == "Bearer s3cret-token"


@pytest.mark.parametrize("token", ["", "wrong-token-value"], ids=["missing", "wrong"])
async def test_rejected_token_fails_without_naming_it(
    backend: RestBackend, make_store: MakeStore, token: str
) -> None:
    backend.token = "s3cret-token"
    store = await make_store(token=token)
    with pytest.raises(StoreError) as info:
        await store.find([ALICE])
    assert str(info.value) == "rest store: POST /lookup: HTTP 401"
    assert "s3cret-token" not in str(info.value)
    assert "wrong-token-value" not in str(info.value)


async def test_roles_are_asked_when_enabled(backend: RestBackend, make_store: MakeStore) -> None:
    store = await make_store(roles=True)
    assert await store.roles("@alice:example.org") == {"inviters", "staff"}
    assert await store.roles("@bob:example.org") == frozenset()
    assert [(r.path, r.body) for r in backend.requests] == [
        ("/roles", {"mxid": "@alice:example.org"}),
        ("/roles", {"mxid": "@bob:example.org"}),
    ]


async def test_roles_off_answer_none_without_a_request(
    backend: RestBackend, make_store: MakeStore
) -> None:
    store = await make_store(roles=False)
    assert await store.roles("@alice:example.org") == frozenset()
    assert backend.requests == []


async def test_listing_pages_through_every_entry(
    backend: RestBackend, make_store: MakeStore
) -> None:
    backend.mxids[("email", "dave@example.org")] = "@dave:example.org"
    backend.mxids[("msisdn", "4930123456")] = "@erin:example.org"
    backend.page_size = 2
    store = await make_store(listable=True)
    assert store.listable
    entries = await _all(store.entries())
    assert sorted(entries, key=lambda e: (e.medium, e.address)) == sorted(
        (StoreEntry(m, a, x) for (m, a), x in backend.mxids.items()),
        key=lambda e: (e.medium, e.address),
    )
    assert [r.query for r in backend.requests] == [
        {"limit": "1000"},
        {"limit": "1000", "since": "2"},
        {"limit": "1000", "since": "4"},
    ]


async def test_listing_fails_when_the_cursor_repeats(
    backend: RestBackend, make_store: MakeStore
) -> None:
    backend.page_size = 1
    backend.repeat_cursor = True
    store = await make_store(listable=True)
    with pytest.raises(StoreError, match=r"^rest store: GET /threepids: the next cursor repeats$"):
        await _all(store.entries())
    assert len(backend.requests) == 2


async def test_entries_of_a_store_that_is_not_listable_fail(
    backend: RestBackend, make_store: MakeStore
) -> None:
    store = await make_store()
    assert not store.listable
    with pytest.raises(StoreError, match="not listable"):
        await _all(store.entries())
    assert backend.requests == []


OPERATIONS: dict[str, Callable[[RestStore], Awaitable[object]]] = {
    "POST /lookup": lambda store: store.find([ALICE]),
    "POST /bulk_lookup": lambda store: store.find([ALICE, BOB]),
    "GET /threepids": lambda store: _all(store.entries()),
    "POST /roles": lambda store: store.roles("@alice:example.org"),
}
MISBEHAVIOURS: dict[str, tuple[dict[str, Any], str]] = {
    "500": ({"status": 500}, "HTTP 500"),
    "503": ({"status": 503}, "HTTP 503"),
    "redirect": ({"status": 302}, "HTTP 302"),
    "bad-json": ({"raw_body": b"<html>oops</html>"}, "the answer is not JSON"),
    "not-utf8": ({"raw_body": b'{"mxid": "\xff"}'}, "the answer is not JSON"),
    "wrong-shape": ({"wrong_shape": True}, "the answer is not a JSON object"),
}


@pytest.mark.parametrize("endpoint", OPERATIONS)
@pytest.mark.parametrize("misbehaviour", MISBEHAVIOURS)
async def test_misbehaving_backend_fails_naming_endpoint_and_problem(
    backend: RestBackend, make_store: MakeStore, endpoint: str, misbehaviour: str
) -> None:
    switches, problem = MISBEHAVIOURS[misbehaviour]
    for switch, value in switches.items():
        setattr(backend, switch, value)
    store = await make_store(listable=True, roles=True, token="s3cret-token")
    with pytest.raises(StoreError) as info:
        await OPERATIONS[endpoint](store)
    assert str(info.value) == f"rest store: {endpoint}: {problem}"
    assert "s3cret-token" not in str(info.value)


def _entry(medium: str = "email", address: str = "alice@example.org", **more: Any) -> Any:
    return {"medium": medium, "address": address, "mxid": "@alice:example.org", **more}


NOT_ROLES = "roles is not a list of non-empty strings"
BAD_ANSWERS: dict[str, tuple[str, Any, str]] = {
    "lookup-mxid-not-user-id": ("POST /lookup", {"mxid": "alice"}, "mxid is not a Matrix user ID"),
    "lookup-mxid-number": ("POST /lookup", {"mxid": 42}, "mxid is not a Matrix user ID"),
    "lookup-list": ("POST /lookup", [], "the answer is not a JSON object"),
    "bulk-no-list": ("POST /bulk_lookup", {"threepids": {}}, "threepids is not a list"),
    "bulk-missing": ("POST /bulk_lookup", {}, "threepids is not a list"),
    "bulk-entry-not-object": (
        "POST /bulk_lookup",
        {"threepids": ["alice@example.org"]},
        "threepids[0] is not a JSON object",
    ),
    "bulk-entry-no-medium": (
        "POST /bulk_lookup",
        {"threepids": [{"address": "alice@example.org", "mxid": "@alice:example.org"}]},
        "threepids[0] lacks a medium or an address",
    ),
    "bulk-bad-mxid": (
        "POST /bulk_lookup",
        {"threepids": [_entry(mxid="@alice")]},
        "threepids[0].mxid is not a Matrix user ID",
    ),
    "bulk-bad-email": (
        "POST /bulk_lookup",
        {"threepids": [_entry(), _entry(address="not an email")]},
        "threepids[1].address is not a valid email",
    ),
    "bulk-bad-msisdn": (
        "POST /bulk_lookup",
        {"threepids": [_entry("msisdn", "+0049 151")]},
        "threepids[0].address is not a valid msisdn",
    ),
    "bulk-two-mxids": (
        "POST /bulk_lookup",
        {"threepids": [_entry(), _entry(address="ALICE@example.org", mxid="@mallory:x.org")]},
        "two different Matrix IDs for one email",
    ),
    "listing-next-number": (
        "GET /threepids",
        {"threepids": [], "next": 2},
        "next is not a string or null",
    ),
    "listing-too-long": (
        "GET /threepids",
        {"threepids": [_entry(address=f"a{i}@example.org") for i in range(1001)], "next": None},
        "1001 entries in a page, limit was 1000",
    ),
    "roles-missing": ("POST /roles", {}, NOT_ROLES),
    "roles-string": ("POST /roles", {"roles": "inviters"}, NOT_ROLES),
    "roles-empty-name": ("POST /roles", {"roles": [""]}, NOT_ROLES),
}


@pytest.mark.parametrize("case", BAD_ANSWERS)
async def test_answer_of_wrong_shape_fails(
    backend: RestBackend, make_store: MakeStore, case: str
) -> None:
    endpoint, answer, problem = BAD_ANSWERS[case]
    backend.answers[endpoint.split(" ")[1]] = answer
    store = await make_store(listable=True, roles=True)
    with pytest.raises(StoreError) as info:
        await OPERATIONS[endpoint](store)
    assert str(info.value) == f"rest store: {endpoint}: {problem}"


async def test_timeout_is_enforced(backend: RestBackend, make_store: MakeStore) -> None:
    backend.delay = 2.0
    store = await make_store(timeout=Duration(0.3))
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        await store.find([ALICE])
    elapsed = time.monotonic() - started
    assert str(info.value) == "rest store: POST /lookup: no answer within 0.3s"
    assert 0.25 <= elapsed < 1.2


async def test_timeout_covers_an_answer_body_that_stalls(
    backend: RestBackend, make_store: MakeStore
) -> None:
    backend.raw_body = b'{"mxid": ' + b" " * 70000 + b'"@alice:example.org"}'
    backend.chunked = True
    backend.body_delay = 2.0
    store = await make_store(timeout=Duration(0.3))
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"^rest store: POST /lookup: no answer within 0\.3s$"):
        await store.find([ALICE])
    assert time.monotonic() - started < 1.2


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_answer_is_refused(
    backend: RestBackend, make_store: MakeStore, chunked: bool
) -> None:
    filler = b"a" * MAX_ANSWER_BYTES
    backend.raw_body = b'{"threepids": [], "filler": "' + filler + b'"}'
    backend.chunked = chunked
    store = await make_store()
    with pytest.raises(StoreError) as info:
        await store.find([ALICE, BOB])
    assert str(info.value) == "rest store: POST /bulk_lookup: the answer is larger than 4 MiB"


async def test_answer_just_under_the_size_cap_is_read(
    backend: RestBackend, make_store: MakeStore
) -> None:
    head, tail = b'{"threepids": [], "filler": "', b'"}'
    backend.raw_body = head + b"a" * (MAX_ANSWER_BYTES - len(head) - len(tail)) + tail
    backend.chunked = True
    store = await make_store()
    assert await store.find([ALICE, BOB]) == {}


async def test_unreachable_backend_fails(backend: RestBackend, make_store: MakeStore) -> None:
    store = await make_store()
    await backend.go_down()
    with pytest.raises(StoreError, match=r"^rest store: POST /lookup: cannot reach the backend \("):
        await store.find([ALICE])
    await backend.come_up()
    assert await store.find([ALICE]) == {ALICE: "@alice:example.org"}


async def test_store_not_started_or_closed_fails(backend: RestBackend) -> None:
    store = RestStore(RestStoreConfig(base_url=backend.base_url))
    with pytest.raises(StoreError, match="not started"):
        await store.find([ALICE])
    await store.start()
    assert await store.find([ALICE]) == {ALICE: "@alice:example.org"}
    await store.close()
    with pytest.raises(StoreError, match="not started"):
        await store.find([ALICE])
    assert len(backend.requests) == 1


@pytest.mark.parametrize(
    ("rest", "message"),
    [
        ("{base_url: 'ftp://directory'}", 'stores.rest.base_url: "ftp://directory" is not an'),
        ("{base_url: 'https://d/x?a=b'}", 'stores.rest.base_url: "https://d/x?a=b" is not an'),
        ("{base_url: 'https://d', token: 'two words'}", "stores.rest.token: only printable"),
        ("{base_url: 'https://d', timeout: 0s}", "stores.rest.timeout: must be more than 0s"),
    ],
)
def test_bad_rest_config_names_the_key(rest: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(f"stores: {{order: [rest], rest: {rest}}}", Path("."))
    assert str(info.value).startswith(message)
    assert "two words" not in str(info.value)


def test_rest_config_loads() -> None:
    config = load_config_text(
        "stores: {order: [rest], rest: {base_url: 'https://d/id', token: 'abc',"
        " listable: true, roles: true, timeout: 300ms}}",
        Path("."),
    )
    assert config.stores.rest == RestStoreConfig(
        base_url="https://d/id", token="abc", listable=True, roles=True, timeout=Duration(0.3)
    )
