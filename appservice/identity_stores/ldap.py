"""The ``ldap`` store: people in an LDAP directory (OpenLDAP, Active Directory) via ldap3.

ldap3 is synchronous, so every operation runs in a worker thread. Lookups and role queries share
one connection (opened on first use, reopened after it drops); ``entries()`` pages through the
directory on a connection of its own so a long listing never holds up lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import ssl
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import phonenumbers

from appservice.config.model import LdapStoreConfig
from appservice.identity_stores.base import StoreEntry, StoreError, Threepid
from appservice.threepid import canonical_address, is_localpart, parse_email, parse_phone_number

with warnings.catch_warnings():
    # ldap3 2.9.1 imports names pyasn1 0.6 deprecated (tagMap, typeMap); nothing to act on.
    warnings.filterwarnings("ignore", r"\w+ is deprecated\. Please use", DeprecationWarning)
    from ldap3 import ANONYMOUS, BASE, NONE, SIMPLE, SUBTREE, SYNC, Connection, Server, Tls
    from ldap3.core.exceptions import (
        LDAPCommunicationError,
        LDAPException,
        LDAPResponseTimeoutError,
    )
    from ldap3.utils.conv import escape_filter_chars
    from ldap3.utils.dn import parse_dn

log = logging.getLogger(__name__)

T = TypeVar("T")

_PAGED_RESULTS = "1.2.840.113556.1.4.319"
# Entries per page: below Active Directory's default MaxPageSize (1000).
PAGE_SIZE = 500
# 3PIDs per search in find(): keeps each OR filter a reasonable size.
FIND_CHUNK = 50
_INVALID_CREDENTIALS = 49


class _ConnectionLost(StoreError):
    """The connection failed mid-operation; worth one retry on a fresh connection."""


@dataclass(frozen=True)
class _Person:
    """One search result: its DN and attributes (names lower-cased, values decoded)."""

    dn: str
    attributes: dict[str, list[str]]

    def values(self, name: str) -> list[str]:
        return self.attributes.get(name.lower(), [])


class _VerifyingTls(Tls):  # type: ignore[misc]
    """ldap3's Tls with Python's own certificate and host name verification.

    ldap3 turns the SSL context's host name check off and checks the name afterwards with
    ``ssl.match_hostname`` (deprecated, removed in Python 3.12), so the socket is wrapped here
    with a default context that verifies chain and name during the handshake.
    """

    def __init__(self, ca_file: str | None) -> None:
        # First, so a missing or non-PEM file raises OSError naming why (ldap3 only says
        # "invalid CA public key file").
        self.context = ssl.create_default_context(cafile=ca_file)
        super().__init__(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
        self.failure: str | None = None

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        try:
            connection.socket = self.context.wrap_socket(
                connection.socket,
                server_side=False,
                do_handshake_on_connect=do_handshake,
                server_hostname=connection.server.host,
            )
        except ssl.SSLCertVerificationError as e:
            self.failure = f"certificate verify failed: {_one_line(e.verify_message or str(e))}"
            raise
        except ssl.SSLError as e:
            self.failure = _one_line(str(e))
            raise


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _role_from_dn(dn: str, role_attribute: str) -> str | None:
    """The value of ``role_attribute`` in the first RDN of ``dn`` (``cn=admins,ou=groups`` →
    ``admins``), unescaped; None when the DN does not parse or its first RDN lacks it."""
    try:
        components = parse_dn(dn, escape=False, strip=True)
    except LDAPException:
        return None
    for attribute, value, separator in components:
        if attribute.lower() == role_attribute.lower():
            return _unescape_dn_value(value)
        if separator != "+":  # the first RDN is over
            break
    return None


def _unescape_dn_value(value: str) -> str:
    """Undo RFC 4514 escapes (``\\,`` and ``\\2C``) in an attribute value of a DN."""
    out = bytearray()
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            pair = value[i + 1 : i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            out.extend(value[i + 1].encode())
            i += 2
            continue
        out.extend(char.encode())
        i += 1
    return out.decode("utf-8", errors="replace")


def _or(terms: Iterable[str]) -> str:
    return "(|" + "".join(terms) + ")"


class LdapStore:
    """Finds people in an LDAP directory by their mail and phone attributes."""

    name = "ldap"
    listable = True

    def __init__(self, config: LdapStoreConfig, server_name: str) -> None:
        self._config = config
        self._server_name = config.server_name or server_name
        # ldap3 sets SO_RCVTIMEO from an integer number of seconds.
        self._timeout = max(1, math.ceil(config.timeout))
        self._person_attributes = list(
            dict.fromkeys(
                [*config.localpart_attributes, *config.mail_attributes, *config.phone_attributes]
            )
        )
        self._conn: Any = None
        # The asyncio lock queues callers without occupying worker threads; the thread lock
        # keeps the connection single-user even when a cancelled caller leaves its thread running.
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()

    async def start(self) -> None:
        """Connect, bind and read ``base_dn``, so a wrong URI, certificate, password or base
        stops start-up."""
        await self._run(self._check_base)

    async def close(self) -> None:
        """Unbind the shared connection."""
        async with self._lock:
            await asyncio.to_thread(self._drop)

    async def find(self, threepids: Sequence[Threepid]) -> dict[Threepid, str]:
        """The Matrix ID of each 3PID some person's mail or phone attribute holds."""
        wanted = [t for t in dict.fromkeys(threepids) if self._filter_terms(t)]
        found: dict[Threepid, str] = {}
        for start in range(0, len(wanted), FIND_CHUNK):
            chunk = wanted[start : start + FIND_CHUNK]
            terms = [term for t in chunk for term in self._filter_terms(t)]
            search_filter = f"(&{self._config.user_filter}{_or(terms)})"
            people = await self._run(
                partial(
                    self._search_all,
                    base=self._config.base_dn,
                    search_filter=search_filter,
                    attributes=self._person_attributes,
                )
            )
            chunk_set = set(chunk)
            # Sorted by DN so that when two people share an address the answer is stable.
            for person in sorted(people, key=lambda p: p.dn):
                mxid = self._mxid(person)
                if mxid is None:
                    continue
                for threepid in self._threepids(person):
                    if threepid in chunk_set and threepid not in found:
                        found[threepid] = mxid
        return found

    async def entries(self) -> AsyncIterator[StoreEntry]:
        """Every mail address and phone number of every person, page by page."""
        conn = await asyncio.to_thread(self._connect)
        try:
            cookie: bytes | None = None
            while True:
                page = partial(
                    self._search_page,
                    conn,
                    self._config.base_dn,
                    self._config.user_filter,
                    self._person_attributes,
                    cookie,
                )
                people, cookie = await asyncio.to_thread(self._guarded, page)
                for person in people:
                    mxid = self._mxid(person)
                    if mxid is None:
                        continue
                    for medium, address in self._threepids(person):
                        yield StoreEntry(medium, address, mxid)
                if not cookie:
                    break
        finally:
            await asyncio.to_thread(self._unbind, conn)

    async def roles(self, mxid: str) -> frozenset[str]:
        """Names of the groups the person is in: from ``group_attribute`` (memberOf) and,
        with ``group_base_dn`` set, from groups naming the person as member/uniqueMember."""
        localpart, _, server = mxid.removeprefix("@").partition(":")
        if not mxid.startswith("@") or server != self._server_name:
            return frozenset()
        if not is_localpart(localpart):
            return frozenset()
        config = self._config
        value = escape_filter_chars(localpart)
        person_filter = (
            f"(&{config.user_filter}"
            f"{_or(f'({attr}={value})' for attr in config.localpart_attributes)})"
        )
        attributes = [*config.localpart_attributes]
        if config.group_attribute:
            attributes.append(config.group_attribute)
        people = await self._run(
            lambda conn: self._search_all(conn, config.base_dn, person_filter, attributes)
        )
        # A match on a later localpart attribute is someone else when an earlier one differs.
        people = [p for p in people if self._localpart(p) == localpart]
        roles: set[str] = set()
        for person in people:
            for group_dn in person.values(config.group_attribute) if config.group_attribute else []:
                role = _role_from_dn(group_dn, config.group_role_attribute)
                if role:
                    roles.add(role)
        if config.group_base_dn and people:
            dns = [escape_filter_chars(p.dn) for p in people]
            group_filter = (
                f"(&{config.group_filter}{_or(f'(member={dn})(uniqueMember={dn})' for dn in dns)})"
            )
            groups = await self._run(
                lambda conn: self._search_all(
                    conn, config.group_base_dn, group_filter, [config.group_role_attribute]
                )
            )
            for group in groups:
                role = _role_from_dn(group.dn, config.group_role_attribute)
                if role is None:
                    role = next(iter(group.values(config.group_role_attribute)), None)
                if role:
                    roles.add(role)
        return frozenset(roles)

    # -- 3PIDs and Matrix IDs ------------------------------------------------------------------

    def _filter_terms(self, threepid: Threepid) -> list[str]:
        """Filter terms matching ``threepid`` in the configured attributes (empty: cannot)."""
        medium, address = threepid
        if medium == "email":
            if parse_email(address) != address:
                return []
            value = escape_filter_chars(address)
            return [f"({attr}={value})" for attr in self._config.mail_attributes]
        if medium == "msisdn":
            if canonical_address("msisdn", address) != address:
                return []
            written = self._phone_spellings(address)
            return [
                f"({attr}={escape_filter_chars(form)})"
                for attr in self._config.phone_attributes
                for form in written
            ]
        return []

    def _phone_spellings(self, digits: str) -> list[str]:
        """Ways a directory may hold the number: OpenLDAP's telephoneNumber matching ignores
        spaces and hyphens, Active Directory's does not, so common layouts are tried too."""
        forms = [f"+{digits}"]
        try:
            number = phonenumbers.parse(f"+{digits}", None)
        except phonenumbers.NumberParseException:
            return forms
        forms.append(
            phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
        )
        region = self._config.default_region
        if region and phonenumbers.region_code_for_number(number) == region:
            national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
            forms.append(national)
            forms.append(re.sub(r"[^0-9]", "", national))
        return list(dict.fromkeys(forms))

    def _canonical_phone(self, value: str) -> str | None:
        value = value.strip()
        if value.startswith("+"):
            return parse_phone_number(self._config.default_region or "ZZ", value)
        if self._config.default_region:
            return parse_phone_number(self._config.default_region, value)
        return None

    def _threepids(self, person: _Person) -> list[Threepid]:
        """The canonical 3PIDs of a person, without repeats."""
        found: dict[Threepid, None] = {}
        for attr in self._config.mail_attributes:
            for value in person.values(attr):
                email = parse_email(value)
                if email is not None:
                    found[("email", email)] = None
        for attr in self._config.phone_attributes:
            for value in person.values(attr):
                msisdn = self._canonical_phone(value)
                if msisdn is not None:
                    found[("msisdn", msisdn)] = None
        return list(found)

    def _localpart(self, person: _Person) -> str | None:
        for attr in self._config.localpart_attributes:
            values = person.values(attr)
            if values:
                return values[0].strip().lower()
        return None

    def _mxid(self, person: _Person) -> str | None:
        localpart = self._localpart(person)
        if localpart is None or not is_localpart(localpart):
            return None
        mxid = f"@{localpart}:{self._server_name}"
        return mxid if len(mxid.encode()) <= 255 else None

    # -- connections (these run in worker threads) ----------------------------------------------

    async def _run(self, operation: Callable[[Any], T]) -> T:
        """Run ``operation`` on the shared connection in a worker thread."""
        async with self._lock:
            return await asyncio.to_thread(self._with_connection, operation)

    def _with_connection(self, operation: Callable[[Any], T]) -> T:
        with self._thread_lock:
            # A connection that has been idle may have been dropped by the server or a
            # firewall; that shows only when it is used, so a reused one gets one retry.
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._connect()
            try:
                return self._guarded(lambda: operation(self._conn))
            except _ConnectionLost as e:
                self._drop_locked()
                if not reused:
                    raise
                log.info("ldap store: %s; reconnecting", e)
            self._conn = self._connect()
            try:
                return self._guarded(lambda: operation(self._conn))
            except _ConnectionLost:
                self._drop_locked()
                raise

    def _guarded(self, operation: Callable[[], T]) -> T:
        """Turn ldap3's exceptions into ``_ConnectionLost`` (communication) or ``StoreError``."""
        try:
            return operation()
        except LDAPException as e:
            if isinstance(e, (LDAPCommunicationError, LDAPResponseTimeoutError)):
                raise _ConnectionLost(
                    f"LDAP server {self._config.uri} stopped answering: {_one_line(str(e))}"
                ) from None
            raise StoreError(f"LDAP operation failed: {_one_line(str(e))}") from None

    def _connect(self) -> Any:
        """A new connection, TLS set up and bound; raises ``StoreError``."""
        config = self._config
        try:
            tls = (
                _VerifyingTls(config.ca_file)
                if config.uri.startswith("ldaps://") or config.start_tls
                else None
            )
        except OSError as e:  # ssl.SSLError too: a file without a PEM certificate
            raise StoreError(f"cannot load ca_file {config.ca_file}: {e.strerror or e}") from None
        try:
            server = Server(
                config.uri,
                connect_timeout=self._timeout,
                get_info=NONE,
                tls=tls,
            )
            conn = Connection(
                server,
                user=config.bind_dn or None,
                password=config.bind_password or None,
                authentication=SIMPLE if config.bind_dn else ANONYMOUS,
                client_strategy=SYNC,
                receive_timeout=self._timeout,
                read_only=True,
                auto_referrals=False,
                raise_exceptions=False,
            )
        except (LDAPException, ValueError) as e:
            raise StoreError(f"LDAP URI {config.uri} unusable: {_one_line(str(e))}") from None
        try:
            conn.open()
            if config.start_tls and not config.uri.startswith("ldaps://") and not conn.start_tls():
                raise StoreError(f"StartTLS with LDAP server {config.uri} failed")
            if not conn.bind():
                result = conn.result or {}
                who = config.bind_dn or "anonymous"
                code = result.get("result")
                why = (
                    "invalid credentials"
                    if code == _INVALID_CREDENTIALS
                    else _one_line(f"{result.get('description')} {result.get('message') or ''}")
                )
                self._unbind(conn)
                raise StoreError(f"LDAP bind as {who} refused ({why})")
        except LDAPException as e:
            self._unbind(conn)
            if tls is not None and (tls.failure or isinstance(e, ssl.SSLError)):
                why = tls.failure or _one_line(str(e))
                raise StoreError(f"TLS with LDAP server {config.uri} failed: {why}") from None
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                raise StoreError(
                    f"LDAP server {config.uri} did not answer within {self._timeout}s"
                ) from None
            raise StoreError(f"LDAP server {config.uri} unreachable: {_one_line(str(e))}") from None
        return conn

    def _drop(self) -> None:
        with self._thread_lock:
            self._drop_locked()

    def _drop_locked(self) -> None:
        if self._conn is not None:
            self._unbind(self._conn)
            self._conn = None

    @staticmethod
    def _unbind(conn: Any) -> None:
        with contextlib.suppress(LDAPException, OSError):
            conn.unbind()
        # ldap3 leaves the socket open when sending the unbind fails on a broken connection.
        sock = getattr(conn, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _search_page(
        self,
        conn: Any,
        base: str,
        search_filter: str,
        attributes: list[str],
        cookie: bytes | None,
    ) -> tuple[list[_Person], bytes | None]:
        """One page of a paged subtree search, and the cookie for the next (None: done)."""
        conn.search(
            base,
            search_filter,
            search_scope=SUBTREE,
            attributes=attributes,
            paged_size=PAGE_SIZE,
            paged_cookie=cookie,
            time_limit=self._timeout,
        )
        result = conn.result or {}
        if result.get("result") != 0:
            description = result.get("description")
            message = _one_line(result.get("message") or "")
            raise StoreError(
                f"LDAP search under {base} failed: {description}"
                + (f" ({message})" if message else "")
            )
        people = []
        for item in conn.response or []:
            if item.get("type") != "searchResEntry":
                continue  # referrals are not followed
            raw: dict[str, list[bytes]] = item.get("raw_attributes") or {}
            attributes_out: dict[str, list[str]] = {}
            for name, values in raw.items():
                key = name.split(";", 1)[0].lower()
                attributes_out.setdefault(key, []).extend(
                    v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                    for v in values
                )
            people.append(_Person(item.get("dn", ""), attributes_out))
        controls = result.get("controls") or {}
        next_cookie = controls.get(_PAGED_RESULTS, {}).get("value", {}).get("cookie")
        return people, next_cookie or None

    def _check_base(self, conn: Any) -> None:
        base = self._config.base_dn
        conn.search(
            base, "(objectClass=*)", search_scope=BASE, attributes=[], time_limit=self._timeout
        )
        result = conn.result or {}
        if result.get("result") != 0:
            raise StoreError(f"LDAP base_dn {base} cannot be read: {result.get('description')}")

    def _search_all(
        self, conn: Any, base: str, search_filter: str, attributes: list[str]
    ) -> list[_Person]:
        """Every result of a paged subtree search."""
        people: list[_Person] = []
        cookie: bytes | None = None
        while True:
            page, cookie = self._search_page(conn, base, search_filter, attributes, cookie)
            people.extend(page)
            if not cookie:
                return people
