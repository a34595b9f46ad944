"""Start-up mistakes end at once in one line naming the cause and the setting (issue 14):
`run` exits with status 1 (2 for config errors) and no traceback, and nothing is left running."""

from __future__ import annotations

import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appservice.app import load_tls_context
from appservice.config import ConfigError, load_config_text
from appservice.errors import StartupError
from tests.support.tls import make_test_certificates

REPO = Path(__file__).resolve().parents[2]
# A log line written before the failure (e.g. the log connectors' warnings, migrations).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")
# Far longer than a failed start takes; a server that hangs after the error fails the test.
EXIT_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_config(tmp_path: Path, extra: str = "", *, port: int | None = None) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"database: {{url: 'sqlite:{tmp_path / 'is.db'}'}}\n"
        f"keys: {{signing_key_path: '{tmp_path / 'signing.key'}'}}\n"
        f"listen:\n  port: {port or _free_port()}\n" + extra
    )
    return path


def _run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``run`` in a subprocess; TimeoutExpired (a test failure) if it does not end by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPSERVICE_")}
    return subprocess.run(
        [sys.executable, "-m", "appservice", "run", "-c", str(config), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        env={**env, "PYTHONPATH": str(REPO)},
    )


def _the_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one line (besides log lines) on stderr of a run that failed with status 1."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# --- run: fatal errors after the config loaded ----------------------------------------------------


def test_newer_schema_on_sqlite_exits_at_once_with_one_line(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "is.db") as db:
        db.execute(
            "CREATE TABLE schema_migrations"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ts BIGINT NOT NULL)"
        )
        db.execute("INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    db.close()
    error = _the_error(_run(_write_config(tmp_path)))
    assert error.startswith("error: database: schema version 99 is newer than this code knows")


def test_a_database_file_that_is_not_a_database_exits_at_once_with_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "is.db").write_text("not a database, only text that SQLite cannot read" * 20)
    error = _the_error(_run(_write_config(tmp_path)))
    assert error == f"error: database.url: cannot open {tmp_path / 'is.db'}: file is not a database"


def test_a_database_directory_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    # A regular file where the directory should be: refused even to root (tests run as root).
    (tmp_path / "data").write_text("a file")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"database: {{url: 'sqlite:{tmp_path / 'data' / 'db' / 'is.db'}'}}\n"
        f"keys: {{signing_key_path: '{tmp_path / 'signing.key'}'}}\n"
    )
    error = _the_error(_run(config))
    assert error.startswith(
        f"error: database.url: cannot create the directory of {tmp_path / 'data' / 'db' / 'is.db'}"
    )


def test_a_port_in_use_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = _the_error(_run(_write_config(tmp_path, port=port)))
    assert error == (
        f"error: listen.host/listen.port: cannot listen on 127.0.0.1:{port}: the address is"
        " already in use (another process listens there)"
    )


def test_the_appservice_port_in_use_is_one_line_naming_its_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = (
            "appservice:\n"
            f"  as_token: {'a' * 32}\n  hs_token: {'h' * 32}\n"
            f"  homeserver_url: 'http://127.0.0.1:{_free_port()}'\n"
            f"  listen: {{port: {port}}}\n"
        )
        error = _the_error(_run(_write_config(tmp_path, extra)))
    assert error.startswith(f"error: appservice.listen: cannot listen on 127.0.0.1:{port}: ")


def test_an_unresolvable_listen_host_is_one_line_naming_the_option(tmp_path: Path) -> None:
    result = _run(_write_config(tmp_path), "--listen", f"no-such-host.invalid:{_free_port()}")
    error = _the_error(result)
    assert error.startswith("error: --listen: cannot listen on no-such-host.invalid:")
    assert "cannot resolve the host" in error


def test_a_missing_tls_cert_is_one_line_naming_the_path_and_setting(tmp_path: Path) -> None:
    certs = make_test_certificates(tmp_path / "tls")
    missing = tmp_path / "tls" / "missing.pem"
    tls = f"  tls_cert: '{missing}'\n  tls_key: '{certs.key}'\n"
    config = _write_config(tmp_path, tls)
    error = _the_error(_run(config))
    assert error == f"error: listen.tls_cert: cannot read {missing}: No such file or directory"
    # Refused before the database was touched.
    assert not (tmp_path / "is.db").exists()


