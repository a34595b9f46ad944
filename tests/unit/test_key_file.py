"""The signing key file: created once, exclusively, even when several instances start together."""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appservice.crypto.signing import KeyFileError, KeyRing, PublicKey

INSTANCES = 8


def _create_at_once(path: Path) -> list[PublicKey]:
    """``INSTANCES`` threads loading (or creating) the key file at the same moment."""
    barrier = threading.Barrier(INSTANCES)

    def start() -> PublicKey:
        barrier.wait()
        return KeyRing.load_or_create(path).current

    with ThreadPoolExecutor(INSTANCES) as pool:
        futures = [pool.submit(start) for _ in range(INSTANCES)]
        return [future.result() for future in futures]


def test_instances_starting_together_all_end_with_the_one_key_written(tmp_path: Path) -> None:
    for attempt in range(20):
        path = tmp_path / str(attempt) / "signing.key"
        keys = _create_at_once(path)
        assert len(set(keys)) == 1, keys
        assert keys[0].key_id == "ed25519:0"
        assert KeyRing.load_or_create(path).current == keys[0]
        # No temporary file is left beside it.
        assert [p.name for p in path.parent.iterdir()] == ["signing.key"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_new_key_file_is_0600_in_a_new_0700_directory(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "keys" / "signing.key"
        KeyRing.load_or_create(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_an_existing_key_file_is_read_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    first = KeyRing.load_or_create(path).current
    assert KeyRing.load_or_create(path).current == first


def test_a_ring_that_was_not_loaded_does_not_sign(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "signing.key")
    assert not ring.exists()
    with pytest.raises(KeyFileError, match="was not loaded"):
        ring.sign({"a": 1}, "id.test")
    with pytest.raises(KeyFileError, match="no signing key file at"):
        ring.load()
    assert list(tmp_path.iterdir()) == []


def test_generate_takes_the_next_id_after_the_file_and_the_published_ids(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path / "signing.key")
    assert ring.generate().public.key_id == "ed25519:1"
    assert ring.generate(["ed25519:0", "ed25519:4", "ed25519:auto"]).public.key_id == "ed25519:5"
