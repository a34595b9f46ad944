"""Identity stores behind the lookup API and invite resolution: the hashed copy of listable stores
(store_threepids), the sync that keeps it, store order, live (non-listable) stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from appservice.crypto.hashing import lookup_hash
from appservice.db.invites import BOUND, PENDING
from appservice.db.store_threepids import StoreThreepidStore
from appservice.identity_stores import IdentityStore, StoreEntry, StoreError, Threepid
from tests.api.test_invites import invite, invite_state, outbox_of
from tests.support.api_server import Api

LOOKUP = "/_matrix/identity/v2/lookup"

config_yaml_static = """
api:
  v1_enabled: true  # the v1 lookups ask the stores too
lookup:
  algorithms: [sha256, none]
stores:
  order: [static]
  static:
    threepids:
      - {medium: email, address: Alice@Example.ORG, mxid: "@alice:example.org"}
      - {medium: msisdn, address: "+4915123456789", mxid: "@alice:example.org"}
      - {medium: email, address: carol@example.org, mxid: "@carol:example.org"}
    roles:
      "@alice:example.org": [inviters]
"""


@pytest.fixture
def config_yaml() -> str:
    """Every test here starts with the static store configured."""
    return config_yaml_static


class MemoryStore:
    """A store whose content a test changes; ``listable`` decides copy or live asking."""

    def __init__(
        self, name: str, entries: dict[Threepid, str] | None = None, *, listable: bool = True
    ) -> None:
        self.name = name
        self.listable = listable
        self.entries_by_3pid = dict(entries or {})
        self.failing = False
        self.asked: list[list[Threepid]] = []

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def find(self, threepids: Sequence[Threepid]) -> dict[Threepid, str]:
        """Known 3PIDs among ``threepids``."""
        self.asked.append(list(threepids))
        if self.failing:
            raise StoreError("memory store is down")
        return {t: self.entries_by_3pid[t] for t in threepids if t in self.entries_by_3pid}

    async def entries(self) -> AsyncIterator[StoreEntry]:
        """All entries."""
        if self.failing:
            raise StoreError("memory store is down")
        for (medium, address), mxid in self.entries_by_3pid.items():
            yield StoreEntry(medium, address, mxid)

    async def roles(self, mxid: str) -> frozenset[str]:
        """No roles."""
        return frozenset()


async def use_stores(api: Api, *stores: IdentityStore) -> None:
    """Replace the running server's stores (shared by lookup, resolution and sync)."""
    # The test syncs and resolves by itself: no background sync or resolution may run alongside
    # (a resolution that ran first would leave the test's own call nothing to resolve).
    await api.server.store_sync_job.stop()
    await api.server.resolution_job.stop()
    api.server.stores.all = tuple(stores)


async def sync_all(api: Api) -> None:
    """Sync every listable store now, whatever its lease (the background sync is stopped)."""
    await api.server.store_sync_job.stop()
    for store in api.server.stores.listable:
        await api.server.store_sync.sync(store)


async def hashed_lookup(api: Api, token: str, *threepids: Threepid) -> dict[str, str]:
    """POST /lookup (sha256) of ``threepids``; address -> mxid of those found."""
    pepper = api.server.lookup.pepper
    hashes = {lookup_hash(a, m, pepper): a for m, a in threepids}
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": list(hashes)},
    )
    assert status == 200, body
    return {hashes[h]: mxid for h, mxid in body["mappings"].items()}


async def test_hashed_lookup_finds_static_store_entries_once_synced(api: Api) -> None:
    _, token = await api.register()
    await sync_all(api)
    found = await hashed_lookup(
        api,
        token,
        ("email", "alice@example.org"),
        ("msisdn", "4915123456789"),
        ("email", "nobody@example.org"),
    )
    assert found == {
        "alice@example.org": "@alice:example.org",
        "4915123456789": "@alice:example.org",
    }