def test_a_tls_cert_that_is_not_pem_is_one_line_naming_the_path_and_setting(
    tmp_path: Path,
) -> None:
    certs = make_test_certificates(tmp_path / "tls")
    der = tmp_path / "tls" / "cert.der"
    der.write_bytes(b"\x30\x82\x01\x0a" + b"\x00" * 200)
    config = _write_config(tmp_path, f"  tls_cert: '{der}'\n  tls_key: '{certs.key}'\n")
    error = _the_error(_run(config))
    assert error == f"error: listen.tls_cert: {der} is not a PEM certificate"


@pytest.mark.parametrize("problem", ["missing", "not PEM"])
def test_an_unusable_federation_ca_file_is_one_line_naming_the_path_and_setting(
    tmp_path: Path, problem: str
) -> None:
    ca_file = tmp_path / "ca.pem"
    if problem == "not PEM":
        ca_file.write_text("not a certificate")
    error = _the_error(_run(_write_config(tmp_path, f"federation: {{ca_file: '{ca_file}'}}\n")))
    assert error.startswith(f"error: federation.ca_file: cannot load {ca_file}: ")
    if problem == "missing":
        assert error.endswith(": No such file or directory")


def test_an_unusable_ldap_ca_file_is_one_line_naming_the_path_and_setting(tmp_path: Path) -> None:
    missing = tmp_path / "ldap-ca.pem"
    ldap = (
        "stores:\n  order: [ldap]\n"
        f"  ldap: {{uri: 'ldaps://127.0.0.1:{_free_port()}', base_dn: 'dc=example,dc=org',"
        f" ca_file: '{missing}'}}\n"
    )
    error = _the_error(_run(_write_config(tmp_path, ldap)))
    assert error == (
        f"error: stores.ldap: cannot load ca_file {missing}: No such file or directory"
    )


