"""Canonical forms of 3PIDs (the spec's identifier rules)."""

from __future__ import annotations

import hypothesis
import pytest

from appservice import threepid
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


_EMAIL_ALPHABET = "abcXYZ019.-_+!#'@ \tß\u00e9\u0130Kk\u212a\u00df\"(),;:<>[]\\"


@hypothesis.settings(max_examples=3000, deadline=None, derandomize=True)
@hypothesis.given(
    hypothesis.strategies.one_of(
        hypothesis.strategies.text(_EMAIL_ALPHABET, max_size=40),
        hypothesis.strategies.from_regex(r"[a-z0-9.+_-]{1,12}@[a-z0-9.-]{1,20}", fullmatch=True),
        hypothesis.strategies.from_regex(
            r"[a-zA-Z0-9.+_-]{1,12}@[a-zA-Z0-9-]{1,63}\.[a-z]{2,5}", fullmatch=True
        ),
    )
)
def test_the_canonical_ascii_shortcut_agrees_with_the_general_rules(address: str) -> None:
    """parse_email's shortcut for canonical ASCII addresses gives what the general path gives."""
    assert threepid.parse_email(address) == threepid._parse_email(address)


@hypothesis.settings(max_examples=2000, deadline=None, derandomize=True)
@hypothesis.given(hypothesis.strategies.text("@:!~ a\u007f\u00e9\x00xZ", max_size=12))
def test_visible_ascii_is_bang_to_tilde(value: str) -> None:
    assert threepid._visible_ascii(value) == (value != "" and all("!" <= c <= "~" for c in value))
