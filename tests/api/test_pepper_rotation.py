"""Rotating the lookup pepper (issue 20), on SQLite and PostgreSQL: every hash recomputed while
lookups go on, all instances switching within seconds, the previous pepper answered during
``lookup.pepper_grace`` and refused after it, the schedule, one rotation at a time."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator

import pytest

from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.crypto.hashing import lookup_hash
from appservice.db.lookup_peppers import PepperStore
from appservice.services.lookup import PEPPER_STATE_TTL_S
from appservice.services.pepper_rotation import LEASE_MS, PepperRotation, RotationRefused
from tests.api.test_invites import stop_background_jobs
from tests.support.api_server import Api

HASH_DETAILS = "/_matrix/identity/v2/hash_details"
LOOKUP = "/_matrix/identity/v2/lookup"
GRACE_S = 600
# Rows of the large rotation test (the issue asks for 100k; see the test's docstring).
MANY = 100_000


@pytest.fixture
def config_yaml() -> str:
    return (
        "lookup: {pepper_rotation: 30d, pepper_grace: 10m}\n"
        "stores:\n"
        "  order: [static]\n"
        "  static: {threepids: [{medium: email, address: carol@example.org,"
        " mxid: '@carol:hs.test'}]}\n"
    )


@pytest.fixture(autouse=True)
async def _no_background_jobs(api: Api) -> None:
    """The tests rotate and sync themselves (the rotation job would resume or start one)."""
    await stop_background_jobs(api)
    await api.server.store_sync.sync_due()


@contextlib.asynccontextmanager
async def second_instance(api: Api, clock: FakeClock) -> AsyncIterator[IdentityServer]:
    """Another instance on the same database (its jobs not running), as a second process or the
    ``pepper rotate`` command would be."""
    server = IdentityServer(api.server.config, clock=clock)
    await server.open()
    try:
        yield server
    finally:
        await server.stop()


async def hash_details(api: Api, token: str) -> str:
    status, body = await api.request("GET", HASH_DETAILS, token=token)
    assert status == 200, body
    return str(body["lookup_pepper"])


async def lookup(
    api: Api, token: str, pepper: str, threepids: list[tuple[str, str]]
) -> tuple[int, dict[str, object]]:
    """POST /lookup of ``threepids`` hashed with ``pepper``; (status, body with ``mappings`` keyed
    by address when 200)."""
    by_hash = {lookup_hash(a, m, pepper): a for m, a in threepids}
    status, body = await api.request(
        "POST",
        LOOKUP,
        token=token,
        json={"algorithm": "sha256", "pepper": pepper, "addresses": list(by_hash)},
    )
    if status == 200:
        body = {"mappings": {by_hash[h]: mxid for h, mxid in body["mappings"].items()}}
    return status, body


THREEPIDS = [
    ("email", "alice@example.org"),
    ("msisdn", "15551230000"),
    ("email", "carol@example.org"),
]
FOUND = {
    "alice@example.org": "@alice:hs.test",
    "15551230000": "@bob:hs.test",
    "carol@example.org": "@carol:hs.test",  # from the static store's copy
}


async def test_rotation_rehashes_bindings_and_store_copies_and_keeps_the_old_pepper_for_the_grace(
    api: Api, clock: FakeClock
) -> None:
    _, token = await api.register()
    await api.add_binding("email", "alice@example.org", "@alice:hs.test")
    await api.add_binding("msisdn", "15551230000", "@bob:hs.test")
    first = await hash_details(api, token)
    assert await lookup(api, token, first, THREEPIDS) == (200, {"mappings": FOUND})

    result = await api.server.pepper_rotation.rotate()
    assert (result.generation, result.rows, result.resumed) == (1, 3, False)
    second = await hash_details(api, token)
    assert second != first and second.isalnum() and len(second) >= 32
    assert await lookup(api, token, second, THREEPIDS) == (200, {"mappings": FOUND})
    # The previous pepper, within its grace: answered from its own hashes.
    clock.advance(GRACE_S - 1)
    assert await lookup(api, token, first, THREEPIDS) == (200, {"mappings": FOUND})

    # After the grace: 400 M_INVALID_PEPPER with what the client needs to retry.
    clock.advance(1)
    status, body = await lookup(api, token, first, THREEPIDS)
    assert status == 400
    assert body == {
        "errcode": "M_INVALID_PEPPER",
        "error": "Unknown or invalid pepper",
        "algorithm": "sha256",
        "lookup_pepper": second,
    }

    # A second rotation writes the first slot again: generation 2 answers, 1 in its grace.
    result = await api.server.pepper_rotation.rotate()
    assert (result.generation, result.rows) == (2, 3)
    third = await hash_details(api, token)
    assert third not in (first, second)
    assert await lookup(api, token, third, THREEPIDS) == (200, {"mappings": FOUND})
    assert await lookup(api, token, second, THREEPIDS) == (200, {"mappings": FOUND})
    assert (await lookup(api, token, first, THREEPIDS))[0] == 400
    # The store copy was rebased, not rewritten: the next sync finds nothing to change.
    [synced] = await api.server.store_sync.sync_due() or [None]
    assert synced is None or (synced.added, synced.changed, synced.removed) == (0, 0, 0)
    assert await lookup(api, token, third, THREEPIDS) == (200, {"mappings": FOUND})


async def test_a_rotation_is_refused_during_the_grace_and_while_another_runs(
    api: Api, clock: FakeClock
) -> None:
    await api.server.pepper_rotation.rotate()
    with pytest.raises(RotationRefused, match="previous pepper is answered until"):
        await api.server.pepper_rotation.rotate()
    clock.advance(GRACE_S)

    # Another instance holds the lease (it began a rotation, then its process died).
    peppers = PepperStore(api.server.db)
    assert await peppers.claim("dead-instance", clock.now_ms(), LEASE_MS) is not None
    assert await peppers.begin("dead-instance", "NextPepper1234567890", clock.now_ms())
    with pytest.raises(RotationRefused, match=r"a rotation is running \(dead-instance"):
        await api.server.pepper_rotation.rotate()
    assert await api.server.pepper_rotation.rotate_due() is None

    # Once its lease ran out, the rotation job finishes that rotation (with its pepper).
    clock.advance(LEASE_MS / 1000 + 1)
    result = await api.server.pepper_rotation.rotate_due()
    assert result is not None and (result.generation, result.resumed) == (2, True)
    _, token = await api.register()
    assert await hash_details(api, token) == "NextPepper1234567890"


async def test_the_scheduled_rotation_fires_when_the_pepper_is_old_enough(
    api: Api, clock: FakeClock
) -> None:
    rotation = api.server.pepper_rotation
    assert await rotation.rotate_due() is None
    clock.advance(30 * 86400 - 1)
    assert await rotation.rotate_due() is None
    clock.advance(1)
    result = await rotation.rotate_due()
    assert result is not None and result.generation == 1
    assert await rotation.rotate_due() is None
    clock.advance(30 * 86400)
    result = await rotation.rotate_due()
    assert result is not None and result.generation == 2


async def test_the_rotation_job_rotates_on_schedule(api: Api, clock: FakeClock) -> None:
    clock.advance(30 * 86400)
    api.server.pepper_rotation_job.start()
    try:
        for _ in range(100):
            if (await PepperStore(api.server.db).load()).generation == 1:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the rotation job did not rotate")
    finally:
        await api.server.pepper_rotation_job.stop()


async def test_two_instances_answer_the_new_pepper_within_the_target(
    api: Api, clock: FakeClock
) -> None:
    _, token = await api.register()
    await api.add_binding("email", "alice@example.org", "@alice:hs.test")
    await api.add_binding("msisdn", "15551230000", "@bob:hs.test")
    first = await hash_details(api, token)
    async with second_instance(api, clock) as other:
        result = await other.pepper_rotation.rotate()  # as `pepper rotate` in another process
        switched_at = time.monotonic()
        new = (await other.lookup.pepper_state()).pepper
        # A client that got the new pepper from the other instance is answered here at once.
        assert await lookup(api, token, new, THREEPIDS) == (200, {"mappings": FOUND})
        # And this instance advertises it within the state's read interval.
        while await hash_details(api, token) != new:
            assert time.monotonic() - switched_at < PEPPER_STATE_TTL_S + 1
            await asyncio.sleep(0.05)
    assert result.generation == 1 and new != first
    assert await lookup(api, token, first, THREEPIDS) == (200, {"mappings": FOUND})


async def test_bindings_made_during_the_rotation_are_found_by_both_peppers(
    api: Api, clock: FakeClock
) -> None:
    _, token = await api.register()
    await api.add_binding("email", "alice@example.org", "@alice:hs.test")
    await api.add_binding("msisdn", "15551230000", "@bob:hs.test")
    first = await hash_details(api, token)
    async with second_instance(api, clock) as other:
        # The other instance rotates in small batches; this one binds while it runs, some
        # bindings before it has read that a rotation began (its state is up to a second old).
        rotation = PepperRotation(
            PepperStore(other.db), other.config.lookup, clock, batch=1, owner="other"
        )
        task = asyncio.create_task(rotation.rotate())
        made: list[tuple[str, str]] = []
        while not task.done():
            address = f"during{len(made)}@example.org"
            await api.add_binding("email", address, f"@during{len(made)}:hs.test")
            made.append(("email", address))
            await asyncio.sleep(0.02)
        result = await task
    assert result.generation == 1 and len(made) > 20
    expected = {**FOUND, **{a: f"@{a.split('@')[0]}:hs.test" for _, a in made}}
    second = (await api.server.lookup.refresh_pepper()).pepper
    assert await lookup(api, token, second, THREEPIDS + made) == (200, {"mappings": expected})
    assert await lookup(api, token, first, THREEPIDS + made) == (200, {"mappings": expected})
    # And made after the switch, by an instance that may not know of it yet.
    await api.add_binding("email", "after@example.org", "@after:hs.test")
    for pepper in (first, second):
        found = await lookup(api, token, pepper, [("email", "after@example.org")])
        assert found == (200, {"mappings": {"after@example.org": "@after:hs.test"}})


async def _insert_bindings(api: Api, count: int, pepper: str) -> None:
    now = api.server.clock.now_ms()
    rows = [
        (
            "email",
            f"user{i}@example.org",
            f"@user{i}:hs.test",
            lookup_hash(f"user{i}@example.org", "email", pepper),
            now,
            now,
            now + 10**12,
        )
        for i in range(count)
    ]
    async with api.server.db.transaction() as conn:
        await conn.executemany(
            "INSERT INTO bindings (medium, address, mxid, lookup_hash, created_ts, not_before,"
            " not_after) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            rows,
        )


async def test_lookups_keep_working_while_many_bindings_are_rehashed(
    api: Api, clock: FakeClock
) -> None:
    """100,000 bindings rehashed while lookups of 100 addresses (hits and misses) run back to
    back: every answer is complete and right, none fails, none waits long."""
    _, token = await api.register()
    first = await hash_details(api, token)
    await _insert_bindings(api, MANY, first)
    rng = random.Random(20)

    async def check(pepper: str) -> float:
        picked = [("email", f"user{rng.randrange(MANY)}@example.org") for _ in range(90)]
        missing = [("email", f"nobody{n}@example.org") for n in range(10)]
        started = time.perf_counter()
        status, body = await lookup(api, token, pepper, picked + missing)
        took = time.perf_counter() - started
        assert status == 200, body
        assert body["mappings"] == {a: f"@{a.split('@')[0]}:hs.test" for _, a in picked}
        return took

    async with second_instance(api, clock) as other:
        started = time.perf_counter()
        task = asyncio.create_task(other.pepper_rotation.rotate())
        latencies = []
        while not task.done():
            latencies.append(await check(first))
            await asyncio.sleep(0)
        result = await task
        rotation_s = time.perf_counter() - started
    assert result.rows == MANY + 1  # and the static store's entry
    assert len(latencies) > 10
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    print(f"\n{MANY} rows in {rotation_s:.1f} s; {len(latencies)} lookups, p99 {p99 * 1000:.1f} ms")
    assert p99 < 0.5
    second = (await api.server.lookup.refresh_pepper()).pepper
    await check(second)
    await check(first)
