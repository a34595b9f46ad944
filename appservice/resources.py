"""Files shipped with the package: the migrations and the example config.

The repository keeps them at its top level (``migrations/``, ``config.example.yaml``); the build
(setup.py) copies them into the package, where importlib.resources finds them in an installed
wheel or sdist. Run from a source checkout (or an editable install) they are read from the top
of the tree.
"""

from __future__ import annotations

from importlib import metadata
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def shipped(name: str) -> Traversable:
    """The shipped file or directory ``name``: inside the installed package, else in the tree."""
    packaged = files(__package__ or "appservice").joinpath(name)
    if packaged.is_file() or packaged.is_dir():
        return packaged
    return SOURCE_ROOT / name


EXAMPLE_CONFIG = shipped("config.example.yaml")
MIGRATIONS = shipped("migrations")


def package_version() -> str:
    """The installed distribution's version; from a source tree that is not installed,
    ``appservice.__version__`` (which the build also reads) marked as such."""
    try:
        return metadata.version("matrix-identity-appservice")
    except metadata.PackageNotFoundError:
        from appservice import __version__

        return f"{__version__} (source tree, not installed)"
