"""Onbind delivery under faults, with real processes and real time (both databases).

A server process (``python -m appservice run``) drains a queue into a slow homeserver and is
killed with SIGKILL, or stopped with SIGTERM, while its requests are in flight. Leases are short
here (1 s) so the tests take seconds; the figures scale with ``invites.delivery.lease``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appservice.app import IdentityServer
from appservice.clock import Clock
from appservice.config import load_config_text
from appservice.db.outbox import DELIVERED, PENDING, OutboxStore
from tests.support.homeserver import FakeHomeserver
from tests.support.synapse import free_port

REPO = Path(__file__).resolve().parents[2]
COUNT = 40
CONCURRENCY = 8
LEASE_S = 1.0
POLL_S = 0.2


def settings(database_url: str, homeserver: FakeHomeserver) -> dict[str, Any]:
    """The config both the process under test and the test's own instance use."""
    return {
        "server": {"name": "id.test", "public_base_url": "https://id.test"},
        "database": {"url": database_url},
        "federation": {
            "overrides": {homeserver.server_name: homeserver.base_url},
            "allowed_networks": ["127.0.0.0/8"],
        },
        "invites": {
            "delivery": {
                "lease": f"{LEASE_S}s",
                "poll_interval": f"{int(POLL_S * 1000)}ms",
                "concurrency": CONCURRENCY,
            },
            "resolution_interval": "1h",
        },
        "stores": {"sync_interval": "1h"},
    }


async def queue_onbinds(server: IdentityServer, count: int) -> None:
    """``count`` bound invites whose onbind notifications are queued (written directly)."""
    now = server.clock.now_ms()
    async with server.db.transaction() as conn:
        for n in range(count):
            invite_id, token, mxid = f"inv{n}", secrets.token_urlsafe(32), f"@guest{n}:hs.test"
            await conn.execute(
                "INSERT INTO invites (id, token, medium, address, room_id, sender, display_name,"
                " ephemeral_public_key, details, created_ts, state, resolved_mxid, resolved_ts)"
                " VALUES ($1, $2, 'email', $3, '!room:hs.test', '@alice:hs.test', 'g…@e…', $4,"
                " '{}', $5, 'bound', $6, $5)",
                invite_id,
                token,
                f"guest{n}@example.com",
                f"key{n}",
                now,
                mxid,
            )
            signed = server.keyring.sign({"mxid": mxid, "token": token}, "id.test")
            item = {
                "medium": "email",
                "address": f"guest{n}@example.com",
                "mxid": mxid,
                "room_id": "!room:hs.test",
                "sender": "@alice:hs.test",
                "signed": signed,
            }
            body = {"medium": "email", "address": item["address"], "mxid": mxid, "invites": [item]}
            await conn.execute(
                "INSERT INTO onbind_outbox (id, invite_id, destination, body, state, created_ts,"
                " next_attempt_ts) VALUES ($1, $2, 'hs.test', $3, $4, $5, $5)",
                f"out{n}",
                invite_id,
                json.dumps(body),
                PENDING,
                now,
            )


