"""A real sydent (matrix-sydent from PyPI) on loopback, for the import tests and the benchmark.

sydent is installed into a cached virtual environment of its own (:func:`ensure_sydent_venv`)
and run as a subprocess by :class:`SydentProcess`. On its first start sydent creates its SQLite
schema, its lookup pepper and its ed25519 signing key, which it writes back into the
``sydent.conf`` it was given; :attr:`SydentProcess.signing_key` reads it from there.

Data is put into it the way a deployment gets it, through its own HTTP API (v1: no account
needed): :func:`bind_email` validates an address with the token from the real mail and binds it,
:func:`store_invite` stores a 3PID invite as a homeserver does. A bind marks the invites of the
address as delivered (``sent_ts``), as sydent does whenever it binds.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import nacl.signing

from tests.support.venvs import ensure_venv, venv_python

if TYPE_CHECKING:
    from tests.support.smtp import SmtpSink

SYDENT_VERSION = "2.6.1"
"""The sydent release the import tests and the benchmark run."""

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_SYDENT_VENV = REPO_ROOT / ".cache" / "sydent-venv"
"""Where sydent's virtual environment is cached unless ``SYDENT_VENV`` says otherwise."""

V1 = "/_matrix/identity/api/v1"


class SydentError(RuntimeError):
    """sydent could not be installed, started or talked to."""


