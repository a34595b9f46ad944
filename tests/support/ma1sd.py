"""An ma1sd deployment laid out as ma1sd leaves it, built by the tests from facts about its data.

The store's tables are those ORMLite makes for ma1sd's invite classes (camelCase columns, quoted,
so case-sensitive on PostgreSQL); the key store is ma1sd's ``key.path`` directory. See
:mod:`appservice.importers.ma1sd` for the facts.
"""

from __future__ import annotations

import base64
import json
import secrets
import sqlite3
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import nacl.signing

# ORMLite's DDL for ma1sd's ThreePidInviteIO / HistoricalThreePidInviteIO on SQLite.
SQLITE_DDL = (
    "CREATE TABLE `invite_3pid` (`id` VARCHAR , `token` VARCHAR NOT NULL ,"
    " `sender` VARCHAR NOT NULL , `medium` VARCHAR NOT NULL , `address` VARCHAR NOT NULL ,"
    " `roomId` VARCHAR NOT NULL , `properties` VARCHAR , PRIMARY KEY (`id`) )",
    "CREATE TABLE `invite_3pid_history` (`resolvedTo` VARCHAR NOT NULL ,"
    " `resolvedAt` BIGINT NOT NULL , `couldPublish` BOOLEAN NOT NULL ,"
    " `publishAttempts` BIGINT NOT NULL , `id` VARCHAR , `token` VARCHAR NOT NULL ,"
    " `sender` VARCHAR NOT NULL , `medium` VARCHAR NOT NULL , `address` VARCHAR NOT NULL ,"
    " `roomId` VARCHAR NOT NULL , `properties` VARCHAR , PRIMARY KEY (`id`) )",
    # Other tables of the same store, which the import leaves alone.
    "CREATE TABLE `session_3pid` (`id` VARCHAR , `medium` VARCHAR , `address` VARCHAR ,"
    " PRIMARY KEY (`id`) )",
    "CREATE TABLE `hashes` (`mxid` VARCHAR NOT NULL , `medium` VARCHAR NOT NULL ,"
    " `address` VARCHAR NOT NULL , `hash` VARCHAR NOT NULL , PRIMARY KEY (`hash`) )",
)
# The same on PostgreSQL, quoted identifiers as ORMLite (and the documented pgloader migration
# with "quote identifiers") make them; properties as text, as pgloader copies it.
POSTGRES_DDL = tuple(
    ddl.replace("`", '"').replace('"properties" VARCHAR', '"properties" TEXT') for ddl in SQLITE_DDL
)
_INVITE_COLUMNS = ("id", "token", "sender", "medium", "address", "roomId", "properties")
_HISTORY_COLUMNS = (*_INVITE_COLUMNS, "resolvedTo", "resolvedAt", "couldPublish", "publishAttempts")


def new_serial(dash: bool = False) -> str:
    """A key serial as ma1sd makes them: URL-safe base64 of 8 bytes of ms since 2019, then one
    letter or digit. About one in ten of ma1sd's holds a ``-``; ``dash`` asks for one, else
    none (key ids of ``[A-Za-z0-9_]`` only, as the Matrix spec's grammar has them)."""
    while True:
        ms = int(time.time() * 1000) - 1546297200000 + secrets.randbelow(10**9)
        stamp = base64.urlsafe_b64encode(ms.to_bytes(8, "big")).decode().rstrip("=")
        if dash:
            stamp = stamp[:-2] + "-" + stamp[-1]
        if dash or "-" not in stamp:
            return stamp + secrets.choice(string.ascii_letters + string.digits)


def unpadded(raw: bytes) -> str:
    """Unpadded standard base64, as ma1sd writes keys."""
    return base64.b64encode(raw).decode().rstrip("=")


def public_key(seed: bytes) -> str:
    """The unpadded base64 ed25519 public key of ``seed``."""
    return unpadded(bytes(nacl.signing.SigningKey(seed).verify_key))


@dataclass
class Ma1sdKeys:
    """ma1sd's ``key.path``: writes key files as ma1sd does."""

    path: Path

    def write_key(self, kind: str, serial: str, seed: bytes, valid: bool = True) -> None:
        """Write ``<kind>/ed25519/<serial>`` (kind: regular or ephemeral)."""
        directory = self.path / kind / "ed25519"
        directory.mkdir(parents=True, exist_ok=True)
        body = {"version": "0", "is_valid": valid, "key": unpadded(seed)}
        (directory / serial).write_text(json.dumps(body))

    def set_current(self, serial: str) -> None:
        """Write ``current`` naming the regular key ``serial``."""
        self.path.mkdir(parents=True, exist_ok=True)
        current = {"type": "Regular", "algo": "ed25519", "serial": serial}
        (self.path / "current").write_text(json.dumps(current))

    def new_regular(
        self, current: bool = True, valid: bool = True, dash: bool = False
    ) -> tuple[str, bytes]:
        """A fresh regular key (made current unless told otherwise): its serial and seed."""
        serial, seed = new_serial(dash), secrets.token_bytes(32)
        self.write_key("regular", serial, seed, valid)
        if current:
            self.set_current(serial)
        return serial, seed


