"""A real sydent deployment to import from: started once per session, with data put in through
its own API (bindings, pending invites, an invite delivered by a bind)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.smtp import SmtpSink
from tests.support.sydent import (
    SydentProcess,
    bind_email,
    ensure_sydent_venv,
    store_invite,
    sydent_request,
)

ROOM = "!garden:hs.test"
OTHER_ROOM = "!kitchen:hs.test"
INVITER = "@inviter:hs.test"


@dataclass(frozen=True)
class SydentInvite:
    """An invite as sydent's store-invite answered it."""

    address: str
    room_id: str
    sender: str
    token: str
    public_key: str
    ephemeral_public_key: str


@dataclass
class RealSydent:
    """The live sydent and what was put into it."""

    process: SydentProcess
    # What sydent itself answers on GET /_matrix/identity/v2/pubkey/ed25519:0.
    public_key: str
    # address -> the mxid it is bound to now (a rebind replaced an older one).
    bindings: dict[str, str]
    pending: list[SydentInvite]
    delivered: list[SydentInvite]

    def snapshot(self, directory: Path) -> tuple[Path, Path]:
        """A consistent copy of sydent's database and its sydent.conf in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        db, conf = directory / "sydent.db", directory / "sydent.conf"
        source = sqlite3.connect(self.process.db_path)
        target = sqlite3.connect(db)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
        shutil.copyfile(self.process.config_path, conf)
        return db, conf

    async def ask(self, path: str) -> Any:
        """A GET on the live sydent; its JSON answer (which must be a 200)."""
        status, body = await sydent_request(self.process.base_url, "GET", path)
        assert status == 200, body
        return body


async def _invite(base_url: str, address: str, room_id: str, sender: str) -> SydentInvite:
    answer = await store_invite(base_url, address, room_id, sender, room_name="Garden club")
    [long_term, ephemeral] = answer["public_keys"]
    assert long_term["public_key"] == answer["public_key"]
    return SydentInvite(
        address, room_id, sender, answer["token"], answer["public_key"], ephemeral["public_key"]
    )


@pytest.fixture(scope="session")
async def real_sydent(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RealSydent]:
    """sydent 2.6.1 running on loopback for the session. It made its own schema, pepper and key;
    it holds three bindings (one bound twice: the newer mxid wins), two pending invites, and one
    invite delivered when its address was bound."""
    venv = await asyncio.to_thread(ensure_sydent_venv)
    async with SmtpSink() as smtp:
        process = SydentProcess(tmp_path_factory.mktemp("sydent"), venv=venv, smtp_port=smtp.port)
        await asyncio.to_thread(process.start)
        try:
            url = process.base_url
            delivered = [await _invite(url, "alice@example.org", ROOM, INVITER)]
            bindings = {
                "alice@example.org": "@alice:hs.test",
                "carol@example.org": "@carol:hs.test",
                "dave@example.org": "@dave.new:hs.test",
            }
            await bind_email(url, smtp, "dave@example.org", "@dave.old:hs.test")
            for address, mxid in bindings.items():
                await bind_email(url, smtp, address, mxid)
            pending = [
                await _invite(url, "erin@example.org", ROOM, INVITER),
                await _invite(url, "frank@example.org", OTHER_ROOM, "@other:hs.test"),
            ]
            status, body = await sydent_request(url, "GET", "/_matrix/identity/v2/pubkey/ed25519:0")
            assert status == 200, body
            yield RealSydent(process, body["public_key"], bindings, pending, delivered)
        finally:
            await asyncio.to_thread(process.stop)