def ensure_sydent_venv(venv: Path | None = None) -> Path:
    """Install ``matrix-sydent`` (and ``prometheus-client``, which it imports but does not
    require) into a cached venv once; returns its directory (``venv``, else ``SYDENT_VENV``,
    else ``<repo>/.cache/sydent-venv``).

    Raises:
        SydentError: if the venv cannot be created or pip fails.
    """
    if venv is None:
        venv = Path(os.environ.get("SYDENT_VENV") or DEFAULT_SYDENT_VENV)
    return ensure_venv(
        venv,
        [f"matrix-sydent=={SYDENT_VERSION}", "prometheus-client"],
        marker_name=".matrix-sydent-installed",
        what="sydent",
        error=SydentError,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# sydent's wheel ships no templates: a minimal brand directory of our own.
_TEMPLATES = {
    "verification_template.eml.j2": """\
Date: {{ date }}
From: {{ from|safe }}
To: {{ to }}
Message-ID: {{ messageid|safe }}
Subject: Your validation token
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="{{ multipart_boundary }}"

--{{ multipart_boundary }}
Content-Type: text/plain; charset=UTF-8

Your validation token is {{ token }}.
Or follow {{ link }}

--{{ multipart_boundary }}
Content-Type: text/html; charset=UTF-8

<p>Your validation token is {{ token }}.</p><p><a href="{{ link }}">Validate</a></p>

--{{ multipart_boundary }}--
""",
    "invite_template.eml.j2": """\
Date: {{ date }}
From: {{ from|safe }}
To: {{ to }}
Message-ID: {{ messageid|safe }}
Subject: {{ subject_header_value }}
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="{{ multipart_boundary }}"

--{{ multipart_boundary }}
Content-Type: text/plain; charset=UTF-8

{{ sender_display_name or sender }} invited you to {{ room_name or room_id }}.
{{ web_client_location }}/#/room/{{ room_id }}

--{{ multipart_boundary }}
Content-Type: text/html; charset=UTF-8

<p>{{ sender_display_name or sender }} invited you to {{ room_name or room_id }}.</p>

--{{ multipart_boundary }}--
""",
    "verify_response_template.html": "<html><body><p>%(message)s</p></body></html>\n",
}


def write_sydent_templates(directory: Path) -> Path:
    """The templates root (brand ``matrix-org``) under ``directory``."""
    root = directory / "templates"
    brand = root / "matrix-org"
    brand.mkdir(parents=True, exist_ok=True)
    for name, text in _TEMPLATES.items():
        (brand / name).write_text(text)
    return root


def write_sydent_config(
    directory: Path,
    *,
    port: int,
    smtp_port: int,
    db_file: Path,
    signing_key: str = "",
    server_name: str | None = None,
    public_base_url: str | None = None,
) -> Path:
    """``directory/sydent.conf``: the client API on 127.0.0.1:``port``, mail to ``smtp_port``,
    rate limits out of the way. An empty ``signing_key`` makes sydent generate one on its first
    start (and write it back). ``public_base_url`` (default ``http://127.0.0.1:<port>``) is
    where sydent says it is reachable: the ``key_validity_url`` of its invites name it."""
    templates = write_sydent_templates(directory)
    config = configparser.ConfigParser(interpolation=None)
    config["general"] = {
        "server.name": server_name or f"127.0.0.1:{port}",
        "log.level": "INFO",
        "pidfile.path": str(directory / "sydent.pid"),
        "templates.path": str(templates),
        "brand.default": "matrix-org",
        "ip.whitelist": "127.0.0.1",
        "terms.path": "",
    }
    config["db"] = {"db.file": str(db_file)}
    config["http"] = {
        "clientapi.http.bind_address": "127.0.0.1",
        "clientapi.http.port": str(port),
        "internalapi.http.port": "",
        "replication.https.port": str(free_port()),
        "replication.https.bind_address": "127.0.0.1",
        "federation.verifycerts": "false",
        "client_http_base": public_base_url or f"http://127.0.0.1:{port}",
    }
    config["email"] = {
        "email.from": "Sydent <noreply@localhost>",
        "email.smtphost": "127.0.0.1",
        "email.smtpport": str(smtp_port),
        "email.hostname": "localhost",
        "email.tlsmode": "0",
        "email.ratelimit_sender.burst": "100000000",
        "email.ratelimit_sender.rate_hz": "1000000",
    }
    config["crypto"] = {"ed25519.signingkey": signing_key}
    path = directory / "sydent.conf"
    with path.open("w") as f:
        config.write(f)
    return path


def sydent_command(venv: Path) -> list[str]:
    """How sydent is started (its config comes from ``SYDENT_CONF``)."""
    return [str(venv_python(venv)), "-m", "sydent.sydent"]


def sydent_environment(config: Path) -> dict[str, str]:
    """sydent's environment: ours without APPSERVICE_* settings, plus ``SYDENT_CONF``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPSERVICE_")}
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env | {"SYDENT_CONF": str(config), "PYTHONUNBUFFERED": "1"}


def read_signing_key(config: Path) -> str:
    """The ``[crypto] ed25519.signingkey`` of a sydent.conf (``ed25519 <version> <seed>``)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    return parser.get("crypto", "ed25519.signingkey", fallback="").strip()


def public_key_of(signing_key: str) -> str:
    """The unpadded base64 ed25519 public key of a sydent signing key line."""
    seed = signing_key.split()[2]
    raw = base64.b64decode(seed + "=" * (-len(seed) % 4))
    return base64.b64encode(bytes(nacl.signing.SigningKey(raw).verify_key)).decode().rstrip("=")


class SydentProcess:
    """sydent running as a subprocess in ``workdir`` (config, database, log).

    The first :meth:`start` lets sydent create its database and key; later starts reuse both.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        venv: Path,
        smtp_port: int,
        server_name: str | None = None,
        public_base_url: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.workdir = workdir.resolve()
        self.venv = venv
        self.smtp_port = smtp_port
        self.server_name = server_name
        self.public_base_url = public_base_url
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """Where its client API listens (plain HTTP)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        """Its SQLite database."""
        return self.workdir / "sydent.db"

    @property
    def config_path(self) -> Path:
        """Its sydent.conf (holding the signing key once it started)."""
        return self.workdir / "sydent.conf"

    @property
    def log_path(self) -> Path:
        """Its standard output and error."""
        return self.workdir / "sydent.log"

    @property
    def signing_key(self) -> str:
        """The signing key sydent wrote into its config (``ed25519 <version> <seed>``)."""
        return read_signing_key(self.config_path)

    def log_tail(self, lines: int = 40) -> str:
        """The end of sydent's output, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def start(self) -> None:
        """Write the config (keeping an existing key), start sydent, wait for its API.

        Raises:
            SydentError: if it exits or does not answer in time (with the end of its log).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        key = read_signing_key(self.config_path) if self.config_path.exists() else ""
        write_sydent_config(
            self.workdir,
            port=self.port,
            smtp_port=self.smtp_port,
            db_file=self.db_path,
            signing_key=key,
            server_name=self.server_name,
            public_base_url=self.public_base_url,
        )
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                sydent_command(self.venv),
                cwd=self.workdir,
                env=sydent_environment(self.config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.startup_timeout
        while not self._answers():
            code = self._process.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                what = f"exited with {code}" if code is not None else "did not answer"
                raise SydentError(f"sydent {what}\n{self.log_tail()}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/_matrix/identity/v2", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; nothing if not running."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def run_our_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m appservice ARGS`` (ours), as an operator runs it, e.g. ``import sydent``."""
    return subprocess.run(
        [sys.executable, "-m", "appservice", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("APPSERVICE_")},
    )


def import_sydent(
    config: Path, db: Path, sydent_config: Path | None, *flags: str
) -> subprocess.CompletedProcess[str]:
    """``python -m appservice import sydent -c CONFIG --db DB [--sydent-config CONF] FLAGS``."""
    conf_args: list[str | Path] = (
        ["--sydent-config", sydent_config] if sydent_config is not None else []
    )
    return run_our_cli("import", "sydent", "-c", config, "--db", db, *conf_args, *flags)


async def sydent_request(
    base_url: str, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    """A JSON request to sydent; (status, decoded body)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.request(method, base_url + path, json=body) as response,
    ):
        return response.status, json.loads(await response.read() or b"null")


async def _checked(base_url: str, method: str, path: str, body: dict[str, Any]) -> Any:
    status, answer = await sydent_request(base_url, method, path, body)
    if status != 200:
        raise SydentError(f"sydent {method} {path} answered {status}: {answer}")
    return answer


async def store_invite(
    base_url: str, address: str, room_id: str, sender: str, **extra: str
) -> dict[str, Any]:
    """sydent's own store-invite (v1, no account), as a homeserver calls it; its answer
    (``token``, ``public_key``, ``public_keys``, ``display_name``)."""
    body = {"medium": "email", "address": address, "room_id": room_id, "sender": sender, **extra}
    answer: dict[str, Any] = await _checked(base_url, "POST", f"{V1}/store-invite", body)
    return answer


async def bind_email(base_url: str, smtp: SmtpSink, address: str, mxid: str) -> dict[str, Any]:
    """Validate ``address`` with the token sydent mails to ``smtp`` and bind it to ``mxid``
    (v1); sydent's signed association. Invites waiting for the address are marked sent."""
    secret = secrets.token_hex(16)
    before = len(smtp.mails)
    session = await _checked(
        base_url,
        "POST",
        f"{V1}/validate/email/requestToken",
        {"email": address, "client_secret": secret, "send_attempt": 1},
    )
    mails = await smtp.wait_for(before + 1)
    text = mails[-1].message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    match = re.search(r"validation token is (\w+)\.", text)
    if not match:
        raise SydentError(f"no token in sydent's mail: {text!r}")
    validation = {"sid": session["sid"], "client_secret": secret}
    await _checked(
        base_url,
        "POST",
        f"{V1}/validate/email/submitToken",
        validation | {"token": match.group(1)},
    )
    association: dict[str, Any] = await _checked(
        base_url, "POST", f"{V1}/3pid/bind", validation | {"mxid": mxid}
    )
    return association