@dataclass
class Ma1sdInvite:
    """One row of ``invite_3pid`` (or of its history), as ma1sd stored it."""

    id: str
    token: str
    sender: str
    medium: str
    address: str
    room_id: str
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def created_at(self) -> int:
        """``properties.created_at``, in ms."""
        return int(self.properties["created_at"])


def make_invite(
    keys: Ma1sdKeys | None,
    signing_serial: str,
    signing_seed: bytes,
    *,
    address: str,
    room_id: str,
    sender: str,
    created_at: int,
    room_name: str = "Team room",
    ephemeral_valid: bool = True,
) -> tuple[Ma1sdInvite, bytes]:
    """An invite as ma1sd's store-invite stored it, with a fresh ephemeral key written to
    ``keys`` (when given); the invite and the ephemeral key's seed."""
    e_serial, e_seed = new_serial(), secrets.token_bytes(32)
    if keys is not None:
        keys.write_key("ephemeral", e_serial, e_seed, ephemeral_valid)
    domain = sender.partition(":")[2]
    raw_id = (domain + "email" + address).lower().encode()
    properties = {
        # The store-invite request as Synapse sends it, unset fields empty.
        "medium": "email",
        "address": address,
        "room_id": room_id,
        "sender": sender,
        "sender_display_name": "Alice",
        "sender_avatar_url": "",
        "room_name": room_name,
        "room_alias": "",
        "room_avatar_url": "",
        "room_join_rules": "invite",
        # What ma1sd added.
        "created_at": str(created_at),
        "p_key_algo": "ed25519",
        "p_key_serial": signing_serial,
        "p_key_public": public_key(signing_seed),
        "e_key_algo": "ed25519",
        "e_key_serial": e_serial,
        "e_key_public": public_key(e_seed),
    }
    invite = Ma1sdInvite(
        id=base64.urlsafe_b64encode(raw_id).decode().rstrip("="),
        token="".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(64)),
        sender=sender,
        medium="email",
        address=address,
        room_id=room_id,
        properties=properties,
    )
    return invite, e_seed


def _invite_values(invite: Ma1sdInvite) -> list[object]:
    return [
        invite.id,
        invite.token,
        invite.sender,
        invite.medium,
        invite.address,
        invite.room_id,
        json.dumps(invite.properties),
    ]


def _history_values(invite: Ma1sdInvite) -> list[object]:
    return [*_invite_values(invite), "@resolved:example.org", invite.created_at + 1000, True, 1]


def create_sqlite_store(
    path: Path, pending: Sequence[Ma1sdInvite], resolved: Sequence[Ma1sdInvite] = ()
) -> None:
    """Create ma1sd's SQLite store at ``path`` holding these invites."""
    conn = sqlite3.connect(path)
    try:
        for ddl in SQLITE_DDL:
            conn.execute(ddl)
        add_sqlite_invites(conn, pending, resolved)
        conn.commit()
    finally:
        conn.close()


def add_sqlite_invites(
    conn: sqlite3.Connection, pending: Sequence[Ma1sdInvite], resolved: Sequence[Ma1sdInvite]
) -> None:
    """Insert rows as ma1sd's ORMLite DAOs would."""
    columns = ", ".join(f"`{c}`" for c in _INVITE_COLUMNS)
    marks = ", ".join("?" for _ in _INVITE_COLUMNS)
    for invite in pending:
        conn.execute(
            f"INSERT INTO `invite_3pid` ({columns}) VALUES ({marks})", _invite_values(invite)
        )
    columns = ", ".join(f"`{c}`" for c in _HISTORY_COLUMNS)
    marks = ", ".join("?" for _ in _HISTORY_COLUMNS)
    for invite in resolved:
        conn.execute(
            f"INSERT INTO `invite_3pid_history` ({columns}) VALUES ({marks})",
            _history_values(invite),
        )


async def create_postgres_store(
    url: str, pending: Sequence[Ma1sdInvite], resolved: Sequence[Ma1sdInvite] = ()
) -> None:
    """Create ma1sd's tables in the (empty) PostgreSQL database or schema ``url``."""
    conn = await asyncpg.connect(url)
    try:
        for ddl in POSTGRES_DDL:
            await conn.execute(ddl)
        columns = ", ".join(f'"{c}"' for c in _INVITE_COLUMNS)
        marks = ", ".join(f"${i + 1}" for i in range(len(_INVITE_COLUMNS)))
        for invite in pending:
            await conn.execute(
                f'INSERT INTO "invite_3pid" ({columns}) VALUES ({marks})', *_invite_values(invite)
            )
        columns = ", ".join(f'"{c}"' for c in _HISTORY_COLUMNS)
        marks = ", ".join(f"${i + 1}" for i in range(len(_HISTORY_COLUMNS)))
        for invite in resolved:
            await conn.execute(
                f'INSERT INTO "invite_3pid_history" ({columns}) VALUES ({marks})',
                *_history_values(invite),
            )
    finally:
        await conn.close()


async def create_store(
    db: str, pending: Sequence[Ma1sdInvite], resolved: Sequence[Ma1sdInvite] = ()
) -> None:
    """Create ma1sd's store at ``db``: an SQLite path or a PostgreSQL URL."""
    if db.startswith(("postgres://", "postgresql://")):
        await create_postgres_store(db, pending, resolved)
    else:
        create_sqlite_store(Path(db), pending, resolved)
