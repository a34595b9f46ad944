"""Command line: ``run``, ``generate-config``, ``migrate``, ``keys show|rotate|revoke``,
``invites list|show|expire|retry``, ``pepper show|rotate`` and ``import sydent|ma1sd``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appservice.clock import Clock
from appservice.config import Config, ConfigError, load_config
from appservice.crypto.signing import KeyFileError, KeyRing
from appservice.db.database import AppDatabase, DatabaseError
from appservice.db.destinations import Destination, DestinationStore
from appservice.db.invites import BOUND, EXPIRED, PENDING, Invite, InviteStore
from appservice.db.outbox import DELIVERED, FAILED, OutboxEntry, OutboxStore
from appservice.db.outbox import PENDING as QUEUED
from appservice.db.signing_keys import SigningKeyStore, StoredSigningKey
from appservice.errors import StartupError
from appservice.identity_stores import StoreError
from appservice.importers.model import ImportFailed
from appservice.logs import setup_logging
from appservice.matrix.registration import (
    build_registration,
    is_generated_registration,
    new_token,
    set_config_tokens,
    write_registration,
)
from appservice.private_files import write_private_file
from appservice.resources import EXAMPLE_CONFIG, package_version
from appservice.services.keys import KeyService, ListedKey, list_keys

if TYPE_CHECKING:
    from appservice.app import IdentityServer

DEFAULT_CONFIG = "config.yaml"
CONSOLE_SCRIPT = "matrix-identity-appservice"
DEFAULT_INVITE_LIMIT = 100
NO_PEPPER_YET = "pepper: none yet; the server makes it on its first start"


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return int(value)


def _with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its --help lists every command)."""
    # Named as it was started: the console script, or python -m appservice.
    script = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(
        prog=script if script == CONSOLE_SCRIPT else "python -m appservice",
        description="Matrix identity server and application service.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = _with_config(
        commands.add_parser("run", help="serve (creates the config from the example on first run)")
    )
    run.add_argument("--listen", type=_listen_address, help="override listen address, HOST:PORT")
    gen = _with_config(commands.add_parser("generate-config", help="write a fresh config file"))
    gen.add_argument("--force", action="store_true", help="overwrite an existing file")
    _with_config(commands.add_parser("migrate", help="apply database migrations and exit"))
    keys = commands.add_parser("keys", help="show or rotate the signing keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    _with_config(key_commands.add_parser("show", help="list the signing keys"))
    rotate = _with_config(
        key_commands.add_parser(
            "rotate",
            help="make a new current key; older keys stay valid for the invites stored under them",
        )
    )
    rotate.add_argument(
        "--replace-lost-key",
        action="store_true",
        help="the key file is lost for good: make a new one whose key takes the next unused id",
    )
    revoke = _with_config(
        key_commands.add_parser(
            "revoke", help="mark a key invalid (pubkey/isvalid false), e.g. a leaked one"
        )
    )
    revoke.add_argument("key_id", metavar="KEY_ID", help="e.g. ed25519:0 (not the current key)")
    registration = _with_config(
        commands.add_parser(
            "generate-registration",
            help="write the appservice registration for the homeserver (creates the tokens "
            "and saves them in the config when it has none)",
        )
    )
    registration.add_argument(
        "-r",
        "--registration",
        help="where to write it (default registration.yaml beside keys.signing_key_path, i.e. "
        "data/registration.yaml beside the example config)",
    )
    registration.add_argument(
        "--force",
        action="store_true",
        help="overwrite a file that generate-registration did not write",
    )
    _add_invites_parser(commands)
    pepper = commands.add_parser("pepper", help="show or rotate the lookup pepper")
    pepper_commands = pepper.add_subparsers(dest="pepper_command", required=True, metavar="ACTION")
    _with_config(pepper_commands.add_parser("show", help="the pepper's generation and age"))
    _with_config(
        pepper_commands.add_parser(
            "rotate",
            help="a new pepper: rehash every binding and store copy while lookups go on, then "
            "switch all instances (the previous pepper is answered for lookup.pepper_grace)",
        )
    )
    _add_import_parser(commands)
    return parser


def _add_import_parser(commands: Any) -> None:
    imp = commands.add_parser(
        "import",
        help="move a deployment of sydent or ma1sd over: bindings, pending invites, keys "
        "(stop every server instance first)",
    )
    sources = imp.add_subparsers(dest="import_source", required=True, metavar="SOURCE")
    sydent = _with_config(sources.add_parser("sydent", help="import from sydent"))
    sydent.add_argument("--db", required=True, metavar="SYDENT_DB", help="sydent's SQLite file")
    sydent.add_argument(
        "--sydent-config",
        type=Path,
        metavar="SYDENT_CONF",
        help="sydent.conf, whose [crypto] ed25519.signingkey is imported (without it the invites "
        "already in rooms cannot be completed)",
    )
    ma1sd = _with_config(sources.add_parser("ma1sd", help="import from ma1sd or mxisd"))
    ma1sd.add_argument(
        "--db", required=True, metavar="MA1SD_DB", help="its SQLite file or postgresql:// URL"
    )
    ma1sd.add_argument(
        "--keys", type=Path, metavar="KEY_DIR", help="its key.path directory (signing keys)"
    )
    for p in (sydent, ma1sd):
        p.add_argument(
            "--dry-run", action="store_true", help="report what would change, write nothing"
        )
        p.add_argument(
            "--merge",
            action="store_true",
            help="add to a database that has bindings or invites from elsewhere already",
        )


def _generate_registration(config_path: Path, registration: str | None, force: bool) -> int:
    """Write the registration; tokens are read from the config, or created and saved in it.

    By default it goes beside the signing key, in the data directory. A file that this command
    did not write (such as the committed example ``registration.yaml``) is kept unless ``force``.
    """
    config = load_config(config_path)
    registration_path = (
        Path(registration)
        if registration
        else Path(config.keys.signing_key_path).parent / "registration.yaml"
    )
    if registration_path.exists() and not force:
        try:
            ours = is_generated_registration(registration_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            print(
                f"{registration_path} exists and was not written by generate-registration; "
                "use --force to overwrite it",
                file=sys.stderr,
            )
            return 1
    if not config.appservice.enabled:
        text = set_config_tokens(config_path.read_text(encoding="utf-8"), new_token(), new_token())
        write_private_file(config_path, text)
        config = load_config(config_path)
        print(f"created appservice tokens and saved them in {config_path}")
    write_registration(registration_path, build_registration(config.appservice))
    print(
        f"wrote {registration_path}: add it to Synapse's app_service_config_files and restart "
        "Synapse"
    )
    return 0


def _add_invites_parser(commands: Any) -> None:
    invites = commands.add_parser("invites", help="list, inspect, expire or retry 3PID invites")
    actions = invites.add_subparsers(dest="invites_command", required=True, metavar="ACTION")
    lst = actions.add_parser("list", help="list invites, newest first")
    with_filter = lst.add_mutually_exclusive_group()
    for flag, help_text in (
        (PENDING, "only invites waiting for their address to be bound"),
        (EXPIRED, "only withdrawn invites (too old, or `invites expire`)"),
        (BOUND, "only invites resolved by a bind"),
        (DELIVERED, "only invites whose onbind notification was delivered"),
        (FAILED, "only invites whose onbind delivery failed (see `invites retry`)"),
    ):
        with_filter.add_argument(
            f"--{flag}", dest="filter", action="store_const", const=flag, help=help_text
        )
    lst.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_INVITE_LIMIT,
        metavar="N",
        help=f"at most N invites (default {DEFAULT_INVITE_LIMIT})",
    )
    lst.add_argument("--json", action="store_true", help="print a JSON array (for jq)")
    show = actions.add_parser("show", help="one invite in full, with its onbind deliveries")
    show.add_argument("invite_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    expire = actions.add_parser("expire", help="withdraw a pending invite now")
    expire.add_argument("invite_id", metavar="ID")
    retry = actions.add_parser(
        "retry", help="deliver an invite's failed or pending onbind notifications again now"
    )
    retry.add_argument("invite_id", metavar="ID")
    for action in (lst, show, expire, retry):
        _with_config(action)


def write_example_config(path: Path) -> None:
    """Write the documented example config to ``path`` (mode 0600)."""
    write_private_file(path, EXAMPLE_CONFIG.read_text(encoding="utf-8"))


def _setup_logging(config: Config | None) -> None:
    setup_logging(config.logging if config else None)


async def _run(config: Config, listen: tuple[str, int] | None) -> None:
    from appservice.app import IdentityServer, run_forever

    server = IdentityServer(config)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await run_forever(server, *(listen or (None, None)))


async def _migrate(config: Config) -> list[int]:
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        return await db.migrate()
    finally:
        await db.stop()


async def _keys(
    config: Config, action: str, key_id: str | None = None, replace_lost: bool = False
) -> int:
    if action == "show":
        return await _keys_show(config)
    keyring = KeyRing(Path(config.keys.signing_key_path))
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        await db.migrate()
        keys = KeyService(keyring, SigningKeyStore(db), Clock())
        if action == "rotate" and replace_lost:
            new = await keys.replace_lost_key_file()
            print(f"new key file {keyring.path}, current key {new.key_id} {new.public_key}")
        else:
            await keys.start()
        if action == "rotate" and not replace_lost:
            new = await keys.rotate()
            print(f"new current key {new.key_id} {new.public_key}")
        elif action == "revoke":
            if key_id == keyring.current.key_id:
                print(
                    f"{key_id} is the current key: run `keys rotate` first, then revoke it",
                    file=sys.stderr,
                )
                return 1
            if key_id is None or not await keys.revoke(key_id):
                print(f"no valid key {key_id} to revoke", file=sys.stderr)
                return 1
            print(f"revoked {key_id}")
        _print_keys(list_keys(keyring.path, keyring.public_keys, await keys.published()))
    finally:
        await db.stop()
    return 0


async def _keys_show(config: Config) -> int:
    """List the keys, creating nothing: no key file, database or schema."""
    keyring = KeyRing(Path(config.keys.signing_key_path))
    in_file = None
    if keyring.exists():
        keyring.load()
        in_file = keyring.public_keys
    stored: list[StoredSigningKey] = []
    db = AppDatabase(config.database.url)
    if db.exists():
        await db.start()
        try:
            if await db.has_table("signing_keys"):
                stored = await SigningKeyStore(db).all()
        finally:
            await db.stop()
    listed = list_keys(keyring.path, in_file, stored)
    if not listed:
        print(
            f"keys: no signing key yet (no file at {keyring.path}); the server makes it on its "
            "first start",
            file=sys.stderr,
        )
        return 1
    _print_keys(listed)
    return 0


def _print_keys(listed: Sequence[ListedKey]) -> None:
    for key in listed:
        mark = " (current)" if key.current else ""
        print(f"{key.key_id} {key.public_key} {key.state}{mark}")


# --- invites ------------------------------------------------------------------------------------

QUEUED_NOTE = "queued; a running server delivers it"


def _require_key_file(config: Config) -> None:
    # IdentityServer would create a fresh key, and onbind notifications signed with a key the
    # server never published are refused: use the server's own key, never a new one.
    key_path = Path(config.keys.signing_key_path)
    if not key_path.exists():
        raise KeyFileError(
            f"keys: no signing key file at {key_path}; use the running server's config and key"
        )


@contextlib.asynccontextmanager
async def open_server(config: Config) -> AsyncIterator[IdentityServer]:
    """The server's services on a migrated database, without its jobs or web server."""
    from appservice.app import IdentityServer
    from appservice.notifications import connectors

    _require_key_file(config)
    # The warnings about log connectors concern serving; these commands send nothing.
    connector_log = logging.getLogger(connectors.__name__)
    level = connector_log.level
    connector_log.setLevel(logging.ERROR)
    try:
        server = IdentityServer(config)
    finally:
        connector_log.setLevel(level)
    try:
        await server.open()
        yield server
    finally:
        await server.stop()


def _iso(ms: int | None) -> str | None:
    """A millisecond timestamp as ISO 8601 UTC (``2024-05-01T12:00:00Z``)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _printable(value: object) -> str:
    """Text for the terminal: control characters (stored from requests) escaped, None as -."""
    if value is None:
        return "-"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def delivery_state(entries: Sequence[OutboxEntry]) -> str:
    """One word for an invite's onbind deliveries: none, failed, pending or delivered."""
    states = {entry.state for entry in entries}
    if not states:
        return "none"
    if FAILED in states:
        return FAILED
    if states == {DELIVERED}:
        return DELIVERED
    return QUEUED


async def _invite_ids_by_delivery(db: AppDatabase, delivery: str, limit: int) -> list[str]:
    """Ids of invites whose delivery (as :func:`delivery_state` words it) is ``delivery``,
    newest first. ``failed``: some notification failed; ``delivered``: all were delivered."""
    if delivery == FAILED:
        where = "i.id IN (SELECT invite_id FROM onbind_outbox WHERE state = $1)"
    else:
        where = (
            "i.id IN (SELECT invite_id FROM onbind_outbox WHERE state = $1) AND NOT EXISTS"
            " (SELECT 1 FROM onbind_outbox o WHERE o.invite_id = i.id AND o.state <> $1)"
        )
    rows = await db.fetch(
        f"SELECT i.id FROM invites i WHERE {where} ORDER BY i.created_ts DESC, i.id LIMIT $2",
        delivery,
        limit,
    )
    return [row["id"] for row in rows]


async def _list_invites(
    db: AppDatabase, choice: str | None, limit: int
) -> list[tuple[Invite, list[OutboxEntry]]]:
    store, outbox = InviteStore(db), OutboxStore(db)
    if choice in (DELIVERED, FAILED):
        found = [await store.by_id(i) for i in await _invite_ids_by_delivery(db, choice, limit)]
        invites = [invite for invite in found if invite is not None]
    else:
        invites = await store.list(choice, limit)
    return [(invite, await outbox.for_invite(invite.id)) for invite in invites]


def _homeserver_state(
    entries: Sequence[OutboxEntry], backed_off: dict[str, Destination]
) -> str | None:
    """``backed_off`` when the homeserver a queued notification waits for does not answer
    (``invites show`` tells the details); None otherwise."""
    for entry in entries:
        if entry.state == QUEUED and entry.destination in backed_off:
            return "backed_off"
    return None


async def _backed_off(db: AppDatabase) -> dict[str, Destination]:
    return {d.destination: d for d in await DestinationStore(db).backed_off()}


def _summary(
    invite: Invite, entries: Sequence[OutboxEntry], backed_off: dict[str, Destination]
) -> dict[str, Any]:
    """A row of ``invites list``; the invitee only as its redacted display name."""
    return {
        "id": invite.id,
        "state": invite.state,
        "delivery": delivery_state(entries),
        "homeserver": _homeserver_state(entries, backed_off),
        "created": _iso(invite.created_ts),
        "room_id": invite.room_id,
        "sender": invite.sender,
        "invitee": invite.display_name,
        "resolved_mxid": invite.resolved_mxid,
    }


def _entry_details(entry: OutboxEntry, backed_off: dict[str, Destination]) -> dict[str, Any]:
    down = backed_off.get(entry.destination)
    return {
        "id": entry.id,
        "destination": entry.destination,
        "homeserver": None
        if down is None
        else {
            "state": "backed off",
            "failures": down.failures,
            "next_probe": _iso(down.retry_at),
            "last_error": down.last_error,
            "failing_since": _iso(down.last_failure_ts),
        },
        "state": entry.state,
        "attempts": entry.attempts,
        "last_error": entry.last_error,
        "created": _iso(entry.created_ts),
        "next_attempt": _iso(entry.next_attempt_ts) if entry.state == QUEUED else None,
        "claimed_until": _iso(entry.claimed_until),
        "claimed_by": entry.claimed_by,
        "delivered": _iso(entry.delivered_ts),
    }


def _details(
    invite: Invite, entries: Sequence[OutboxEntry], backed_off: dict[str, Destination]
) -> dict[str, Any]:
    """Everything ``invites show`` tells about an invite (the full address included)."""
    return {
        "id": invite.id,
        "state": invite.state,
        "delivery": delivery_state(entries),
        "medium": invite.medium,
        "address": invite.address,
        "display_name": invite.display_name,
        "room_id": invite.room_id,
        "sender": invite.sender,
        "created": _iso(invite.created_ts),
        "resolved_mxid": invite.resolved_mxid,
        "resolved": _iso(invite.resolved_ts),
        "token": invite.token,
        "ephemeral_public_key": invite.ephemeral_public_key,
        "imported_from": invite.imported_from,
        "details": dict(sorted(invite.details.items())),
        "outbox": [_entry_details(entry, backed_off) for entry in entries],
    }


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        print("no invites")
        return
    columns = list(rows[0])
    cells = [columns] + [[_printable(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _print_fields(fields: Sequence[tuple[str, object]], indent: str = "") -> None:
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        print(f"{indent}{(name + ':').ljust(width)} {_printable(value)}")


def _print_invite(info: dict[str, Any]) -> None:
    fields = [(k, v) for k, v in info.items() if k not in ("details", "outbox")]
    fields += [(f"details.{k}", v) for k, v in info["details"].items()]
    _print_fields(fields)
    if not info["outbox"]:
        print("outbox: none (an invite queues its onbind notification once bound or expired)")
    for entry in info["outbox"]:
        print(f"outbox {_printable(entry['id'])} to {_printable(entry['destination'])}:")
        shown = ["state", "attempts", "last_error", "created"]
        shown.append("delivered" if entry["state"] == DELIVERED else "next_attempt")
        if entry["claimed_until"] is not None:
            shown += ["claimed_until", "claimed_by"]
        fields = [(name.replace("_", " "), entry[name]) for name in shown]
        down = entry["homeserver"]
        if down is not None and entry["state"] == QUEUED:
            fields.append(
                (
                    "homeserver",
                    f"backed off: {down['failures']} failures in a row since"
                    f" {down['failing_since']}, next probe {down['next_probe']},"
                    f" last error {down['last_error']}",
                )
            )
        _print_fields(fields, indent="  ")


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


async def _invites(config: Config, args: argparse.Namespace) -> int:
    """``invites ACTION``; returns the exit status."""
    async with open_server(config) as server:
        action: str = args.invites_command
        if action == "list":
            found = await _list_invites(server.db, args.filter, args.limit)
            backed_off = await _backed_off(server.db)
            rows = [_summary(invite, entries, backed_off) for invite, entries in found]
            if args.json:
                _print_json(rows)
            else:
                _print_table(rows)
            return 0
        invite_id: str = args.invite_id
        invite = await InviteStore(server.db).by_id(invite_id)
        if invite is None:
            print(f"error: no invite {_printable(invite_id)}", file=sys.stderr)
            return 1
        outbox = OutboxStore(server.db)
        if action == "show":
            backed_off = await _backed_off(server.db)
            info = _details(invite, await outbox.for_invite(invite.id), backed_off)
            if args.json:
                _print_json(info)
            else:
                _print_invite(info)
            return 0
        if action == "expire":
            return await _expire(server, invite, outbox)
        return await _retry(server, invite, outbox)


async def _expire(server: IdentityServer, invite: Invite, outbox: OutboxStore) -> int:
    name = _printable(invite.id)
    if invite.state != PENDING:
        print(
            f"error: invite {name} is {invite.state}, not pending; only pending invites expire",
            file=sys.stderr,
        )
        return 1
    if not await server.invites.expire(invite.id):
        print(f"error: invite {name} is no longer pending", file=sys.stderr)
        return 1
    print(f"invite {name} expired: resolved to {_printable(server.invites.expired_user_id)}")
    for entry in await outbox.for_invite(invite.id):
        if entry.state == QUEUED:
            print(f"onbind notification to {_printable(entry.destination)} {QUEUED_NOTE}")
    return 0


async def _retry(server: IdentityServer, invite: Invite, outbox: OutboxStore) -> int:
    name = _printable(invite.id)
    count = await server.invites.retry(invite.id)
    if not count:
        delivery = delivery_state(await outbox.for_invite(invite.id))
        print(
            f"error: invite {name} has no failed or pending onbind notification to retry"
            f" (state {invite.state}, delivery {delivery})",
            file=sys.stderr,
        )
        return 1
    if count == 1:
        print(f"invite {name}: 1 onbind notification {QUEUED_NOTE}")
    else:
        print(f"invite {name}: {count} onbind notifications queued; a running server delivers them")
    return 0


# --- import -------------------------------------------------------------------------------------


async def _read_import_source(args: argparse.Namespace) -> Any:
    """The reader's ImportSource (readers are imported only when used)."""
    from appservice.importers import ma1sd, sydent

    if args.import_source == "sydent":
        read_sydent = getattr(sydent, "read_sydent", None)
        if read_sydent is None:
            raise ImportFailed("import sydent: this version cannot read sydent yet")
        return read_sydent(Path(args.db), args.sydent_config)
    read_ma1sd = getattr(ma1sd, "read_ma1sd", None)
    if read_ma1sd is None:
        raise ImportFailed("import ma1sd: this version cannot read ma1sd yet")
    return await read_ma1sd(args.db, args.keys)


async def _import(config: Config, args: argparse.Namespace) -> int:
    """``import sydent|ma1sd``: read the other server's data, write it (see importers.writer)."""
    from appservice.importers.writer import run_import

    source = await _read_import_source(args)
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        # Also before a dry run, which then writes no data (only the schema, as `migrate`).
        migrated = await db.migrate()
        report = await run_import(
            db,
            Path(config.keys.signing_key_path),
            source,
            invites=config.invites,
            merge=args.merge,
            dry_run=args.dry_run,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    finally:
        await db.stop()
    for line in report.lines():
        print(line)
    if migrated and args.dry_run:
        print("  the database schema was migrated first, as `migrate` does")
    return 0


# --- pepper -------------------------------------------------------------------------------------


async def _pepper(config: Config, action: str) -> int:
    """``pepper show|rotate``; returns the exit status. Needs no key file; ``show`` creates
    nothing."""
    from appservice.db.lookup_peppers import PepperStore
    from appservice.db.server_state import ServerStateStore
    from appservice.services.lookup import ensure_pepper
    from appservice.services.pepper_rotation import PepperRotation, RotationRefused

    db = AppDatabase(config.database.url)
    if action == "show" and not db.exists():
        print(f"{NO_PEPPER_YET} (no database)", file=sys.stderr)
        return 1
    await db.start()
    try:
        peppers, clock = PepperStore(db), Clock()
        if action == "rotate":
            await db.migrate()
            await ensure_pepper(ServerStateStore(db), peppers, clock)
            try:
                result = await PepperRotation(peppers, config.lookup, clock).rotate()
            except RotationRefused as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            done = "finished an interrupted rotation" if result.resumed else "rotated"
            print(
                f"{done}: generation {result.generation}, {result.rows} rows rehashed in "
                f"{result.seconds:.1f} s; instances switch within a few seconds"
            )
        state = await peppers.find() if await db.has_table("lookup_pepper") else None
        if state is None:
            print(NO_PEPPER_YET, file=sys.stderr)
            return 1
        now = clock.now_ms()
        fields: list[tuple[str, object]] = [
            ("generation", state.generation),
            ("current since", _iso(state.since_ts)),
            (
                "previous pepper",
                f"answered until {_iso(state.grace_until_ts)}"
                if state.previous_answered(now)
                else "not answered",
            ),
            ("scheduled rotation", _every(config.lookup.pepper_rotation)),
        ]
        if state.rotating:
            fields.append(("rotation", f"in progress since {_iso(state.rotation_started_ts)}"))
        if state.claimed_until >= now:
            fields.append(("lease", f"{state.claimed_by} until {_iso(state.claimed_until)}"))
        _print_fields(fields)
    finally:
        await db.stop()
    return 0


def _every(seconds: float | None) -> str:
    if seconds is None:
        return "off (lookup.pepper_rotation)"
    return f"every {seconds / 86400:g} days" if seconds >= 86400 else f"every {seconds:g} s"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    path = Path(args.config)
    # Loading the config may log (a misspelt APPSERVICE_ variable): in the usual format.
    _setup_logging(None)
    try:
        if args.command == "generate-config":
            if path.exists() and not args.force:
                print(f"{path} exists; use --force to overwrite", file=sys.stderr)
                return 1
            write_example_config(path)
            print(f"wrote {path}")
            return 0
        if args.command == "generate-registration":
            return _generate_registration(path, args.registration, args.force)
        if args.command == "run" and not path.exists():
            write_example_config(path)
            print(f"created {path} from the example config", file=sys.stderr)
        config = load_config(path)
        _setup_logging(config)
        if args.command == "run":
            asyncio.run(_run(config, args.listen))
        elif args.command == "migrate":
            applied = asyncio.run(_migrate(config))
            print(f"applied {applied}" if applied else "database is up to date")
        elif args.command == "keys":
            return asyncio.run(
                _keys(
                    config,
                    args.keys_command,
                    getattr(args, "key_id", None),
                    getattr(args, "replace_lost_key", False),
                )
            )
        elif args.command == "invites":
            return asyncio.run(_invites(config, args))
        elif args.command == "pepper":
            return asyncio.run(_pepper(config, args.pepper_command))
        elif args.command == "import":
            return asyncio.run(_import(config, args))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 1
    # OSError: a file or socket problem not named more precisely where it happened.
    except (DatabaseError, KeyFileError, StoreError, StartupError, ImportFailed, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
