"""Building test configurations from nested dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``: nested mappings are merged, everything else replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_cli_config(tmp_path: Path, database_url: str) -> Path:
    """A minimal config file for the command line: the database and a key file in ``tmp_path``."""
    path = tmp_path / "config.yaml"
    path.write_text(
        f"database: {{url: '{database_url}'}}\n"
        f"keys: {{signing_key_path: '{tmp_path / 'keys' / 'signing.key'}'}}\n"
    )
    return path
