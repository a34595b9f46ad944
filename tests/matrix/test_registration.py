"""The registration file for the homeserver: exact exclusive namespace, tokens, file handling."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appservice.cli import main
from appservice.config import AppserviceConfig, ConfigError, load_config, load_config_text
from appservice.config.loader import PLACEHOLDER_TOKENS
from appservice.matrix.registration import (
    build_registration,
    new_token,
    set_config_tokens,
    users_regex,
    write_registration,
)

REPO = Path(__file__).resolve().parents[2]
BOT = "_identity_bot"
EXPIRED = "_identity_invite_expired"
TOKEN_LINE = re.compile(r"^\s*(as|hs)_token\s*:")


def appservice_config(tmp_path: Path, **settings: Any) -> AppserviceConfig:
    """The ``appservice`` section of a config loaded with these options."""
    text = yaml.safe_dump({"appservice": settings})
    return load_config_text(text, tmp_path, environ={}).appservice


def matches(regex: str, user_id: str) -> bool:
    # Homeservers search with the regex as given (Synapse: re.match); the anchors must hold.
    return re.search(regex, user_id) is not None


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No APPSERVICE_* overrides from the environment running the tests."""
    for name in list(os.environ):
        if name.startswith("APPSERVICE_"):
            monkeypatch.delenv(name)


# The users namespace.


@pytest.mark.parametrize("domain", ["example.org", "localhost:8448", "a-b.example", "[::1]:8448"])
def test_users_regex_matches_exactly_the_bot_and_the_expired_user(
    tmp_path: Path, domain: str
) -> None:
    regex = users_regex(appservice_config(tmp_path, homeserver_domain=domain))
    assert matches(regex, f"@{BOT}:{domain}")
    assert matches(regex, f"@{EXPIRED}:{domain}")

    others = [
        f"@{BOT}x:{domain}",
        f"@x{BOT}:{domain}",
        f"@{EXPIRED}2:{domain}",
        f"@_identity_:{domain}",
        f"@_identity_bot_invite_expired:{domain}",
        f"@{BOT}|{EXPIRED}:{domain}",
        f"@alice:{domain}",
        f"@:{domain}",
        f"{BOT}:{domain}",
        f"@{BOT}",
        f"@{BOT}:",
        f"@{BOT}:{domain}x",
        f"@{BOT}:{domain}:8448",
        f"@{BOT}:x{domain}",
        f"@{BOT}:sub.{domain}",
        f"x@{BOT}:{domain}",
        f"@{BOT}:{domain} @{BOT}:{domain}",
        f"@{BOT}:{domain.upper()}" if domain.upper() != domain else f"@{BOT.upper()}:{domain}",
        # "." and "-" are not wildcards or ranges.
        f"@{BOT}:{domain.replace('.', 'x').replace('-', 'x')}",
        f"@{BOT}:{domain.replace('.', '')}",
        f"@{EXPIRED.replace('_', '.')}:{domain}",
    ]
    for user_id in others:
        if user_id in (f"@{BOT}:{domain}", f"@{EXPIRED}:{domain}"):
            continue  # a replacement that changed nothing (no "." in the domain)
        assert not matches(regex, user_id), user_id


def test_users_regex_escapes_unusual_localparts(tmp_path: Path) -> None:
    config = appservice_config(
        tmp_path,
        homeserver_domain="hs.example",
        bot_localpart="bot.a+b",
        expired_user_localpart="gone=x/y",
    )
    regex = users_regex(config)
    assert matches(regex, "@bot.a+b:hs.example")
    assert matches(regex, "@gone=x/y:hs.example")
    for other in ("@botxa+b:hs.example", "@bot.aab:hs.example", "@bot.aaab:hs.example"):
        assert not matches(regex, other), other


def test_registration_document(tmp_path: Path) -> None:
    config = appservice_config(
        tmp_path,
        id="my-is",
        as_token="a" * 20,
        hs_token="h" * 20,
        homeserver_domain="example.org",
        url="http://10.0.0.5:8091",
    )
    registration = build_registration(config)
    assert registration == {
        "id": "my-is",
        "url": "http://10.0.0.5:8091",
        "as_token": "a" * 20,
        "hs_token": "h" * 20,
        "sender_localpart": BOT,
        "namespaces": {
            "users": [{"exclusive": True, "regex": users_regex(config)}],
            "aliases": [],
            "rooms": [],
        },
        "rate_limited": False,
    }


