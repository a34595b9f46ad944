"""A real Synapse homeserver on loopback for end-to-end tests.

Synapse is installed from PyPI into a cached virtual environment of its own (see
:func:`ensure_synapse_venv`) and run as a subprocess by :class:`SynapseServer`, with a TLS
federation listener whose port is part of the server name (``localhost:<port>``) and a plain HTTP
listener for the client-server API.
"""

from __future__ import annotations

import atexit
import base64
import copy
import fcntl
import hashlib
import hmac
import json as jsonlib
import os
import secrets
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import yaml

from tests.support.tls import TestCertificates
from tests.support.venvs import PIP_INSTALL_TIMEOUT, ensure_venv, run_checked, venv_python

SYNAPSE_VERSION = "1.163.2"
"""The Synapse release the tests run against."""

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The root of this repository."""

DEFAULT_SYNAPSE_VENV = REPO_ROOT / ".cache" / "synapse-venv"
"""Where the Synapse virtual environment is cached unless ``SYNAPSE_VENV`` says otherwise."""

_MARKER_NAME = ".matrix-synapse-installed"


class SynapseError(RuntimeError):
    """Synapse could not be installed, started or talked to."""


def ensure_synapse_venv(venv: Path | None = None) -> Path:
    """Install ``matrix-synapse`` into a cached virtual environment and return its directory.

    The directory is ``venv`` if given, else the ``SYNAPSE_VENV`` environment variable, else
    ``<repo>/.cache/synapse-venv``. The venv is made with the Python running this function.
    A marker file records a finished install of the right version, so a later call returns at
    once; an exclusive file lock next to the venv keeps concurrent callers from installing twice.

    Raises:
        SynapseError: if the venv cannot be created or pip fails.
    """
    if venv is None:
        venv = Path(os.environ.get("SYNAPSE_VENV") or DEFAULT_SYNAPSE_VENV)
    return ensure_venv(
        venv,
        [f"matrix-synapse=={SYNAPSE_VERSION}"],
        marker_name=_MARKER_NAME,
        what="Synapse",
        error=SynapseError,
    )


_POSTGRES_MARKER_NAME = ".psycopg2-installed"


def ensure_synapse_postgres_driver(venv: Path) -> None:
    """Install ``psycopg2`` (what ``matrix-synapse[postgres]`` adds) into the Synapse venv once,
    so Synapse can use PostgreSQL; a marker file makes later calls return at once.

    Raises:
        SynapseError: if pip fails.
    """
    venv = venv.resolve()
    marker = venv / _POSTGRES_MARKER_NAME
    lock_path = venv.parent / f"{venv.name}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if marker.exists():
                return
            run_checked(
                [
                    str(venv_python(venv)),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    f"matrix-synapse[postgres]=={SYNAPSE_VERSION}",
                ],
                f"pip install matrix-synapse[postgres]=={SYNAPSE_VERSION}",
                PIP_INSTALL_TIMEOUT,
                SynapseError,
            )
            marker.write_text("psycopg2\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (found by binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``: nested mappings are merged, everything else replaced."""
    merged = dict(base)
    for key, value in extra.items():
        current = merged.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            merged[key] = _deep_merge(current, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _relaxed_rate_limit() -> dict[str, float]:
    return {"per_second": 10000, "burst_count": 100000}


def _relaxed_rate_limits() -> dict[str, Any]:
    """Rate-limit settings high enough that tests never see ``429 M_LIMIT_EXCEEDED``."""
    limit = _relaxed_rate_limit
    return {
        "rc_message": limit(),
        "rc_registration": limit(),
        "rc_registration_token_validity": limit(),
        "rc_login": {"address": limit(), "account": limit(), "failed_attempts": limit()},
        "rc_admin_redaction": limit(),
        "rc_joins": {"local": limit(), "remote": limit()},
        "rc_joins_per_room": limit(),
        "rc_3pid_validation": limit(),
        "rc_invites": {"per_room": limit(), "per_user": limit(), "per_issuer": limit()},
        "rc_third_party_invite": limit(),
        "rc_room_creation": limit(),
        "rc_presence": {"per_user": limit()},
        "rc_delayed_event_mgmt": limit(),
        "rc_media_create": limit(),
        "rc_reports": limit(),
        "rc_user_directory": limit(),
        "rc_profile": limit(),
        "rc_key_requests": limit(),
    }


def _unpadded_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _decode_body(raw: bytes) -> Any:
    try:
        return jsonlib.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


class SynapseServer:
    """One Synapse homeserver running as a subprocess on loopback.

    ``server_name`` is ``localhost:<federation_port>``: a TLS listener on that port serves the
    ``federation`` resource (which includes ``/_matrix/key``) with the test certificate, so
    other servers reach it by Matrix server discovery without SRV or ``.well-known`` look-ups.
    A plain HTTP listener on ``client_port`` serves the client-server and admin APIs. Synapse
    runs with ``SSL_CERT_FILE=<test CA>``, so it trusts servers presenting certificates of
    that CA.

    Everything (config, signing key, SQLite database, media, logs) lives in ``workdir``; the
    signing key and secrets are kept across :meth:`stop` and a new :meth:`start`.

    Use :meth:`start` and :meth:`stop`, or the instance as a context manager.
    """

    def __init__(
        self,
        workdir: Path,
        certificates: TestCertificates,
        *,
        venv: Path | None = None,
        app_service_config_files: Sequence[Path | str] = (),
        extra_config: Mapping[str, Any] | None = None,
        startup_timeout: float = 60.0,
        before_start: Callable[[SynapseServer], None] | None = None,
    ) -> None:
        """Prepare (but do not start) a Synapse in ``workdir``.

        Args:
            workdir: directory for config, keys, database and logs (created if missing).
            certificates: the test CA and the ``localhost`` certificate for the TLS listener.
            venv: a venv with Synapse installed; by default :func:`ensure_synapse_venv` is
                called by :meth:`start`.
            app_service_config_files: application-service registration files to load.
            extra_config: merged into the generated ``homeserver.yaml`` last (nested
                mappings are merged key by key, any other value replaces the default).
            startup_timeout: seconds :meth:`start` waits for both listeners to answer.
            before_start: called before each start attempt, once the ports (and so the server
                name) are final for that attempt, e.g. to write a registration for the domain.
        """
        self._workdir = workdir.resolve()
        self._certificates = certificates
        self._venv = venv
        self._app_service_config_files = [str(Path(p).resolve()) for p in app_service_config_files]
        self._before_start = before_start
        self._extra_config: dict[str, Any] = copy.deepcopy(dict(extra_config or {}))
        self._startup_timeout = startup_timeout
        self._registration_shared_secret = secrets.token_urlsafe(32)
        self._macaroon_secret_key = secrets.token_urlsafe(32)
        self._form_secret = secrets.token_urlsafe(32)
        self._federation_port = free_port()
        self._client_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._stdout_file: Any = None
        self._started_once = False

    # -- properties -------------------------------------------------------------------------

    @property
    def server_name(self) -> str:
        """The homeserver's server name, ``localhost:<federation_port>``."""
        return f"localhost:{self._federation_port}"

    @property
    def client_url(self) -> str:
        """Base URL of the plain-HTTP client-server (and admin) API listener."""
        return f"http://127.0.0.1:{self._client_port}"

    @property
    def federation_url(self) -> str:
        """Base URL of the TLS federation listener, ``https://localhost:<federation_port>``."""
        return f"https://localhost:{self._federation_port}"

    @property
    def federation_port(self) -> int:
        """Port of the TLS federation listener (also the port in :attr:`server_name`)."""
        return self._federation_port

    @property
    def client_port(self) -> int:
        """Port of the plain-HTTP client-server API listener."""
        return self._client_port

    @property
    def ca_file(self) -> Path:
        """PEM file of the test CA that Synapse trusts and whose certificate it presents."""
        return self._certificates.ca_cert

    @property
    def workdir(self) -> Path:
        """The directory holding config, keys, database and logs."""
        return self._workdir

    @property
    def config_path(self) -> Path:
        """The generated ``homeserver.yaml``."""
        return self._workdir / "homeserver.yaml"

    @property
    def log_path(self) -> Path:
        """Synapse's log file (level INFO)."""
        return self._workdir / "homeserver.log"

    @property
    def stdout_path(self) -> Path:
        """Where Synapse's standard output and error go (start-up crashes show here)."""
        return self._workdir / "synapse.stdout.log"

    @property
    def signing_key_path(self) -> Path:
        """The homeserver's ed25519 signing key file."""
        return self._workdir / "signing.key"

    @property
    def registration_shared_secret(self) -> str:
        """The ``registration_shared_secret`` for ``/_synapse/admin/v1/register``."""
        return self._registration_shared_secret

    @property
    def is_running(self) -> bool:
        """Whether the Synapse process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    # -- configuration ----------------------------------------------------------------------

    def _write_signing_key(self) -> None:
        if self.signing_key_path.exists():
            return
        # Synapse's key file format: "<algorithm> <version> <unpadded base64 of the seed>".
        key_id = "a_" + secrets.token_hex(2)
        self.signing_key_path.write_text(f"ed25519 {key_id} {_unpadded_b64(os.urandom(32))}\n")
        self.signing_key_path.chmod(0o600)

    def _log_config(self) -> dict[str, Any]:
        return {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s"
                }
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    def homeserver_config(self) -> dict[str, Any]:
        """The ``homeserver.yaml`` content that :meth:`start` writes, as a dict."""
        workdir = self._workdir
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "pid_file": str(workdir / "homeserver.pid"),
            "listeners": [
                {
                    "port": self._federation_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": True,
                    "x_forwarded": False,
                    "resources": [{"names": ["federation"], "compress": False}],
                },
                {
                    "port": self._client_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                },
            ],
            "tls_certificate_path": str(self._certificates.cert),
            "tls_private_key_path": str(self._certificates.key),
            "database": {
                "name": "sqlite3",
                "args": {"database": str(workdir / "homeserver.db")},
            },
            "log_config": str(workdir / "log_config.yaml"),
            "media_store_path": str(workdir / "media_store"),
            "signing_key_path": str(self.signing_key_path),
            "registration_shared_secret": self._registration_shared_secret,
            "macaroon_secret_key": self._macaroon_secret_key,
            "form_secret": self._form_secret,
            "enable_registration": False,
            "report_stats": False,
            "enable_metrics": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
            "app_service_config_files": list(self._app_service_config_files),
            **_relaxed_rate_limits(),
        }
        return _deep_merge(config, self._extra_config)

    def _write_config(self) -> None:
        self._workdir.mkdir(parents=True, exist_ok=True)
        (self._workdir / "media_store").mkdir(exist_ok=True)
        self._write_signing_key()
        (self._workdir / "log_config.yaml").write_text(yaml.safe_dump(self._log_config()))
        self.config_path.write_text(yaml.safe_dump(self.homeserver_config(), sort_keys=False))

    # -- process ----------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(name, None)
        env["SSL_CERT_FILE"] = str(self._certificates.ca_cert)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of Synapse's standard output/error and of its log file."""
        parts = []
        for path in (self.stdout_path, self.log_path):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {path.name} (last {lines} lines) ---\n{tail}")
        return "\n".join(parts) if parts else "(no Synapse output yet)"

    def start(self) -> None:
        """Write the config, start Synapse and wait until both listeners answer.

        Raises:
            SynapseError: if Synapse exits or does not answer within ``startup_timeout``
                seconds; the message carries the tail of its log.
        """
        if self.is_running:
            raise SynapseError("Synapse is already running")
        venv = self._venv if self._venv is not None else ensure_synapse_venv()
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(venv)
                return
            except SynapseError:
                tail = self.log_tail()
                port_taken = "Address already in use" in tail or "EADDRINUSE" in tail
                if attempt < attempts and port_taken and not self._started_once:
                    # Another process took one of our ports between picking and binding it;
                    # before the first successful start nobody knows our ports yet.
                    self._federation_port = free_port()
                    self._client_port = free_port()
                    continue
                raise

    def _start_once(self, venv: Path) -> None:
        if self._before_start is not None:
            self._before_start(self)
        self._write_config()
        self.stdout_path.unlink(missing_ok=True)
        self._stdout_file = self.stdout_path.open("wb")
        self._process = subprocess.Popen(
            [
                str(venv_python(venv)),
                "-m",
                "synapse.app.homeserver",
                "--config-path",
                str(self.config_path),
            ],
            cwd=self._workdir,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._stdout_file,
            stderr=subprocess.STDOUT,
        )
        atexit.register(self.stop)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        self._started_once = True

    def _probe(self, url: str, context: ssl.SSLContext | None) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError, ssl.SSLError):
            return False

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        tls = self._certificates.client_context()
        checks = [
            (f"{self.client_url}/_matrix/client/versions", None),
            (f"{self.federation_url}/_matrix/key/v2/server", tls),
        ]
        while checks:
            process = self._process
            assert process is not None
            code = process.poll()
            if code is not None:
                raise SynapseError(
                    f"Synapse exited with code {code} during start-up\n{self.log_tail()}"
                )
            url, context = checks[0]
            if self._probe(url, context):
                checks.pop(0)
                continue
            if time.monotonic() > deadline:
                raise SynapseError(
                    f"Synapse did not answer {url} within {self._startup_timeout:g} s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop Synapse: SIGTERM, wait up to 15 s, then SIGKILL. Does nothing if not running."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._stdout_file is not None:
            self._stdout_file.close()
            self._stdout_file = None

    def __enter__(self) -> Self:
        """Start Synapse."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop Synapse."""
        self.stop()

    # -- HTTP helpers -----------------------------------------------------------------------

    async def client_request(
        self,
        method: str,
        path: str,
        access_token: str | None = None,
        json: Any = None,
        *,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send a request to the client-server API listener and return ``(status, body)``.

        ``path`` starts with ``/`` (e.g. ``/_matrix/client/v3/account/whoami``); the body is
        decoded JSON when it parses, else text.
        """
        headers = {"Authorization": f"Bearer {access_token}"} if access_token else {}
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                method, self.client_url + path, headers=headers, json=json, params=params
            ) as response,
        ):
            return response.status, _decode_body(await response.read())

    async def register_user(
        self, localpart: str, password: str, admin: bool = False
    ) -> tuple[str, str]:
        """Create a user with the shared-secret admin API; return ``(user_id, access_token)``.

        Raises:
            SynapseError: if Synapse refuses the registration.
        """
        path = "/_synapse/admin/v1/register"
        status, body = await self.client_request("GET", path)
        if status != 200:
            raise SynapseError(f"GET {path} answered {status}: {body}")
        nonce = body["nonce"]
        message = "\0".join([nonce, localpart, password, "admin" if admin else "notadmin"])
        mac = hmac.new(
            self._registration_shared_secret.encode(), message.encode(), hashlib.sha1
        ).hexdigest()
        status, body = await self.client_request(
            "POST",
            path,
            json={
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac,
            },
        )
        if status != 200:
            raise SynapseError(f"registering {localpart!r} answered {status}: {body}")
        return str(body["user_id"]), str(body["access_token"])

    async def request_openid_token(self, user_id: str, access_token: str) -> dict[str, Any]:
        """Ask for an OpenID token for ``user_id``; return the ``OpenIdCredentials`` dict.

        The dict has ``access_token``, ``token_type``, ``matrix_server_name`` and ``expires_in``.

        Raises:
            SynapseError: if Synapse refuses.
        """
        quoted = urllib.parse.quote(user_id, safe="")
        path = f"/_matrix/client/v3/user/{quoted}/openid/request_token"
        status, body = await self.client_request("POST", path, access_token, json={})
        if status != 200 or not isinstance(body, dict):
            raise SynapseError(f"POST {path} answered {status}: {body}")
        return body
