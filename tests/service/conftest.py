"""The service as an operator installs it: the systemd unit, contrib/install.sh in a fresh Debian
root file system, the container image. Marked ``service``; scripts/test.sh installs the tools
(scripts/ensure-systemd-analyze.sh, ensure-debootstrap.sh, ensure-podman.sh)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "service: the installed service (systemd unit, install script in a Debian chroot,"
        " container image); needs root for chroot and podman",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.service)
