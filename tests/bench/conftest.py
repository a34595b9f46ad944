"""The ``bench`` marker: the benchmark's smoke test (runs in the normal suite)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker (unknown markers are errors under ``filterwarnings = error``)."""
    config.addinivalue_line(
        "markers",
        "bench: bench/run.py's smoke test and its SMTP sink's tests (deselect with -m 'not bench')",
    )
