"""Canonical forms of 3PIDs (spec: emails case-folded, MSISDNs as E.164 digits without +)."""

from __future__ import annotations

import re

MEDIUMS = ("email", "msisdn")

_MSISDN = re.compile(r"^[1-9][0-9]{4,14}$")


def canonical_address(medium: str, address: str) -> str | None:
    """The canonical form of ``address`` for ``medium``, or None when it cannot be one."""
    if medium == "email":
        address = address.strip()
        if address.count("@") != 1 or any(c.isspace() for c in address):
            return None
        local, domain = address.split("@")
        if not local or not domain:
            return None
        return address.casefold()
    if medium == "msisdn":
        digits = address.strip().removeprefix("+")
        return digits if _MSISDN.match(digits) else None
    return None


def obfuscate_email(address: str) -> str:
    """A display form that does not reveal the address: ``a…@e…``."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}…@{domain[:1]}…" if domain else f"{local[:1]}…"
