"""Loading the configuration: defaults, the example file, errors naming the key path, env vars."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from appservice.app import IdentityServer
from appservice.config import Config, ConfigError, load_config, load_config_text
from appservice.config.loader import parse_duration
from appservice.resources import EXAMPLE_CONFIG


def _resolved_defaults(base: Path) -> Config:
    return load_config_text("", base, environ={})


def test_example_config_documents_exactly_the_defaults() -> None:
    example = load_config(EXAMPLE_CONFIG, environ={})
    assert example == _resolved_defaults(EXAMPLE_CONFIG.parent.resolve())


def test_example_config_mentions_every_option() -> None:
    text = EXAMPLE_CONFIG.read_text()

    def walk(cls: type, prefix: str) -> list[str]:
        names = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            names.append(f.name)
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                names += walk(f.default_factory, f"{prefix}{f.name}.")
        return names

    for name in walk(Config, ""):
        assert f"{name}:" in text, f"config.example.yaml does not document {name}"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "config.yaml"
    path.parent.mkdir()
    path.write_text("keys: {signing_key_path: keys/signing.key}\n")
    config = load_config(path, environ={})
    assert config.keys.signing_key_path == str(tmp_path / "etc" / "keys" / "signing.key")
    assert config.database.url == f"sqlite:{tmp_path / 'etc' / 'data' / 'identity.db'}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "federation: {timeout: 7 dayz}",
            'federation.timeout: "7 dayz" is not a duration',
        ),
        ("lookup: {max_adresses: 5}", "lookup.max_adresses: unknown option"),
        ("surprise: 1", "surprise: unknown option"),
        ("listen: {port: eighty}", 'listen.port: expected an integer, got "eighty"'),
        ("listen: {port: 70000}", "listen.port: 70000 is not a TCP port"),
        ("api: {v1_enabled: 'yes'}", "api.v1_enabled: expected true or false"),
        ("lookup: {algorithms: sha256}", "lookup.algorithms: expected a list"),
        ("lookup: {algorithms: [none]}", "lookup.algorithms: must contain sha256"),
        ("database: {url: 'mysql://x'}", 'database.url: "mysql://x" is not a sqlite:'),
        (
            "terms: {policies: {privacy: {languages: {en: {name: P, url: u}}}}}",
            "terms.policies.privacy.version: missing required option",
        ),
        ("listen: [1, 2]", "listen: expected a mapping"),
        ("- a\n- b", "config: the top level must be a mapping"),
        ("a: [", "config: not valid YAML at line"),
        ("listen: {tls_cert: cert.pem}", "listen.tls_cert: tls_cert and tls_key must be set"),
        (
            "appservice: {bot_command_prefix: '!3pid please'}",
            "appservice.bot_command_prefix: must be one word",
        ),
    ],
)
def test_mistakes_stop_with_one_line_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, tmp_path, environ={})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = load_config_text(
        "database: {url: 'sqlite:x.db'}\nlisten: {port: 1}",
        tmp_path,
        environ={
            "APPSERVICE_DATABASE_URL": "postgres://u:secret@db/identity",
            "APPSERVICE_LISTEN_PORT": "9000",
            "APPSERVICE_API_V1_ENABLED": "false",
            "APPSERVICE_SERVER_NAME": "123",
        },
    )
    assert config.database.url == "postgres://u:secret@db/identity"
    assert config.listen.port == 9000
    assert config.api.v1_enabled is False
    assert config.server.name == "123"


def test_bad_environment_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"listen\.port"):
        load_config_text("", tmp_path, environ={"APPSERVICE_LISTEN_PORT": "many"})


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("12h", 43200),
        ("7d", 604800),
        ("500ms", 0.5),
        (5, 5),
        ("2w", 1209600),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "x") == seconds


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml", environ={})


@pytest.mark.parametrize(("algorithms", "warned"), [("[sha256]", True), ("[sha256, none]", False)])
def test_a_store_only_plain_lookups_reach_warns_when_none_is_not_offered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, algorithms: str, warned: bool
) -> None:
    config = load_config_text(
        f"lookup: {{algorithms: {algorithms}}}\n"
        "stores: {order: [rest], rest: {base_url: 'http://127.0.0.1:9/dir'}}\n",
        tmp_path,
        environ={},
    )
    with caplog.at_level("WARNING", logger="appservice.app"):
        IdentityServer(config)  # not started: nothing is opened
    warnings = [r.getMessage() for r in caplog.records if "lookup.algorithms" in r.getMessage()]
    assert bool(warnings) == warned
    if warned:
        assert "rest" in warnings[0]