async def test_a_binding_wins_over_a_store(api: Api) -> None:
    _, token = await api.register()
    await sync_all(api)
    await api.add_binding("email", "alice@example.org", "@alice2:hs.test")
    found = await hashed_lookup(api, token, ("email", "alice@example.org"))
    assert found == {"alice@example.org": "@alice2:hs.test"}


async def test_the_first_store_in_order_wins(api: Api) -> None:
    _, token = await api.register()
    first = MemoryStore("ldap", {("email", "dave@example.org"): "@dave:first.test"})
    second = MemoryStore("rest", {("email", "dave@example.org"): "@dave:second.test"})
    await use_stores(api, first, second)
    await sync_all(api)
    assert await hashed_lookup(api, token, ("email", "dave@example.org")) == {
        "dave@example.org": "@dave:first.test"
    }
    await use_stores(api, second, first)
    assert await hashed_lookup(api, token, ("email", "dave@example.org")) == {
        "dave@example.org": "@dave:second.test"
    }


async def test_sync_writes_only_changes_and_forgets_removed_entries(api: Api) -> None:
    _, token = await api.register()
    store = MemoryStore(
        "ldap",
        {("email", "a@example.org"): "@a:hs.test", ("email", "b@example.org"): "@b:hs.test"},
    )
    await use_stores(api, store)
    first = await api.server.store_sync.sync(store)
    assert first is not None and (first.added, first.changed, first.removed) == (2, 0, 0)
    store.entries_by_3pid[("email", "b@example.org")] = "@b2:hs.test"
    del store.entries_by_3pid[("email", "a@example.org")]
    store.entries_by_3pid[("email", "c@example.org")] = "@c:hs.test"
    second = await api.server.store_sync.sync(store)
    assert second is not None
    assert (second.entries, second.added, second.changed, second.removed) == (2, 1, 1, 1)
    found = await hashed_lookup(
        api,
        token,
        ("email", "a@example.org"),
        ("email", "b@example.org"),
        ("email", "c@example.org"),
    )
    assert found == {"b@example.org": "@b2:hs.test", "c@example.org": "@c:hs.test"}
    again = await api.server.store_sync.sync(store)
    assert again is not None and (again.added, again.changed, again.removed) == (0, 0, 0)


async def test_sync_canonicalises_and_skips_invalid_addresses(api: Api) -> None:
    _, token = await api.register()
    store = MemoryStore(
        "ldap",
        {
            ("email", "  Eve@Example.ORG "): "@eve:hs.test",
            ("email", "not an address"): "@x:hs.test",
            ("fax", "123"): "@x:hs.test",
        },
    )
    await use_stores(api, store)
    result = await api.server.store_sync.sync(store)
    assert result is not None and result.entries == 1
    assert await hashed_lookup(api, token, ("email", "eve@example.org")) == {
        "eve@example.org": "@eve:hs.test"
    }


async def test_a_failing_store_keeps_its_last_copy(api: Api) -> None:
    _, token = await api.register()
    store = MemoryStore("ldap", {("email", "f@example.org"): "@f:hs.test"})
    await use_stores(api, store)
    await api.server.store_sync.sync(store)
    store.failing = True
    assert await api.server.store_sync.sync(store) is None
    state = await StoreThreepidStore(api.server.db).state("ldap")
    assert state is not None and state.last_error == "memory store is down"
    assert state.entries == 1
    assert await hashed_lookup(api, token, ("email", "f@example.org")) == {
        "f@example.org": "@f:hs.test"
    }


async def test_a_new_pepper_rehashes_the_copy(api: Api) -> None:
    _, token = await api.register()
    await sync_all(api)
    api.server.lookup._pepper = "newpepper"  # as a pepper rotation would
    await sync_all(api)
    assert await hashed_lookup(api, token, ("email", "carol@example.org")) == {
        "carol@example.org": "@carol:example.org"
    }