def test_a_misspelt_environment_variable_is_one_formatted_warning_line(tmp_path: Path) -> None:
    # `migrate` on a fresh SQLite file: it ends by itself, and loads the config as `run` does.
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPSERVICE_")}
    result = subprocess.run(
        [sys.executable, "-m", "appservice", "migrate", "-c", str(_write_config(tmp_path))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        env={**env, "PYTHONPATH": str(REPO), "APPSERVICE_DATABSE_URL": "postgres://x@db/x"},
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "APPSERVICE_DATABSE_URL" in line]
    # A log line like the others (time, level, logger), not a bare message.
    assert len(warnings) == 1, result.stderr
    assert LOG_LINE.match(warnings[0]), warnings[0]
    assert warnings[0].endswith(
        " WARNING appservice.config.loader: environment variable APPSERVICE_DATABSE_URL is not a"
        " configuration option, ignored; did you mean APPSERVICE_DATABASE_URL?"
    )


# --- TLS files --------------------------------------------------------------------------------


def _key_pem(encryption: serialization.KeySerializationEncryption) -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def test_a_missing_tls_key_names_its_path_and_setting(tmp_path: Path) -> None:
    certs = make_test_certificates(tmp_path)
    with pytest.raises(StartupError) as info:
        load_tls_context(str(certs.cert), str(tmp_path / "nokey.pem"))
    assert str(info.value) == (
        f"listen.tls_key: cannot read {tmp_path / 'nokey.pem'}: No such file or directory"
    )


def test_a_tls_cert_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    certs = make_test_certificates(tmp_path)
    der = tmp_path / "cert.der"
    der.write_bytes(b"\x30\x82\x01\x0a" + b"\x00" * 200)
    with pytest.raises(StartupError, match=r"^listen\.tls_cert: .*cert\.der is not a PEM cert"):
        load_tls_context(str(der), str(certs.key))
    # A file that only looks like PEM.
    fake = tmp_path / "fake.pem"
    fake.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(StartupError, match=r"^listen\.tls_cert: cannot use .*fake\.pem"):
        load_tls_context(str(fake), str(certs.key))


def test_a_tls_key_that_is_not_pem_or_does_not_match_is_refused(tmp_path: Path) -> None:
    certs = make_test_certificates(tmp_path)
    with pytest.raises(StartupError, match=r"^listen\.tls_key: .* is not a PEM private key$"):
        load_tls_context(str(certs.cert), str(certs.cert))
    other = tmp_path / "other.key"
    other.write_bytes(_key_pem(serialization.NoEncryption()))
    with pytest.raises(StartupError, match=r"^listen\.tls_cert: cannot use .* \(listen\.tls_key\)"):
        load_tls_context(str(certs.cert), str(other))
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(_key_pem(serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(StartupError, match=r"^listen\.tls_key: .* is encrypted"):
        load_tls_context(str(certs.cert), str(encrypted))
    assert load_tls_context(str(certs.cert), str(certs.key)) is not None


# --- the config loader ----------------------------------------------------------------------


def _refused(text: str, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, tmp_path, environ={})
    message = str(info.value)
    assert "\n" not in message
    return message


LOOP_INTERVALS = [
    ("invites.delivery.poll_interval", "invites: {delivery: {poll_interval: %s}}"),
    ("invites.delivery.retry_initial", "invites: {delivery: {retry_initial: %s}}"),
    ("invites.expiration.check_interval", "invites: {expiration: {check_interval: %s}}"),
    ("invites.resolution_interval", "invites: {resolution_interval: %s}"),
]


@pytest.mark.parametrize("value", ["0", "0s", "0ms", "0.0", "50ms"])
@pytest.mark.parametrize(("key", "template"), LOOP_INTERVALS)
def test_loop_intervals_under_100ms_are_refused(
    tmp_path: Path, key: str, template: str, value: str
) -> None:
    assert _refused(template % value, tmp_path) == f"{key}: must be at least 100ms"


@pytest.mark.parametrize(("key", "template"), LOOP_INTERVALS)
def test_negative_or_endless_intervals_are_refused(tmp_path: Path, key: str, template: str) -> None:
    assert _refused(template % "-1", tmp_path) == f"{key}: -1 is negative"
    assert _refused(template % "-5s", tmp_path).startswith(f'{key}: "-5s" is not a duration')
    assert _refused(template % ".nan", tmp_path) == f"{key}: nan is not a duration"
    assert _refused(template % ".inf", tmp_path) == f"{key}: inf is not a duration"


def test_the_shortest_loop_interval_and_the_store_sync_are_checked(tmp_path: Path) -> None:
    config = load_config_text(
        "invites: {delivery: {poll_interval: 100ms}, resolution_interval: 0.1}", tmp_path, {}
    )
    assert config.invites.delivery.poll_interval == 0.1
    assert config.invites.resolution_interval == 0.1
    assert _refused("stores: {sync_interval: 0}", tmp_path) == (
        "stores.sync_interval: must be at least 1s"
    )


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("invites.delivery.give_up_after", "invites: {delivery: {give_up_after: 0s}}"),
        ("invites.expiration.after", "invites: {expiration: {after: 0}}"),
        ("session.lifetime", "session: {lifetime: 0m}"),
        ("federation.timeout", "federation: {timeout: 0}"),
        ("notifications.email.smtp.timeout", "notifications: {email: {smtp: {timeout: 0s}}}"),
        ("notifications.sms.twilio.timeout", "notifications: {sms: {twilio: {timeout: 0}}}"),
    ],
)
def test_zero_durations_are_refused(tmp_path: Path, key: str, text: str) -> None:
    assert _refused(text, tmp_path) == f"{key}: must be more than 0s"


def test_retry_max_below_retry_initial_is_refused(tmp_path: Path) -> None:
    text = "invites: {delivery: {retry_initial: 1m, retry_max: 10s}}"
    assert _refused(text, tmp_path) == (
        "invites.delivery.retry_max: must be at least retry_initial"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen: {host: ''}", "listen.host: must not be empty (0.0.0.0 or :: for every"),
        ("listen: {port: 0}", "listen.port: 0 is not a TCP port"),
        ("listen: {port: 65536}", "listen.port: 65536 is not a TCP port"),
        ("appservice: {listen: {host: ' '}}", "appservice.listen.host: must not be empty"),
        ("appservice: {listen: {port: 0}}", "appservice.listen.port: 0 is not a TCP port"),
        ("appservice: {listen: {port: 99999}}", "appservice.listen.port: 99999 is not a TCP"),
    ],
)
def test_listener_addresses_that_cannot_be_bound_are_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    assert _refused(text, tmp_path).startswith(message)


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ("max_connections: 0", "database.max_connections: must be at least 1"),
        ("min_connections: -1", "database.min_connections: must be between 0 and"),
        (
            "min_connections: 5, max_connections: 2",
            "database.min_connections: must be between 0 and max_connections (2)",
        ),
    ],
)
def test_database_pool_sizes_the_driver_refuses_are_config_errors(
    tmp_path: Path, pool: str, message: str
) -> None:
    # asyncpg would refuse them with a ValueError, a traceback.
    url = "postgres://postgres@127.0.0.1:5432/identity"
    assert _refused(f"database: {{url: '{url}', {pool}}}", tmp_path).startswith(message)
    accepted = load_config_text(
        f"database: {{url: '{url}', min_connections: 0, max_connections: 1}}", tmp_path, {}
    )
    assert accepted.database.max_connections == 1


