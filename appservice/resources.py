"""Files shipped beside the package in the source tree: migrations and the example config."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = PROJECT_ROOT / "config.example.yaml"
