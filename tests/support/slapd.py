"""A real OpenLDAP slapd on 127.0.0.1 for the ldap store tests (one per test session).

``scripts/ensure-slapd.sh`` installs Debian's slapd when it is missing; this module then runs a
private slapd with its own slapd.conf, an mdb database in a temporary directory, an ldap:// and an
ldaps:// listener (certificate from the test CA in ``tests/support/tls.py``), the memberof overlay,
and a small directory of people and groups (``PEOPLE``, ``GROUPS``).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.tls import TestCertificates, make_test_certificates

ROOT = Path(__file__).resolve().parents[2]
SLAPD = "/usr/sbin/slapd"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")

BASE_DN = "dc=example,dc=org"
PEOPLE_DN = f"ou=people,{BASE_DN}"
GROUPS_DN = f"ou=groups,{BASE_DN}"
ROOT_DN = f"cn=admin,{BASE_DN}"
ROOT_PASSWORD = "root-secret"
READER_DN = f"cn=reader,{BASE_DN}"
READER_PASSWORD = "reader-secret"
# People generated for bulk lookups and paging: bulk000 .. bulk119, mail bulkNNN@bulk.example.org.
BULK_PEOPLE = 120

# A stand-in for Active Directory's account name attribute (OpenLDAP's experimental OID arc).
_TEST_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.4203.666.11.99.1 NAME 'sAMAccountName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
"""


@dataclass(frozen=True)
class Person:
    """A person entry: RDN value (``uid`` when ``uid`` is set, else ``cn``) and attributes."""

    cn: str
    uid: str | None = None
    mail: tuple[str, ...] = ()
    telephone: tuple[str, ...] = ()
    mobile: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def dn(self) -> str:
        rdn = f"uid={self.uid}" if self.uid else f"cn={self.cn}"
        return f"{rdn},{PEOPLE_DN}"


PEOPLE: tuple[Person, ...] = (
    Person(
        "Alice Smith",
        uid="alice",
        mail=("Alice.Smith@Example.ORG",),
        telephone=("+49 30 901820",),
        mobile=("030 12345678",),
    ),
    Person(
        "Bob Builder",
        uid="bob",
        mail=("bob@example.org", "bob.builder@example.org"),
        mobile=("+1 202-555-0143",),
    ),
    # Active Directory style: no uid, the account name in sAMAccountName.
    Person("Carol White", mail=("carol@example.org",), extra={"sAMAccountName": "Carol.W"}),
    # Its uid is no valid Matrix localpart: not listed, not found.
    Person("Dave Jones", uid="dave jones", mail=("dave@example.org",)),
    # Only a national phone number (no +): needs default_region DE.
    Person("Erin Berg", uid="erin", telephone=("030 5550123",)),
    # A value that is no address at all is skipped, the good one still counts.
    Person("Frank Odd", uid="frank", mail=("not an address", "frank@example.org")),
)

# Group RDN value → (object class, members). groupOfNames feed memberOf (the memberof
# overlay); the groupOfUniqueNames group is only found by searching the groups.
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "admins": ("groupOfNames", ("alice", "Carol White")),
    "staff": ("groupOfNames", ("alice", "bob")),
    "ops, night": ("groupOfNames", ("alice",)),
    "auditors": ("groupOfUniqueNames", ("bob",)),
}


def _person_dn(name: str) -> str:
    for person in PEOPLE:
        if name in (person.uid, person.cn):
            return person.dn
    raise KeyError(name)


