"""Canonical forms of 3PIDs (the spec's identifier rules)."""

from __future__ import annotations

import pytest

from appservice.threepid import canonical_address, is_room_id, parse_email


@pytest.mark.parametrize(
    ("address", "canonical"),
    [
        # The spec's own example: the whole address case-folded, the domain lower-cased.
        ("Strauß@Example.com", "strauss@example.com"),
        ("Alice@EXAMPLE.org", "alice@example.org"),
        ("  bob@example.org ", "bob@example.org"),
        # An IDNA2008 domain keeps its ß: straße.de and strasse.de are different domains.
        ("bob@straße.de", "bob@straße.de"),
        ("BOB@STRAẞE.DE", "bob@straße.de"),
        ("ΣΊΣΥΦΟΣ@Ελλάδα.gr", "σίσυφοσ@ελλάδα.gr"),
    ],
)
def test_email_is_case_folded_without_changing_the_domain(address: str, canonical: str) -> None:
    assert parse_email(address) == canonical
    assert canonical_address("email", address) == canonical


def test_email_domain_is_never_case_folded_into_another_domain() -> None:
    folded = parse_email("bob@straße.de")
    assert folded is not None and folded.endswith("@straße.de")
    assert parse_email("bob@strasse.de") != folded


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("!abc:example.org", True),
        ("!" + "A" * 43, True),  # a v12 room ID
        ("!", False),
        ("#alias:example.org", False),
        ("!abc:example.org\r\n", False),
        ("!a b:example.org", False),
        ("!" + "a" * 255, False),
        ("!ä:example.org", False),
    ],
)
def test_room_id_grammar(value: str, valid: bool) -> None:
    assert is_room_id(value) is valid
