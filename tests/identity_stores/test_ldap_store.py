"""The ldap store against a real slapd (tests/support/slapd.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appservice.config import ConfigError, load_config_text
from appservice.config.model import Duration, LdapStoreConfig
from appservice.identity_stores import StoreEntry, StoreError
from appservice.identity_stores import ldap as ldap_module
from appservice.identity_stores.ldap import LdapStore
from tests.support.slapd import (
    BASE_DN,
    BULK_PEOPLE,
    GROUPS_DN,
    READER_DN,
    READER_PASSWORD,
    Slapd,
    slapd_fixture,  # noqa: F401 (provides the slapd fixture)
)
from tests.support.tls import make_test_certificates

SERVER = "example.org"


def make_config(slapd: Slapd, **overrides: Any) -> LdapStoreConfig:
    """A config for the test directory, read through the reader account."""
    config = LdapStoreConfig(
        uri=slapd.uri,
        bind_dn=READER_DN,
        bind_password=READER_PASSWORD,
        base_dn=BASE_DN,
        timeout=Duration(5),
    )
    return dataclasses.replace(config, **overrides)


@pytest.fixture
async def open_store(slapd: Slapd) -> AsyncIterator[Any]:
    """Opens stores for a test and closes them after it."""
    stores: list[LdapStore] = []

    async def open_(config: LdapStoreConfig) -> LdapStore:
        store = LdapStore(config, SERVER)
        await store.start()
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.close()


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


async def collect(store: LdapStore) -> list[StoreEntry]:
    return [entry async for entry in store.entries()]


async def test_find_by_email_ignores_case(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd))
    # The directory holds "Alice.Smith@Example.ORG"; addresses come in canonical (folded).
    found = await store.find([("email", "alice.smith@example.org")])
    assert found == {("email", "alice.smith@example.org"): "@alice:example.org"}
    found = await store.find([("email", "bob.builder@example.org")])
    assert found == {("email", "bob.builder@example.org"): "@bob:example.org"}


async def test_find_by_phone_in_international_and_national_forms(
    slapd: Slapd, open_store: Any
) -> None:
    store = await open_store(make_config(slapd, default_region="DE"))
    wanted = [
        ("msisdn", "4930901820"),  # "+49 30 901820"
        ("msisdn", "12025550143"),  # "+1 202-555-0143"
        ("msisdn", "493012345678"),  # "030 12345678" (national, read as DE)
        ("msisdn", "49305550123"),  # "030 5550123"
        ("msisdn", "4930999999"),  # nobody's
    ]
    assert await store.find(wanted) == {
        ("msisdn", "4930901820"): "@alice:example.org",
        ("msisdn", "12025550143"): "@bob:example.org",
        ("msisdn", "493012345678"): "@alice:example.org",
        ("msisdn", "49305550123"): "@erin:example.org",
    }


async def test_national_phone_numbers_need_a_default_region(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd))
    found = await store.find([("msisdn", "49305550123"), ("msisdn", "4930901820")])
    assert found == {("msisdn", "4930901820"): "@alice:example.org"}


async def test_bulk_find_answers_hits_and_leaves_out_misses(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd))
    hits = [("email", f"bulk{i:03}@bulk.example.org") for i in range(BULK_PEOPLE)]
    misses = [("email", f"nobody{i}@bulk.example.org") for i in range(40)]
    invalid = [("email", "no address"), ("msisdn", "12"), ("carrier-pigeon", "x")]
    # More than one search's worth (FIND_CHUNK), hits and misses interleaved.
    asked = [*hits[:80], *misses, *hits[80:]]
    found = await store.find(asked + invalid)
    assert found == {t: f"@bulk{i:03}:example.org" for i, t in enumerate(hits)}
    assert len(asked) > 2 * ldap_module.FIND_CHUNK


async def test_entries_lists_every_person_with_canonical_addresses(
    slapd: Slapd, open_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ldap_module, "PAGE_SIZE", 7)  # many pages from a small directory
    store = await open_store(make_config(slapd, default_region="DE"))
    entries = await collect(store)
    assert len(entries) == len(set(entries))
    named = {e for e in entries if "bulk" not in e.address}
    assert named == {
        StoreEntry("email", "alice.smith@example.org", "@alice:example.org"),
        StoreEntry("msisdn", "4930901820", "@alice:example.org"),
        StoreEntry("msisdn", "493012345678", "@alice:example.org"),
        StoreEntry("email", "bob@example.org", "@bob:example.org"),
        StoreEntry("email", "bob.builder@example.org", "@bob:example.org"),
        StoreEntry("msisdn", "12025550143", "@bob:example.org"),
        StoreEntry("email", "carol@example.org", "@carol.w:example.org"),
        StoreEntry("msisdn", "49305550123", "@erin:example.org"),
        StoreEntry("email", "frank@example.org", "@frank:example.org"),
    }
    bulk = {e for e in entries if "bulk" in e.address}
    assert bulk == {
        StoreEntry("email", f"bulk{i:03}@bulk.example.org", f"@bulk{i:03}:example.org")
        for i in range(BULK_PEOPLE)
    }


async def test_entries_skip_national_numbers_without_default_region(
    slapd: Slapd, open_store: Any
) -> None:
    store = await open_store(make_config(slapd))
    phones = {(e.address, e.mxid) for e in await collect(store) if e.medium == "msisdn"}
    assert phones == {
        ("4930901820", "@alice:example.org"),
        ("12025550143", "@bob:example.org"),
    }


async def test_localpart_falls_back_to_the_next_attribute(slapd: Slapd, open_store: Any) -> None:
    # Carol has no uid, only sAMAccountName "Carol.W" (lower-cased for the Matrix ID).
    store = await open_store(make_config(slapd))
    found = await store.find([("email", "carol@example.org"), ("email", "alice.smith@example.org")])
    assert found == {
        ("email", "carol@example.org"): "@carol.w:example.org",
        ("email", "alice.smith@example.org"): "@alice:example.org",
    }
    # Order matters: cn first names everybody by their cn, which has spaces, so nobody is
    # found; a valid one wins.
    by_cn = await open_store(make_config(slapd, localpart_attributes=("cn", "uid")))
    assert await by_cn.find([("email", "carol@example.org")]) == {}
    by_sam = await open_store(make_config(slapd, localpart_attributes=("sAMAccountName", "uid")))
    assert await by_sam.find([("email", "bob@example.org")]) == {
        ("email", "bob@example.org"): "@bob:example.org"
    }


async def test_entries_with_an_invalid_localpart_are_skipped(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd))
    assert await store.find([("email", "dave@example.org")]) == {}
    assert all(e.address != "dave@example.org" for e in await collect(store))


async def test_user_ids_use_the_configured_server_name(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd, server_name="corp.example"))
    found = await store.find([("email", "bob@example.org")])
    assert found == {("email", "bob@example.org"): "@bob:corp.example"}
    assert await store.roles("@bob:corp.example") == {"staff"}
    assert await store.roles("@bob:example.org") == frozenset()


async def test_roles_come_from_member_of(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd))
    # "ops, night" is escaped in the group's DN (cn=ops\2C night).
    assert await store.roles("@alice:example.org") == {"admins", "staff", "ops, night"}
    assert await store.roles("@carol.w:example.org") == {"admins"}
    assert await store.roles("@bob:example.org") == {"staff"}
    assert await store.roles("@nobody:example.org") == frozenset()
    assert await store.roles("@alice:elsewhere.example") == frozenset()


async def test_roles_come_from_a_group_search(slapd: Slapd, open_store: Any) -> None:
    # auditors is a groupOfUniqueNames, which the memberof overlay does not track.
    both = await open_store(make_config(slapd, group_base_dn=GROUPS_DN))
    assert await both.roles("@bob:example.org") == {"staff", "auditors"}
    search_only = await open_store(
        make_config(slapd, group_base_dn=GROUPS_DN, group_attribute="businessCategory")
    )
    assert await search_only.roles("@bob:example.org") == {"staff", "auditors"}
    assert await search_only.roles("@alice:example.org") == {"admins", "staff", "ops, night"}


async def test_wrong_bind_password_is_refused(slapd: Slapd) -> None:
    store = LdapStore(make_config(slapd, bind_password="wrong-password"), SERVER)
    with pytest.raises(StoreError) as e:
        await store.start()
    assert str(e.value) == f"LDAP bind as {READER_DN} refused (invalid credentials)"
    with pytest.raises(StoreError, match="refused"):
        await store.find([("email", "bob@example.org")])
    await store.close()


async def test_a_missing_base_dn_stops_start(slapd: Slapd) -> None:
    store = LdapStore(make_config(slapd, base_dn="ou=nobody,dc=example,dc=org"), SERVER)
    with pytest.raises(StoreError, match="base_dn ou=nobody,dc=example,dc=org cannot be read"):
        await store.start()
    await store.close()


async def test_anonymous_bind_reads_the_directory(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd, bind_dn="", bind_password=""))
    found = await store.find([("email", "bob@example.org")])
    assert found == {("email", "bob@example.org"): "@bob:example.org"}


async def test_refused_connection_is_a_store_error(slapd: Slapd) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = LdapStore(make_config(slapd, uri=f"ldap://127.0.0.1:{port}"), SERVER)
    with pytest.raises(StoreError, match="unreachable"):
        await store.start()
    await store.close()


async def test_silent_server_fails_within_the_timeout(slapd: Slapd, silent_listener: int) -> None:
    config = make_config(slapd, uri=f"ldap://127.0.0.1:{silent_listener}", timeout=Duration(1))
    store = LdapStore(config, SERVER)
    started = time.monotonic()
    with pytest.raises(StoreError):
        await store.find([("email", "bob@example.org")])
    assert time.monotonic() - started < 4
    await store.close()


async def test_reconnects_after_the_server_restarts(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd))
    assert await store.roles("@bob:example.org") == {"staff"}
    slapd.restart()
    assert await store.roles("@bob:example.org") == {"staff"}
    found = await store.find([("email", "bob@example.org")])
    assert found == {("email", "bob@example.org"): "@bob:example.org"}


async def test_ldaps_with_the_test_ca(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd, uri=slapd.ldaps_uri, ca_file=str(slapd.ca_file)))
    found = await store.find([("email", "bob@example.org")])
    assert found == {("email", "bob@example.org"): "@bob:example.org"}


async def test_start_tls_with_the_test_ca(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd, start_tls=True, ca_file=str(slapd.ca_file)))
    assert await store.roles("@alice:example.org") == {"admins", "staff", "ops, night"}


@pytest.mark.parametrize("mode", ["ldaps", "start_tls"])
async def test_tls_with_a_wrong_ca_fails(slapd: Slapd, tmp_path: Path, mode: str) -> None:
    other_ca = make_test_certificates(tmp_path / "other").ca_cert
    if mode == "ldaps":
        config = make_config(slapd, uri=slapd.ldaps_uri, ca_file=str(other_ca))
    else:
        config = make_config(slapd, start_tls=True, ca_file=str(other_ca))
    store = LdapStore(config, SERVER)
    with pytest.raises(StoreError, match=r"TLS with LDAP server .* failed: certificate verify"):
        await store.start()
    await store.close()


def _certificate_for(name: str, directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) naming only ``name``: (certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_checks_the_host_name(slapd: Slapd, tmp_path: Path) -> None:
    # A TLS listener with a certificate the CA file trusts, but for another name.
    cert, key = _certificate_for("ldap.other.example", tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    config = make_config(slapd, uri=f"ldaps://127.0.0.1:{port}", ca_file=str(cert))
    store = LdapStore(config, SERVER)
    try:
        with pytest.raises(StoreError, match=r"TLS with LDAP server .* failed: .*mismatch"):
            await store.start()
    finally:
        await store.close()
        server.close()
        await server.wait_closed()


async def test_filter_injection_finds_nothing(slapd: Slapd, open_store: Any) -> None:
    store = await open_store(make_config(slapd))
    assert await store.find([("email", "*)(uid=*")]) == {}
    assert await store.find([("email", "x@example.org*)(uid=*")]) == {}
    # "*" is allowed in an address's local part; unescaped it would match every example.org
    # address.
    assert await store.find([("email", "*@example.org")]) == {}
    assert await store.roles("@*:example.org") == frozenset()


def test_config_rejects_inconsistent_ldap_settings() -> None:
    def load(ldap: str) -> None:
        text = f"stores:\n  order: [ldap]\n  ldap:\n    base_dn: dc=example,dc=org\n{ldap}"
        load_config_text(text, Path("/tmp"), environ={})

    with pytest.raises(ConfigError, match=r"^stores\.ldap\.bind_password: required"):
        load("    bind_dn: cn=reader,dc=example,dc=org\n")
    with pytest.raises(ConfigError, match=r"^stores\.ldap\.start_tls: "):
        load("    uri: ldaps://ldap.example.org\n    start_tls: true\n")
    with pytest.raises(ConfigError, match=r"^stores\.ldap\.default_region: "):
        load("    default_region: XX\n")
    with pytest.raises(ConfigError, match=r"^stores\.ldap\.user_filter: "):
        load("    user_filter: objectClass=person\n")
    load("    default_region: DE\n")
