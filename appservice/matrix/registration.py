"""The appservice registration file for the homeserver, written from the config.

The users namespace is exclusive and matches exactly the bot and the inviteExpired user on the
homeserver's domain (every regex character escaped), so nobody else can register those IDs and
the appservice claims no one else.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import yaml

from appservice.config import AppserviceConfig, ConfigError
from appservice.private_files import write_private_file

_TOP_LEVEL_KEY = re.compile(r"^[A-Za-z_][\w-]*\s*:")
# The block form of the section (``appservice:``, maybe with a comment), which can be edited.
_SECTION = re.compile(r"^appservice\s*:\s*(#.*)?$")
# ``as_token: <value>  # comment`` inside it.
_TOKEN_LINE = re.compile(
    r"^(?P<indent>\s+)(?P<key>as_token|hs_token)\s*:\s*"
    r"(?:\"[^\"]*\"|'[^']*'|[^\s#]*)\s*(?P<comment>#.*)?$"
)


def users_regex(config: AppserviceConfig) -> str:
    """An anchored regex matching exactly the appservice's users."""
    localparts = "|".join(
        re.escape(lp) for lp in (config.bot_localpart, config.expired_user_localpart)
    )
    return f"^@({localparts}):{re.escape(config.homeserver_domain)}$"


def build_registration(config: AppserviceConfig) -> dict[str, Any]:
    """The registration document (as the homeserver reads it)."""
    return {
        "id": config.id,
        "url": config.url,
        "as_token": config.as_token,
        "hs_token": config.hs_token,
        "sender_localpart": config.bot_localpart,
        "namespaces": {
            "users": [{"exclusive": True, "regex": users_regex(config)}],
            "aliases": [],
            "rooms": [],
        },
        "rate_limited": False,
    }


# The first line of every registration this module writes (how generate-registration knows that
# it may overwrite a file).
GENERATED_HEADER = "# Application service registration for the homeserver, written by\n"


def is_generated_registration(text: str) -> bool:
    """Whether ``text`` is a registration written by :func:`write_registration`."""
    return text.startswith(GENERATED_HEADER)


def write_registration(path: Path, registration: dict[str, Any]) -> None:
    """Write the registration YAML, readable only by its owner (it holds both tokens)."""
    text = (
        GENERATED_HEADER
        + "# `python -m appservice generate-registration`. Synapse: list this file in\n"
        "# app_service_config_files. It holds secrets: keep it private.\n"
    ) + yaml.safe_dump(registration, sort_keys=False, allow_unicode=True)
    write_private_file(path, text)


def new_token() -> str:
    """A fresh appservice token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def set_config_tokens(config_text: str, as_token: str, hs_token: str) -> str:
    """The config text with ``appservice.as_token``/``hs_token`` set, comments kept.

    Existing ``as_token:``/``hs_token:`` lines of the top-level ``appservice:`` section are
    replaced; missing ones are added at the start of the section (created at the end if absent).
    A section written another way (a flow mapping ``appservice: {...}``) is refused rather than
    duplicated, which would silently drop its settings.
    """
    lines = config_text.splitlines()
    start = next((i for i, line in enumerate(lines) if _SECTION.match(line)), None)
    values = {"as_token": as_token, "hs_token": hs_token}
    if start is None:
        if any(re.match(r"^appservice\s*:", line) for line in lines):
            raise ConfigError(
                "appservice: cannot add the tokens to this section; write it as a block "
                "(appservice: on its own line) or set as_token and hs_token yourself"
            )
        block = ["appservice:"] + [f'  {key}: "{value}"' for key, value in values.items()]
        return "\n".join([*lines, "", *block]) + "\n"
    end = next(
        (i for i in range(start + 1, len(lines)) if _TOP_LEVEL_KEY.match(lines[i])), len(lines)
    )
    # The section's keys are indented like its first one (nested keys are left alone).
    keys = [line for line in lines[start + 1 : end] if line.strip() and line.lstrip()[0] != "#"]
    indent = keys[0][: len(keys[0]) - len(keys[0].lstrip())] if keys else "  "
    for i in range(start + 1, end):
        match = _TOKEN_LINE.match(lines[i])
        if match and match.group("indent") == indent and match.group("key") in values:
            key = match.group("key")
            comment = f"  {match.group('comment')}" if match.group("comment") else ""
            lines[i] = f'{indent}{key}: "{values.pop(key)}"{comment}'
    missing = [f'{indent}{key}: "{value}"' for key, value in values.items()]
    lines[start + 1 : start + 1] = missing
    return "\n".join(lines) + "\n"