class Setup:
    """A config file, a prepared database with a queue, and the slow homeserver."""

    def __init__(self, tmp_path: Path, database_url: str, homeserver: FakeHomeserver) -> None:
        self.tmp_path = tmp_path
        self.homeserver = homeserver
        self.settings = settings(database_url, homeserver)
        self.config_path = tmp_path / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.settings))
        self.config = load_config_text(yaml.safe_dump(self.settings), tmp_path, environ={})
        self.is_postgres = not database_url.startswith("sqlite:")

    def start_process(self) -> subprocess.Popen[str]:
        """``python -m appservice run`` on this config (it starts delivering at once)."""
        return subprocess.Popen(
            [sys.executable, "-m", "appservice", "run", "-c", str(self.config_path),
             "--listen", f"127.0.0.1:{free_port()}"],
            cwd=self.tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip

    async def instance(self) -> IdentityServer:
        """An instance in this process on the same database and key, on the real clock."""
        server = IdentityServer(self.config, clock=Clock())
        await server.open()
        return server


@pytest.fixture
async def setup(
    tmp_path: Path, database_url: str, homeserver: FakeHomeserver
) -> AsyncIterator[Setup]:
    """The queue of COUNT notifications to a homeserver that takes 1 s per onbind."""
    homeserver.onbind_delay_s = 1.0
    prepared = Setup(tmp_path, database_url, homeserver)
    server = await prepared.instance()
    try:
        await queue_onbinds(server, COUNT)
    finally:
        await server.stop()
    yield prepared


async def wait_for_requests(homeserver: FakeHomeserver, count: int, within: float = 30) -> None:
    """Until ``count`` onbind requests reached the homeserver (answered or not)."""
    deadline = time.monotonic() + within
    while len(homeserver.onbind_arrivals) < count:
        assert time.monotonic() < deadline, (
            f"{len(homeserver.onbind_arrivals)} onbinds, not {count}"
        )
        await asyncio.sleep(0.02)


def finish(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.kill()
    output, _ = proc.communicate(timeout=30)
    return output


async def test_kill_9_mid_batch_is_taken_over_within_a_lease_and_nothing_is_lost(
    setup: Setup,
) -> None:
    proc = setup.start_process()
    try:
        await wait_for_requests(setup.homeserver, CONCURRENCY)  # a full set in flight
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        finish(proc)
    finally:
        finish(proc)
    # On PostgreSQL two instances survive (three behind a load balancer, one killed).
    survivors = [await setup.instance() for _ in range(2 if setup.is_postgres else 1)]
    survivor = survivors[0]
    try:
        for instance in survivors:
            instance.delivery_job.start()
        deadline = killed_at + 60
        outbox = OutboxStore(survivor.db)
        while (await outbox.count_by_state()).get(DELIVERED, 0) < COUNT:
            assert time.monotonic() < deadline, await outbox.count_by_state()
            await asyncio.sleep(0.05)
        # The first of the dead instance's rows went out again after its lease ran out.
        taken_over = [t for t in setup.homeserver.onbind_arrivals if t > killed_at]
        assert taken_over, "nothing was sent after the kill"
        recovery_s = min(taken_over) - killed_at
    finally:
        for instance in survivors:
            await instance.stop()
    tokens = [b["invites"][0]["signed"]["token"] for b in setup.homeserver.onbind_accepted]
    assert len(set(tokens)) == COUNT  # nothing lost
    duplicates = len(tokens) - COUNT
    # Only what was in flight when the process died can reach the homeserver twice (the
    # homeserver finished those requests after the sender was gone).
    assert duplicates <= CONCURRENCY
    assert recovery_s < LEASE_S + POLL_S + 1.0, recovery_s
    print(f"\nkill -9: taken over after {recovery_s:.2f}s, {duplicates} sent twice")


async def test_sigterm_with_a_full_batch_finishes_in_flight_and_releases_the_rest(
    setup: Setup,
) -> None:
    proc = setup.start_process()
    try:
        await wait_for_requests(setup.homeserver, CONCURRENCY)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output = await asyncio.to_thread(proc.communicate, timeout=30)
        took = time.monotonic() - started
    finally:
        finish(proc)
    assert proc.returncode == 0, output
    # The requests in flight were answered (1 s each) and recorded; nothing else was started.
    assert took < 10, took
    checker = await setup.instance()
    try:
        outbox = OutboxStore(checker.db)
        assert await outbox.claimed_count() == 0
        counts = await outbox.count_by_state()
        assert counts.get(DELIVERED, 0) == len(setup.homeserver.onbind_accepted)
        assert counts.get(DELIVERED, 0) + counts.get(PENDING, 0) == COUNT
        # The next instance sends the rest at once (no lease to wait for), each once.
        started = time.monotonic()
        checker.delivery_job.start()
        while (await outbox.count_by_state()).get(DELIVERED, 0) < COUNT:
            assert time.monotonic() - started < 30
            await asyncio.sleep(0.05)
    finally:
        await checker.stop()
    tokens = [b["invites"][0]["signed"]["token"] for b in setup.homeserver.onbind_accepted]
    assert sorted(tokens) == sorted(set(tokens)) and len(tokens) == COUNT
    print(f"\nSIGTERM: stopped in {took:.2f}s, 0 rows left claimed, 0 sent twice")
