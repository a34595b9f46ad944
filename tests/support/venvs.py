"""Cached virtual environments for the real servers that tests and benchmarks run beside ours
(Synapse, sydent): made once from PyPI, reused while a marker says the install is complete."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

PIP_INSTALL_TIMEOUT = 1800.0
"""Seconds that creating a venv and installing into it may take, at most."""


def venv_python(venv: Path) -> Path:
    """The interpreter of ``venv``."""
    return venv / "bin" / "python"


def run_checked(cmd: list[str], what: str, timeout: float, error: type[Exception]) -> None:
    """Run ``cmd``; raise ``error`` naming ``what`` (with the end of its output) if it fails."""
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what} timed out after {timeout:.0f} s: {cmd}") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise error(f"{what} failed (exit {result.returncode}): {cmd}\n{output}")


def _venv_is_usable(venv: Path) -> bool:
    python = venv_python(venv)
    if not python.exists():
        return False
    try:
        result = subprocess.run(
            [str(python), "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == str(tuple(sys.version_info[:2]))


def ensure_venv(
    venv: Path,
    requirements: Sequence[str],
    *,
    marker_name: str,
    what: str,
    error: type[Exception],
    timeout: float = PIP_INSTALL_TIMEOUT,
) -> Path:
    """Install ``requirements`` into the virtual environment ``venv`` once; its resolved path.

    The venv is made with the Python running this function. A marker file in it records a
    finished install of exactly these requirements for this Python, so a later call returns at
    once; an exclusive file lock next to the venv keeps concurrent callers (test workers, a
    benchmark) from installing twice.

    Raises:
        error: if the venv cannot be created or pip fails (``what`` names the install).
    """
    venv = venv.resolve()
    marker = venv / marker_name
    expected = "".join(f"{r}\n" for r in requirements)
    expected += f"python={sys.version_info[0]}.{sys.version_info[1]}\n"
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.parent / f"{venv.name}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if marker.exists() and marker.read_text() == expected and _venv_is_usable(venv):
                return venv
            marker.unlink(missing_ok=True)
            if not _venv_is_usable(venv):
                run_checked(
                    [sys.executable, "-m", "venv", "--clear", str(venv)],
                    f"creating the {what} venv",
                    300,
                    error,
                )
            pip = [str(venv_python(venv)), "-m", "pip", "install"]
            run_checked(
                [*pip, "--disable-pip-version-check", "--no-input", *requirements],
                f"pip install {' '.join(requirements)}",
                timeout,
                error,
            )
            marker.write_text(expected)
            return venv
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