async def test_only_one_instance_holds_the_sync_lease(api: Api) -> None:
    await api.server.store_sync_job.stop()
    copies = StoreThreepidStore(api.server.db)
    now = api.server.clock.now_ms()
    assert await copies.claim("ldap", now, now - 300_000, 60_000)
    assert not await copies.claim("ldap", now, now - 300_000, 60_000)
    await copies.finish("ldap", now, "p", 0, None)
    # Released, but synced just now: not due until the interval has passed.
    assert not await copies.claim("ldap", now + 1000, now + 1000 - 300_000, 60_000)
    assert await copies.claim("ldap", now + 301_000, now + 1000, 60_000)


async def test_copies_of_stores_no_longer_configured_are_dropped(api: Api) -> None:
    _, token = await api.register()
    await sync_all(api)
    await use_stores(api)
    await api.server.store_sync.sync_due()
    copies = StoreThreepidStore(api.server.db)
    assert await copies.snapshot("static") == {}
    assert await hashed_lookup(api, token, ("email", "alice@example.org")) == {}


async def test_plain_lookups_ask_live_stores_and_skip_a_failing_one(api: Api) -> None:
    _, token = await api.register()
    broken = MemoryStore("ldap", listable=False)
    broken.failing = True
    live = MemoryStore("rest", {("email", "gina@example.org"): "@gina:hs.test"}, listable=False)
    await use_stores(api, broken, live)
    pepper = api.server.lookup.pepper
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={
            "algorithm": "none",
            "pepper": pepper,
            "addresses": ["Gina@example.org email", "nobody@example.org email"],
        },
    )
    assert status == 200, body
    assert body["mappings"] == {"Gina@example.org email": "@gina:hs.test"}
    # Only the addresses unknown to the bindings and copies were asked, canonical.
    assert [("email", "gina@example.org"), ("email", "nobody@example.org")] in live.asked
    status, body = await api.request(
        "POST",
        "/_matrix/identity/api/v1/bulk_lookup",
        json={"threepids": [["email", "gina@example.org"]]},
    )
    assert status == 200, body
    assert body["threepids"] == [["email", "gina@example.org", "@gina:hs.test"]]


async def test_v1_lookup_signs_a_store_answer_like_a_binding(api: Api) -> None:
    await sync_all(api)
    status, body = await api.request(
        "GET", "/_matrix/identity/api/v1/lookup?medium=email&address=alice@example.org"
    )
    assert status == 200, body
    assert body["mxid"] == "@alice:example.org"
    assert body["not_before"] <= api.server.clock.now_ms() < body["not_after"]
    assert set(body["signatures"]) == {api.server.config.server.name}


async def test_a_pending_invite_resolves_when_the_person_appears_in_a_store(api: Api) -> None:
    pending = await invite(api, "henry@example.org")
    store = MemoryStore("ldap")
    await use_stores(api, store)
    await api.server.store_sync.sync(store)
    assert await api.server.invites.resolve_bound() == 0
    assert (await invite_state(api, pending.id)).state == PENDING
    store.entries_by_3pid[("email", "henry@example.org")] = "@henry:hs.test"
    await api.server.store_sync.sync(store)
    assert await api.server.invites.resolve_bound() == 1
    resolved = await invite_state(api, pending.id)
    assert (resolved.state, resolved.resolved_mxid) == (BOUND, "@henry:hs.test")
    [entry] = await outbox_of(api, pending.id)
    assert entry.destination == "hs.test"


async def test_a_pending_invite_resolves_through_a_live_store(api: Api) -> None:
    pending = await invite(api, "iris@example.org")
    other = await invite(api, "nobody@example.org")
    live = MemoryStore("rest", {("email", "iris@example.org"): "@iris:hs.test"}, listable=False)
    await use_stores(api, live)
    assert await api.server.invites.resolve_bound() == 1
    assert (await invite_state(api, pending.id)).resolved_mxid == "@iris:hs.test"
    assert (await invite_state(api, other.id)).state == PENDING
