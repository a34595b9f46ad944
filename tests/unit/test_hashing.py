"""Lookup hashes against the spec's own examples (identity service API, v2 lookup)."""

from __future__ import annotations

import pytest

from appservice.crypto.hashing import lookup_hash, new_pepper


@pytest.mark.parametrize(
    ("address", "medium", "expected"),
    [
        ("alice@example.com", "email", "4kenr7N9drpCJ4AfalmlGQVsOn3o2RHjkADUpXJWZUc"),
        ("bob@example.com", "email", "LJwSazmv46n0hlMlsb_iYxI0_HXEqy_yj6Jm636cdT8"),
        ("18005552067", "msisdn", "nlo35_T5fzSGZzJApqu8lgIudJvmOQtDaHtr-I4rU7I"),
    ],
)
def test_lookup_hash_matches_the_spec_examples(address: str, medium: str, expected: str) -> None:
    assert lookup_hash(address, medium, "matrixrocks") == expected


def test_new_pepper_is_alphanumeric_and_random() -> None:
    peppers = {new_pepper() for _ in range(20)}
    assert len(peppers) == 20
    assert all(len(p) == 32 and p.isascii() and p.isalnum() for p in peppers)