def group_dn(name: str) -> str:
    """The DN of a group in ``GROUPS``."""
    return f"cn={name.replace(',', chr(92) + ',')},{GROUPS_DN}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Slapd:
    """A running test slapd."""

    directory: Path
    certificates: TestCertificates
    port: int
    tls_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        """Plain LDAP (StartTLS available)."""
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        """LDAP over TLS from the start."""
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def ca_file(self) -> Path:
        """The CA that signed slapd's certificate."""
        return self.certificates.ca_cert

    def write_config(self) -> Path:
        """Write slapd.conf and the extra schema; return the config path."""
        (self.directory / "db").mkdir(exist_ok=True)
        schema = self.directory / "test.schema"
        schema.write_text(_TEST_SCHEMA)
        includes = "\n".join(
            f"include {SCHEMA_DIR / name}.schema"
            for name in ("core", "cosine", "inetorgperson", "nis")
        )
        memberof = ""
        if (MODULE_DIR / "memberof.so").exists() or (MODULE_DIR / "memberof.la").exists():
            memberof = "moduleload memberof\n"
        config = self.directory / "slapd.conf"
        config.write_text(
            f"""{includes}
include {schema}
modulepath {MODULE_DIR}
moduleload back_mdb
{memberof}pidfile {self.directory / "slapd.pid"}
argsfile {self.directory / "slapd.args"}
TLSCACertificateFile {self.certificates.ca_cert}
TLSCertificateFile {self.certificates.cert}
TLSCertificateKeyFile {self.certificates.key}

database mdb
suffix "{BASE_DN}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PASSWORD}
directory {self.directory / "db"}
maxsize 104857600
dbnosync
index objectClass eq
index uid,mail,cn eq
{"overlay memberof" if memberof else ""}
"""
        )
        return config

    def start(self) -> None:
        """Start slapd and wait (bounded) until it accepts connections."""
        config = self.directory / "slapd.conf"
        log_file = (self.directory / "slapd.log").open("ab")
        # -d 0: stay in the foreground (so we own the process) without debug output.
        self.process = subprocess.Popen(
            [SLAPD, "-f", str(config), "-h", f"{self.uri}/ {self.ldaps_uri}/", "-d", "0"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "slapd.log").read_text(errors="replace")
                pytest.fail(f"slapd exited with {self.process.returncode}:\n{log[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail("slapd did not accept connections within 30s")

    def stop(self) -> None:
        """Stop slapd (bounded wait, then kill)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def restart(self) -> None:
        """Stop and start again on the same ports and database (drops every connection)."""
        self.stop()
        self.start()

    def load(self) -> None:
        """Add the base, the reader account, the people and the groups (with ldapadd, through
        the server, so the memberof overlay maintains memberOf)."""
        entries: list[tuple[str, list[str], dict[str, list[str]]]] = [
            (BASE_DN, ["dcObject", "organization"], {"dc": ["example"], "o": ["Example"]}),
            (PEOPLE_DN, ["organizationalUnit"], {"ou": ["people"]}),
            (GROUPS_DN, ["organizationalUnit"], {"ou": ["groups"]}),
            (
                READER_DN,
                ["organizationalRole", "simpleSecurityObject"],
                {"cn": ["reader"], "userPassword": [READER_PASSWORD]},
            ),
        ]
        for person in PEOPLE:
            attributes = {"cn": [person.cn], "sn": [person.cn.split()[-1]]}
            if person.uid:
                attributes["uid"] = [person.uid]
            attributes["mail"] = list(person.mail)
            attributes["telephoneNumber"] = list(person.telephone)
            attributes["mobile"] = list(person.mobile)
            attributes.update({k: [v] for k, v in person.extra.items()})
            classes = ["inetOrgPerson"] + (["extensibleObject"] if person.extra else [])
            entries.append((person.dn, classes, attributes))
        for i in range(BULK_PEOPLE):
            uid = f"bulk{i:03}"
            entries.append(
                (
                    f"uid={uid},{PEOPLE_DN}",
                    ["inetOrgPerson"],
                    {
                        "uid": [uid],
                        "cn": [f"Bulk {i}"],
                        "sn": ["Bulk"],
                        "mail": [f"{uid}@bulk.example.org"],
                    },
                )
            )
        for name, (object_class, members) in GROUPS.items():
            member_attribute = "member" if object_class == "groupOfNames" else "uniqueMember"
            entries.append(
                (
                    group_dn(name),
                    [object_class],
                    {"cn": [name], member_attribute: [_person_dn(m) for m in members]},
                )
            )
        ldif = []
        for dn, classes, attributes in entries:
            lines = [f"dn: {dn}", *(f"objectClass: {c}" for c in classes)]
            lines += [f"{name}: {v}" for name, values in attributes.items() for v in values]
            ldif.append("\n".join(lines) + "\n")
        path = self.directory / "data.ldif"
        path.write_text("\n".join(ldif))
        command = ["ldapadd", "-x", "-H", self.uri, "-D", ROOT_DN, "-w", ROOT_PASSWORD]
        added = subprocess.run(
            [*command, "-f", str(path)], capture_output=True, text=True, timeout=60
        )
        if added.returncode != 0:
            pytest.fail(f"ldapadd failed ({added.returncode}): {added.stderr[-2000:]}")


@pytest.fixture(scope="session", name="slapd")
def slapd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A slapd with the test directory loaded, for the whole session."""
    subprocess.run(["bash", str(ROOT / "scripts" / "ensure-slapd.sh")], check=True, timeout=600)
    directory = tmp_path_factory.mktemp("slapd")
    server = Slapd(
        directory=directory,
        certificates=make_test_certificates(directory / "tls"),
        port=_free_port(),
        tls_port=_free_port(),
    )
    server.write_config()
    server.start()
    try:
        server.load()
        yield server
    finally:
        server.stop()
