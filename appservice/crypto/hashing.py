"""Lookup hashes (spec: sha256 of ``"<address> <medium> <pepper>"``, URL-safe unpadded base64)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import string

_PEPPER_ALPHABET = string.ascii_letters + string.digits


def lookup_hash(address: str, medium: str, pepper: str) -> str:
    """The sha256 lookup hash of a canonical 3PID with ``pepper``."""
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pepper(length: int = 32) -> str:
    """A random alphanumeric pepper (MSC2134: ``[a-zA-Z0-9]+``)."""
    return "".join(secrets.choice(_PEPPER_ALPHABET) for _ in range(length))


def token_hash(token: str) -> str:
    """How access tokens are stored: hex SHA-256, so a database leak reveals no token."""
    return hashlib.sha256(token.encode()).hexdigest()