def test_registration_file_is_private_and_readable_yaml(tmp_path: Path) -> None:
    config = appservice_config(
        tmp_path, as_token="a" * 20, hs_token="h" * 20, homeserver_domain="example.org"
    )
    path = tmp_path / "synapse" / "registration.yaml"
    write_registration(path, build_registration(config))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == build_registration(config)

    # Rewriting an existing world-readable file (or after a crash left a temporary file) makes
    # it private too.
    path.chmod(0o644)
    stale = path.with_name(path.name + ".tmp")
    stale.write_text("old", encoding="utf-8")
    stale.chmod(0o644)
    write_registration(path, build_registration(config))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not stale.exists()
    assert [p.name for p in path.parent.iterdir()] == ["registration.yaml"]


def test_new_tokens_are_random_and_long() -> None:
    tokens = {new_token() for _ in range(20)}
    assert len(tokens) == 20
    assert all(len(t) >= 40 and re.fullmatch(r"[A-Za-z0-9_-]+", t) for t in tokens)


# The generate-registration command.


def run_cli(*args: str) -> int:
    return main(list(args))


def test_generate_registration_creates_tokens_and_saves_them_in_the_config(
    tmp_path: Path, clean_environ: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "config.yaml"
    registration_path = tmp_path / "registration.yaml"
    assert run_cli("generate-config", "-c", str(config_path)) == 0
    original = config_path.read_text(encoding="utf-8")
    assert not load_config(config_path, environ={}).appservice.enabled

    assert (
        run_cli("generate-registration", "-c", str(config_path), "-r", str(registration_path)) == 0
    )
    registration = yaml.safe_load(registration_path.read_text(encoding="utf-8"))
    assert stat.S_IMODE(registration_path.stat().st_mode) == 0o600
    as_token, hs_token = registration["as_token"], registration["hs_token"]
    assert as_token != hs_token
    assert len(as_token) >= 40 and len(hs_token) >= 40

    # The config now holds the same tokens, and everything else (comments too) is kept.
    updated = config_path.read_text(encoding="utf-8")
    config = load_config(config_path, environ={})
    assert (config.appservice.as_token, config.appservice.hs_token) == (as_token, hs_token)
    assert registration == build_registration(config.appservice)
    changed = [line for line in original.splitlines() if line not in updated.splitlines()]
    assert [line.split(":")[0].strip() for line in changed] == ["as_token", "hs_token"]
    assert len(updated.splitlines()) == len(original.splitlines())
    assert updated.count("#") == original.count("#")
    out = capsys.readouterr().out
    assert str(registration_path) in out
    assert as_token not in out and hs_token not in out

    # A second run reuses them.
    assert (
        run_cli("generate-registration", "-c", str(config_path), "-r", str(registration_path)) == 0
    )
    assert yaml.safe_load(registration_path.read_text(encoding="utf-8")) == registration
    assert config_path.read_text(encoding="utf-8") == updated


def test_tokens_from_the_environment_are_not_written_to_the_config(
    tmp_path: Path, clean_environ: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = tmp_path / "config.yaml"
    registration_path = tmp_path / "registration.yaml"
    assert run_cli("generate-config", "-c", str(config_path)) == 0
    original = config_path.read_bytes()
    monkeypatch.setenv("APPSERVICE_APPSERVICE_AS_TOKEN", "as" + "1" * 30)
    monkeypatch.setenv("APPSERVICE_APPSERVICE_HS_TOKEN", "hs" + "2" * 30)

    assert (
        run_cli("generate-registration", "-c", str(config_path), "-r", str(registration_path)) == 0
    )
    registration = yaml.safe_load(registration_path.read_text(encoding="utf-8"))
    assert (registration["as_token"], registration["hs_token"]) == (
        "as" + "1" * 30,
        "hs" + "2" * 30,
    )
    assert config_path.read_bytes() == original


def test_tokens_are_saved_into_differently_written_appservice_sections(tmp_path: Path) -> None:
    sections = {
        "a comment after the key": (
            "server:\n  name: id.example\nappservice:   # the application service\n"
            "  homeserver_domain: example.org\nlogging:\n  level: INFO\n"
        ),
        "four-space indentation, tokens commented out": (
            "appservice:\n    # as_token: ''\n    homeserver_domain: example.org\n"
            "    listen:\n        port: 9000\n"
        ),
        "existing empty tokens, one with a comment": (
            "appservice:\n  homeserver_domain: example.org\n  as_token: ''  # secret\n"
            '  hs_token: ""\n'
        ),
        "no section at all": "server:\n  name: id.example\n",
    }
    for name, text in sections.items():
        updated = set_config_tokens(text, "as" + "1" * 30, "hs" + "2" * 30)
        config = load_config_text(updated, tmp_path, environ={})
        assert config.appservice.as_token == "as" + "1" * 30, name
        assert config.appservice.hs_token == "hs" + "2" * 30, name
        if "example.org" in text:
            assert config.appservice.homeserver_domain == "example.org", name
        if "9000" in text:
            assert config.appservice.listen.port == 9000, name
        if "# secret" in text:
            assert '  as_token: "as111111111111111111111111111111"  # secret' in updated
        # Every other line (comments too) is kept, in order.
        kept = [line for line in text.splitlines() if not TOKEN_LINE.match(line)]
        remaining = iter(updated.splitlines())
        assert all(line in remaining for line in kept), name


def test_a_section_it_cannot_edit_is_refused_rather_than_duplicated(tmp_path: Path) -> None:
    text = "appservice: {homeserver_domain: example.org}\n"
    with pytest.raises(ConfigError, match="appservice"):
        set_config_tokens(text, "as" + "1" * 30, "hs" + "2" * 30)


def test_registration_goes_to_the_data_directory_beside_the_config_by_default(
    tmp_path: Path, clean_environ: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = tmp_path / "etc" / "config.yaml"
    assert run_cli("generate-config", "-c", str(config_path)) == 0
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    assert run_cli("generate-registration", "-c", str(config_path)) == 0
    written = tmp_path / "etc" / "data" / "registration.yaml"
    assert yaml.safe_load(written.read_text(encoding="utf-8"))["as_token"]
    assert stat.S_IMODE(written.parent.stat().st_mode) == 0o700
    assert list(elsewhere.iterdir()) == []
    # Its own file it rewrites (same tokens) without --force.
    assert run_cli("generate-registration", "-c", str(config_path)) == 0


def test_a_file_it_did_not_write_is_only_overwritten_with_force(
    tmp_path: Path, clean_environ: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "config.yaml"
    assert run_cli("generate-config", "-c", str(config_path)) == 0
    original_config = config_path.read_bytes()
    example = tmp_path / "registration.yaml"
    example.write_bytes((REPO / "registration.yaml").read_bytes())
    capsys.readouterr()

    args = ("generate-registration", "-c", str(config_path), "-r", str(example))
    assert run_cli(*args) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"{example} exists and was not written by generate-registration; "
        "use --force to overwrite it"
    )
    assert example.read_bytes() == (REPO / "registration.yaml").read_bytes()
    assert config_path.read_bytes() == original_config  # no tokens made either

    assert run_cli(*args, "--force") == 0
    assert yaml.safe_load(example.read_text(encoding="utf-8"))["as_token"] != "CHANGE_ME_as_token"


# The committed example.


def test_committed_example_registration_has_placeholder_tokens(tmp_path: Path) -> None:
    example = yaml.safe_load((REPO / "registration.yaml").read_text(encoding="utf-8"))
    assert {example["as_token"], example["hs_token"]} == set(PLACEHOLDER_TOKENS)
    config = appservice_config(
        tmp_path, as_token="x" * 20, hs_token="y" * 20, homeserver_domain="example.org"
    )
    expected = build_registration(config)
    for key in ("as_token", "hs_token"):
        del expected[key], example[key]
    assert example == expected


@pytest.mark.parametrize("key", ["as_token", "hs_token"])
def test_a_config_with_the_placeholder_tokens_is_refused(tmp_path: Path, key: str) -> None:
    example = yaml.safe_load((REPO / "registration.yaml").read_text(encoding="utf-8"))
    tokens = {"as_token": new_token(), "hs_token": new_token()}
    tokens[key] = example[key]
    with pytest.raises(ConfigError) as caught:
        appservice_config(tmp_path, **tokens)
    message = str(caught.value)
    assert message.startswith(f"appservice.{key}:") and "\n" not in message


def test_run_refuses_the_placeholder_tokens_with_a_one_line_error(tmp_path: Path) -> None:
    example = yaml.safe_load((REPO / "registration.yaml").read_text(encoding="utf-8"))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "database": {"url": f"sqlite:{tmp_path / 'id.db'}"},
                "appservice": {"as_token": example["as_token"], "hs_token": example["hs_token"]},
            }
        ),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPSERVICE_")}
    result = subprocess.run(
        [sys.executable, "-m", "appservice", "run", "-c", str(config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("config error: appservice.as_token:")
    assert "generate-registration" in result.stderr
    assert not (tmp_path / "id.db").exists()