@pytest.mark.parametrize(
    "url",
    [
        "postgres://postgres@127.0.0.1:5432",
        "postgres://postgres@127.0.0.1:5432/",
        "postgresql://identity:s3cret@db.example.org",
        "postgres://identity:s3cret@db/?sslmode=require",
    ],
)
def test_a_postgres_url_without_a_database_is_refused(tmp_path: Path, url: str) -> None:
    message = _refused(f"database: {{url: '{url}'}}", tmp_path)
    assert message.startswith("database.url: the postgres:// URL names no database")
    assert "s3cret" not in message
    synapse = f"stores: {{order: [synapse], synapse: {{database_url: '{url}'}}}}"
    assert _refused(synapse, tmp_path).startswith("stores.synapse.database_url: the postgres://")


@pytest.mark.parametrize(
    "url",
    [
        "postgres://postgres@127.0.0.1:5432/identity",
        "postgresql://identity:secret@db/identity?sslmode=require",
        "postgres:///identity",
        "postgres://identity@db/?dbname=identity",
    ],
)
def test_a_postgres_url_naming_its_database_is_accepted(tmp_path: Path, url: str) -> None:
    assert load_config_text(f"database: {{url: '{url}'}}", tmp_path, {}).database.url == url


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('server: {name: ""}', "server.name: must not be empty"),
        ("server: {name: '   '}", "server.name: must not be empty"),
        ("server: {name: 'id.example.org x'}", 'server.name: "id.example.org x" must not contain'),
        ("server: {alternative_names: ['']}", "server.alternative_names[0]: must not be empty"),
    ],
)
def test_an_empty_server_name_is_refused(tmp_path: Path, text: str, message: str) -> None:
    assert _refused(text, tmp_path).startswith(message)


def test_an_empty_server_name_from_the_environment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^server\.name: must not be empty"):
        load_config_text("", tmp_path, environ={"APPSERVICE_SERVER_NAME": ""})


def test_a_misspelt_environment_variable_is_a_warning_naming_the_closest_option(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="appservice.config.loader")
    config = load_config_text(
        "",
        tmp_path,
        environ={
            "APPSERVICE_DATABSE_URL": "postgres://identity:s3cret@db/identity",
            "APPSERVICE_LISTEN_PORT": "9000",
            "APPSERVICE_NOTIFICATIONS_EMAIL_SMTP_PASSWORD": "pw",
            "APPSERVICE_MIGRATIONS_DIR": "/somewhere",
            "APPSERVICE_TEST_POSTGRES": "postgres://postgres@127.0.0.1/postgres",
            "HOME": "/root",
        },
    )
    assert config.listen.port == 9000
    assert config.database.url.startswith("sqlite:")
    assert [record.getMessage() for record in caplog.records] == [
        "environment variable APPSERVICE_DATABSE_URL is not a configuration option, ignored;"
        " did you mean APPSERVICE_DATABASE_URL?"
    ]


def test_an_unknown_environment_variable_without_a_close_option_is_still_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="appservice.config.loader")
    load_config_text("", tmp_path, environ={"APPSERVICE_XYZZY": "1"})
    assert [record.getMessage() for record in caplog.records] == [
        "environment variable APPSERVICE_XYZZY is not a configuration option, ignored"
    ]
