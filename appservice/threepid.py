"""3PIDs and identifiers: canonical forms (emails case-folded, MSISDNs as E.164 digits without
``+``) and the grammars of client-chosen identifiers."""

from __future__ import annotations

import re

MEDIUMS = ("email", "msisdn")

_MSISDN = re.compile(r"^[1-9][0-9]{4,14}$")
# client_secret, sid, store-invite tokens: ^[0-9a-zA-Z.=_-]{1,255}$ (spec).
_OPAQUE_ID = re.compile(r"^[0-9a-zA-Z.=_-]{1,255}$")
# The localpart of a new Matrix user ID (spec v1.8+, which also allows "+").
_LOCALPART = re.compile(r"[a-z0-9._=/+-]+")
_EMAIL_LOCAL_FORBIDDEN = set(' \t\r\n<>()[]\\,;:"@')
_DOMAIN_LABEL = re.compile(r"^[^\W_](?:[\w-]{0,61}[^\W_])?$")
# Synapse accepts addresses up to 500 characters and forwards them, so we do too.
MAX_EMAIL_LENGTH = 500


# The common shape, ASCII and already canonical (lower case, dot-atoms, LDH labels): it is its
# own canonical form. A shortcut for imports of a million addresses; anything else takes the
# general path of parse_email, which gives the same answer for these.
_CANONICAL_ASCII_EMAIL = re.compile(
    r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)


def parse_email(address: str) -> str | None:
    """The canonical form of a plain ``local@domain`` address, else None.

    The spec's rule: case-fold the address (Unicode caseless matching) and lower-case the
    domain. The domain is only lower-cased, not case-folded: folding turns ``straße.de`` into
    ``strasse.de``, which under IDNA2008 is another domain, someone else's.
    """
    if len(address) <= MAX_EMAIL_LENGTH and _CANONICAL_ASCII_EMAIL.fullmatch(address):
        return address
    return _parse_email(address)


def _parse_email(address: str) -> str | None:
    """:func:`parse_email` for any address."""
    address = address.strip()
    if not address or len(address) > MAX_EMAIL_LENGTH or address.count("@") != 1:
        return None
    local, domain = address.split("@")
    if not local or any(c in _EMAIL_LOCAL_FORBIDDEN or not c.isprintable() for c in local):
        return None
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return None
    labels = domain.split(".")
    if not all(_DOMAIN_LABEL.match(label) for label in labels):
        return None
    return f"{local.casefold()}@{domain.lower()}"


def parse_phone_number(country: str, phone_number: str) -> str | None:
    """E.164 digits (no ``+``) of a number dialled from ``country`` (ISO 3166-1 alpha-2)."""
    if not re.fullmatch(r"[A-Z]{2}", country) or len(phone_number) > 64:
        return None
    import phonenumbers  # at the first phone number, not at start-up (50 ms of imports)

    try:
        parsed = phonenumbers.parse(phone_number, country)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164).lstrip("+")


def canonical_address(medium: str, address: str) -> str | None:
    """The canonical form of ``address`` for ``medium``, or None when it cannot be one."""
    if medium == "email":
        return parse_email(address)
    if medium == "msisdn":
        digits = address.strip().removeprefix("+")
        return digits if _MSISDN.match(digits) else None
    return None


def is_opaque_id(value: str) -> bool:
    """Whether ``value`` fits the grammar of ``client_secret``, ``sid`` and invite tokens."""
    # fullmatch: "$" alone would let a trailing newline through.
    return bool(_OPAQUE_ID.fullmatch(value))


def is_localpart(value: str) -> bool:
    """Whether ``value`` is a valid localpart for a new Matrix user ID."""
    return bool(_LOCALPART.fullmatch(value))


def user_id_server(user_id: str) -> str | None:
    """The server name of a Matrix user ID with a valid grammar, else None."""
    if len(user_id.encode()) > 255 or not user_id.startswith("@"):
        return None
    localpart, sep, server = user_id[1:].partition(":")
    # Historical localparts (printable ASCII) still exist, so only the sigil and ':' are checked.
    if not sep or not server or not _visible_ascii(localpart):
        return None
    return server


def is_room_id(value: str) -> bool:
    """Whether ``value`` is a room ID: ``!`` then printable ASCII without spaces, at most 255
    bytes (v12 IDs have no ``:server`` part, so only the sigil, length and characters are
    checked). It is sent on to homeservers, so no control character may pass."""
    return len(value) <= 255 and value.startswith("!") and len(value) > 1 and _visible_ascii(value)


def _visible_ascii(value: str) -> bool:
    """Whether ``value`` is non-empty and only ``!`` to ``~`` (printable ASCII but space)."""
    return value.isascii() and value.isprintable() and " " not in value and value != ""
