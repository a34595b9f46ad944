"""Command line: ``run``, ``generate-config``, ``migrate``, ``keys show|rotate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from appservice.clock import Clock
from appservice.config import Config, ConfigError, load_config
from appservice.crypto.signing import KeyFileError, KeyRing
from appservice.db.database import AppDatabase, DatabaseError
from appservice.db.signing_keys import SigningKeyStore
from appservice.resources import EXAMPLE_CONFIG

DEFAULT_CONFIG = "config.yaml"


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its --help lists every command)."""
    parser = argparse.ArgumentParser(
        prog="python -m appservice",
        description="Matrix identity server and application service.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
        )
        return p

    run = with_config(
        commands.add_parser("run", help="serve (creates the config from the example on first run)")
    )
    run.add_argument("--listen", type=_listen_address, help="override listen address, HOST:PORT")
    gen = with_config(commands.add_parser("generate-config", help="write a fresh config file"))
    gen.add_argument("--force", action="store_true", help="overwrite an existing file")
    with_config(commands.add_parser("migrate", help="apply database migrations and exit"))
    keys = commands.add_parser("keys", help="show or rotate the signing keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    with_config(key_commands.add_parser("show", help="list the signing keys"))
    with_config(
        key_commands.add_parser("rotate", help="make a new current key; older keys become invalid")
    )
    return parser


def write_example_config(path: Path) -> None:
    """Copy the documented example config to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(EXAMPLE_CONFIG, path)


def _setup_logging(config: Config | None) -> None:
    level = config.logging.level.upper() if config else "INFO"
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


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


async def _keys(config: Config, action: str) -> None:
    keyring = KeyRing.load_or_create(Path(config.keys.signing_key_path))
    db = AppDatabase(config.database.url)
    await db.start()
    try:
        await db.migrate()
        store = SigningKeyStore(db)
        now_ms = Clock().now_ms()
        if action == "rotate":
            new = keyring.rotate()
            await store.register(new.key_id, new.public_key, now_ms)
            revoked = await store.revoke_all_except(new.key_id, now_ms)
            print(f"new current key {new.key_id} {new.public_key}")
            if revoked:
                print("revoked: " + ", ".join(revoked))
        else:
            await store.register(keyring.current.key_id, keyring.current.public_key, now_ms)
        current = keyring.current.key_id
        for key in await store.all():
            state = "revoked" if key.revoked_ts else "valid"
            mark = " (current)" if key.key_id == current else ""
            print(f"{key.key_id} {key.public_key} {state}{mark}")
    finally:
        await db.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    path = Path(args.config)
    try:
        if args.command == "generate-config":
            if path.exists() and not args.force:
                print(f"{path} exists; use --force to overwrite", file=sys.stderr)
                return 1
            write_example_config(path)
            print(f"wrote {path}")
            return 0
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
            asyncio.run(_keys(config, args.keys_command))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (DatabaseError, KeyFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
