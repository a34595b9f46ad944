"""``python -m appservice invites list|show|expire|retry`` against a SQLite database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import signedjson.key
import signedjson.sign

from appservice import cli
from appservice.app import IdentityServer
from appservice.clock import FakeClock
from appservice.config import load_config
from appservice.crypto.signing import KeyRing
from appservice.db.bindings import Binding
from appservice.db.destinations import DestinationStore
from appservice.db.invites import InviteStore
from appservice.db.outbox import OutboxEntry, OutboxStore
from appservice.services.invites import StoreInviteRequest
from tests.conftest import run_sync

REPO = Path(__file__).resolve().parents[2]
SENDER = "@inviter:hs.test"
ROOM = "!room:hs.test"
START_S = 1_700_000_000.0  # 2023-11-14T22:13:20Z
LIST_KEYS = [
    "id",
    "state",
    "delivery",
    "homeserver",
    "created",
    "room_id",
    "sender",
    "invitee",
    "resolved_mxid",
]


def _main(*args: str) -> int:
    """The command line, in process (on its own thread, since it runs its own event loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(cli.main, list(args)).result()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appservice", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


pytestmark = pytest.mark.usefixtures("restore_logging")


@dataclass(frozen=True)
class World:
    """A config and a database with four invites, oldest first:

    - ``pending``: alice, waiting;
    - ``delivered``: bob, bound to @bob:hs.test, its onbind delivered;
    - ``failed``: carol, expired, its onbind refused;
    - ``newest``: dave, waiting, with room details.
    """

    config: Path
    pending: str
    delivered: str
    failed: str
    newest: str

    @property
    def c(self) -> list[str]:
        return ["-c", str(self.config)]


async def _open(config: Path) -> IdentityServer:
    server = IdentityServer(load_config(config, environ={}), clock=FakeClock(START_S))
    await server.db.start()
    await server.db.migrate()
    await server.keys.start()
    return server


async def _populate(config: Path) -> World:
    server = await _open(config)
    clock = server.clock
    assert isinstance(clock, FakeClock)
    outbox = OutboxStore(server.db)
    try:
        ids = []
        for name, details in (
            ("alice", {}),
            ("bob", {}),
            ("carol", {}),
            ("dave", {"room_name": "Book club", "sender_display_name": "Inviter"}),
        ):
            request = StoreInviteRequest("email", f"{name}@example.org", ROOM, SENDER, details)
            answer = await server.invites.store_invite(request, caller=SENDER, requester_ip="::1")
            assert answer["display_name"] == f"{name[0]}…@e…"
            invite = await InviteStore(server.db).by_token(answer["token"])
            assert invite is not None
            ids.append(invite.id)
            clock.advance(60)
        now = clock.now_ms()
        binding = Binding("email", "bob@example.org", "@bob:hs.test", now, now, now + 10**9)
        assert await server.invites.on_bound(binding) == 1
        (bob_entry,) = await outbox.for_invite(ids[1])
        await outbox.mark_delivered(bob_entry.id, 1, now + 5000)
        assert await server.invites.expire(ids[2])
        (carol_entry,) = await outbox.for_invite(ids[2])
        await outbox.mark_failed(carol_entry.id, 3, "403 M_FORBIDDEN: not in this room")
    finally:
        await server.stop()
    return World(config, *ids)


async def _outbox(config: Path, invite_id: str) -> list[OutboxEntry]:
    server = await _open(config)
    try:
        return await OutboxStore(server.db).for_invite(invite_id)
    finally:
        await server.stop()


@pytest.fixture
def world(tmp_path: Path) -> World:
    config = tmp_path / "config.yaml"
    assert _main("generate-config", "-c", str(config)) == 0
    return run_sync(_populate(config))


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    capsys.readouterr()
    assert _main(*args) == 0
    return json.loads(capsys.readouterr().out)


def test_help_lists_the_actions() -> None:
    assert "invites" in _cli("--help").stdout
    result = _cli("invites", "--help")
    assert result.returncode == 0
    for action in ("list", "show", "expire", "retry"):
        assert action in result.stdout
    list_help = _cli("invites", "list", "--help").stdout
    for option in ("--pending", "--expired", "--bound", "--delivered", "--failed", "--limit"):
        assert option in list_help
    assert "--json" in list_help


def test_list_is_an_aligned_table_newest_first_without_addresses(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert _main("invites", "list", *world.c) == 0
    out = capsys.readouterr().out
    assert "@example.org" not in out  # the invitee only as its redacted display name
    header, *lines = out.splitlines()
    assert header.split() == LIST_KEYS
    rows = [line.split() for line in lines]
    assert [row[0] for row in rows] == [world.newest, world.failed, world.delivered, world.pending]
    assert [row[1:4] for row in rows] == [
        ["pending", "none", "-"],
        ["expired", "failed", "-"],
        ["bound", "delivered", "-"],
        ["pending", "none", "-"],
    ]
    assert rows[-1][4:] == ["2023-11-14T22:13:20Z", ROOM, SENDER, "a…@e…", "-"]
    assert rows[1][-1] == "@_identity_invite_expired:localhost"
    assert rows[2][-1] == "@bob:hs.test"
    for column in LIST_KEYS:  # every column starts at the same place on every line
        start = header.index(column)
        assert all(line[start - 1 : start] in ("", " ") for line in lines)
        assert all(line[start] != " " for line in lines)


def test_list_json(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _json(capsys, "invites", "list", "--json", *world.c)
    assert [list(row) for row in rows] == [LIST_KEYS] * 4
    assert rows[0]["id"] == world.newest
    assert rows[-1] == {
        "id": world.pending,
        "state": "pending",
        "delivery": "none",
        "homeserver": None,
        "created": "2023-11-14T22:13:20Z",
        "room_id": ROOM,
        "sender": SENDER,
        "invitee": "a…@e…",
        "resolved_mxid": None,
    }
    assert rows[2]["resolved_mxid"] == "@bob:hs.test"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--pending"], ["newest", "pending"]),
        (["--bound"], ["delivered"]),
        (["--expired"], ["failed"]),
        (["--delivered"], ["delivered"]),
        (["--failed"], ["failed"]),
        (["--limit", "2"], ["newest", "failed"]),
        (["--pending", "--limit", "1"], ["newest"]),
    ],
)
def test_list_filters(
    world: World, capsys: pytest.CaptureFixture[str], flags: list[str], expected: list[str]
) -> None:
    rows = _json(capsys, "invites", "list", "--json", *flags, *world.c)
    assert [row["id"] for row in rows] == [getattr(world, name) for name in expected]


def test_list_rejects_two_filters_and_a_bad_limit(world: World) -> None:
    for args in (["--pending", "--failed"], ["--limit", "0"], ["--limit", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["invites", "list", *args, *world.c])
        assert exit_info.value.code == 2


def test_list_of_an_empty_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    assert _main("generate-config", "-c", str(config)) == 0
    KeyRing.load_or_create(tmp_path / "data" / "signing.key")
    assert _json(capsys, "invites", "list", "--json", "-c", str(config)) == []
    assert _main("invites", "list", "-c", str(config)) == 0
    assert capsys.readouterr().out == "no invites\n"


def test_json_output_is_clean_for_jq_in_a_real_process(world: World) -> None:
    result = _cli("invites", "list", "--json", "--failed", *world.c)
    assert result.returncode == 0, result.stderr
    assert [row["id"] for row in json.loads(result.stdout)] == [world.failed]
    assert "Traceback" not in result.stderr


def test_show_everything_about_one_invite(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    info = _json(capsys, "invites", "show", world.failed, "--json", *world.c)
    assert info["address"] == "carol@example.org"  # one invite asked for: the full address
    assert info["display_name"] == "c…@e…"
    assert info["state"] == "expired"
    assert info["delivery"] == "failed"
    assert info["resolved_mxid"] == "@_identity_invite_expired:localhost"
    assert info["created"] == "2023-11-14T22:15:20Z"
    assert info["resolved"] == "2023-11-14T22:17:20Z"
    (entry,) = info["outbox"]
    assert entry["destination"] == "localhost"
    assert entry["state"] == "failed"
    assert entry["attempts"] == 3
    assert entry["last_error"] == "403 M_FORBIDDEN: not in this room"
    assert entry["next_attempt"] is None and entry["delivered"] is None

    (delivered,) = _json(capsys, "invites", "show", world.delivered, "--json", *world.c)["outbox"]
    assert delivered["state"] == "delivered"
    assert delivered["delivered"] == "2023-11-14T22:17:25Z"

    newest = _json(capsys, "invites", "show", world.newest, "--json", *world.c)
    assert newest["details"] == {"room_name": "Book club", "sender_display_name": "Inviter"}
    assert newest["outbox"] == [] and newest["delivery"] == "none"

    assert _main("invites", "show", world.failed, *world.c) == 0
    out = capsys.readouterr().out
    assert "address:" in out and "carol@example.org" in out
    assert f"outbox {entry['id']} to localhost:" in out
    assert "last error:" in out and "403 M_FORBIDDEN: not in this room" in out
    assert "attempts:" in out

    assert _main("invites", "show", world.newest, *world.c) == 0
    out = capsys.readouterr().out
    assert "details.room_name:" in out and "Book club" in out
    assert "outbox: none" in out


def test_expire_queues_the_onbind_once(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert _main("invites", "expire", world.pending, *world.c) == 0
    out = capsys.readouterr().out
    assert f"invite {world.pending} expired: resolved to @_identity_invite_expired:localhost" in out
    assert "onbind notification to localhost queued; a running server delivers it" in out

    info = _json(capsys, "invites", "show", world.pending, "--json", *world.c)
    assert info["state"] == "expired"
    assert info["resolved_mxid"] == "@_identity_invite_expired:localhost"
    assert info["delivery"] == "pending"
    (entry,) = info["outbox"]
    assert entry["state"] == "pending" and entry["attempts"] == 0
    assert entry["next_attempt"] is not None

    # The request signed with the server's own key, which homeservers can fetch (its `signed`
    # block with the invite's ephemeral key).
    (stored,) = run_sync(_outbox(world.config, world.pending))
    body = json.loads(stored.body)
    assert body["mxid"] == "@_identity_invite_expired:localhost"
    assert body["address"] == "alice@example.org"
    with (world.config.parent / "data" / "signing.key").open() as f:
        (key,) = signedjson.key.read_signing_keys(f)
    signedjson.sign.verify_signed_json(body, "localhost:8090", signedjson.key.get_verify_key(key))

    assert _main("invites", "expire", world.pending, *world.c) == 1
    err = capsys.readouterr().err
    assert f"error: invite {world.pending} is expired, not pending" in err
    assert len(run_sync(_outbox(world.config, world.pending))) == 1

    assert _main("invites", "expire", world.delivered, *world.c) == 1
    assert f"error: invite {world.delivered} is bound, not pending" in capsys.readouterr().err


def test_retry_requeues_a_failed_delivery(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert _main("invites", "retry", world.failed, *world.c) == 0
    out = capsys.readouterr().out
    assert f"invite {world.failed}: 1 onbind notification queued" in out
    assert "a running server delivers it" in out
    info = _json(capsys, "invites", "show", world.failed, "--json", *world.c)
    assert info["delivery"] == "pending"
    (entry,) = info["outbox"]
    assert entry["state"] == "pending" and entry["next_attempt"] is not None
    assert [r["id"] for r in _json(capsys, "invites", "list", "--json", "--failed", *world.c)] == []

    for invite_id, delivery in ((world.delivered, "delivered"), (world.pending, "none")):
        assert _main("invites", "retry", invite_id, *world.c) == 1
        err = capsys.readouterr().err
        assert f"error: invite {invite_id} has no failed or pending onbind notification" in err
        assert f"delivery {delivery}" in err


@pytest.mark.parametrize("action", ["show", "expire", "retry"])
def test_unknown_invite(world: World, capsys: pytest.CaptureFixture[str], action: str) -> None:
    capsys.readouterr()
    assert _main("invites", action, "nope", *world.c) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error: no invite nope" in captured.err.splitlines()


def test_commands_leave_no_tasks_behind(world: World) -> None:
    args = cli.build_parser().parse_args(["invites", "expire", world.newest, *world.c])
    config = load_config(world.config)

    async def run() -> int:
        status = await cli._invites(config, args)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return status

    assert run_sync(run()) == 0


def test_missing_signing_key_is_an_error_and_no_key_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    assert _main("generate-config", "-c", str(config)) == 0
    capsys.readouterr()
    assert _main("invites", "list", "-c", str(config)) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: keys: no signing key file at ")
    assert not (tmp_path / "data" / "signing.key").exists()


def test_config_and_database_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("invites:\n  expiration: {after: 7 dayz}\n")
    capsys.readouterr()
    assert _main("invites", "list", "-c", str(config)) == 1
    assert capsys.readouterr().err.startswith("config error: invites.expiration.after")

    config.write_text("database: {url: 'postgres://nobody@127.0.0.1:1/none'}\n")
    KeyRing.load_or_create(tmp_path / "data" / "signing.key")
    result = _cli("invites", "show", "x", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith("error: database.url: cannot connect")
    assert "Traceback" not in result.stderr


async def _homeserver_down(config: Path, destination: str) -> None:
    server = await _open(config)
    try:
        now = server.clock.now_ms()
        store = DestinationStore(server.db)
        for _ in range(3):
            await store.record_failure(destination, now, "could not connect", 2000, 10_000)
    finally:
        await server.stop()


def test_list_and_show_tell_when_the_homeserver_is_backed_off(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main("invites", "retry", world.failed, *world.c) == 0  # queued again
    (entry,) = run_sync(_outbox(world.config, world.failed))
    run_sync(_homeserver_down(world.config, entry.destination))
    capsys.readouterr()
    rows = _json(capsys, "invites", "list", "--json", *world.c)
    states = {row["id"]: row["homeserver"] for row in rows}
    assert states == {
        world.newest: None,
        world.failed: "backed_off",
        world.delivered: None,
        world.pending: None,
    }
    info = _json(capsys, "invites", "show", world.failed, "--json", *world.c)
    (shown,) = info["outbox"]
    assert shown["homeserver"] == {
        "state": "backed off",
        "failures": 3,
        "next_probe": "2023-11-14T22:13:28Z",  # 2 s, 4 s, then 8 s after the third failure
        "last_error": "could not connect",
        "failing_since": "2023-11-14T22:13:20Z",
    }
    assert _main("invites", "show", world.failed, *world.c) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.lstrip().startswith("homeserver:")]
    assert line.split(":", 1)[1].strip().startswith("backed off: 3 failures in a row since")
    assert "last error could not connect" in out
