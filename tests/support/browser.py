"""Render a page in headless Chromium, driven from the command line (no WebDriver, no downloads).

Debian's ``chromium`` package provides the browser (``scripts/ensure-chromium.sh`` installs
it). One run of ``chromium --headless --screenshot=<png> --dump-dom <url>`` loads the page once,
writes the screenshot and prints the DOM after the load event, so a URL with a side effect (a
validation link consumes its token) is requested exactly once::

    dom = await render_page(str(api.client.make_url("/page")), artifacts_dir / "page.png")
    assert "Welcome" in dom

Chromium gets a new empty profile each time and the flags that keep it off the network (this
machine's network is closed: without them Chromium keeps trying Google's hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

__all__ = ["BrowserError", "chromium_path", "render_page"]

# Where to look when no CHROMIUM environment variable names the binary.
_CANDIDATES = ("chromium", "/usr/bin/chromium", "chromium-browser")

# Headless, no sandbox (tests run as root), and nothing that reaches for the network on its own.
_BASE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--mute-audio",
)

_STDERR_TAIL_LINES = 25


class BrowserError(RuntimeError):
    """Chromium is missing, failed, or took too long."""


def chromium_path() -> str:
    """The Chromium binary: ``$CHROMIUM`` if set, else ``chromium`` on PATH or /usr/bin/chromium.

    Raises :class:`BrowserError` (saying how to install it) when there is none.
    """
    override = os.environ.get("CHROMIUM")
    if override:
        found = shutil.which(override)
        if found is None:
            raise BrowserError(f"CHROMIUM={override!r} is not an executable")
        return found
    for candidate in _CANDIDATES:
        found = shutil.which(candidate)
        if found is not None:
            return found
    raise BrowserError(
        "Chromium is not installed (looked for chromium, /usr/bin/chromium); "
        "run scripts/ensure-chromium.sh"
    )


def _tail(data: bytes, lines: int = _STDERR_TAIL_LINES) -> str:
    """The last lines of a process's output, decoded for an error message."""
    text = data.decode("utf-8", errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """Kill Chromium and its helper processes (it was started in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


async def _run(args: list[str], limit: float) -> tuple[int, bytes, bytes]:
    """Run a command with no stdin; returns (exit code, stdout, stderr).

    Killed (with its process group) after ``limit`` seconds.
    """
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        _kill_group(process)
        _stdout, stderr = await process.communicate()
        raise BrowserError(
            f"Chromium did not finish within {limit:g}s: {' '.join(args)}\n"
            f"stderr (last lines):\n{_tail(stderr)}"
        ) from None
    except BaseException:
        # Cancelled: leave no browser behind.
        _kill_group(process)
        await process.communicate()
        raise
    # Helpers (zygote, renderer) normally exit with the browser; make sure of it.
    _kill_group(process)
    assert process.returncode is not None
    return process.returncode, stdout, stderr


def _prepare_output(screenshot: Path) -> Path:
    """The screenshot's absolute path, its folder created and any old file removed."""
    screenshot = screenshot.resolve()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    return screenshot


async def render_page(
    url: str,
    screenshot: Path,
    *,
    window: tuple[int, int] = (900, 900),
    timeout: float = 60,  # noqa: ASYNC109 (a deadline for the browser process, which is killed)
) -> str:
    """Load ``url`` once in headless Chromium, save a PNG of the window to ``screenshot`` and
    return the DOM (serialized HTML after the page's load event).

    ``window`` is the viewport (width, height) in CSS pixels; ``timeout`` bounds the whole run
    in seconds (Chromium is killed when it runs over). Raises :class:`BrowserError`, with the end
    of Chromium's stderr, when it cannot start, fails, or produces no screenshot or no DOM.
    """
    binary = chromium_path()
    screenshot = _prepare_output(screenshot)
    width, height = window
    with tempfile.TemporaryDirectory(
        prefix="chromium-profile-", ignore_cleanup_errors=True
    ) as profile:
        args = [
            binary,
            *_BASE_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
        ]
        try:
            code, stdout, stderr = await _run(args, limit=timeout)
        except OSError as e:
            raise BrowserError(f"Chromium could not start ({binary}): {e}") from e
    command = " ".join(args)
    if code != 0:
        raise BrowserError(
            f"Chromium exited with {code}: {command}\nstderr (last lines):\n{_tail(stderr)}"
        )
    dom = stdout.decode("utf-8", errors="replace")
    if "<html" not in dom.lower():
        raise BrowserError(
            f"Chromium printed no DOM for {url}: {command}\n"
            f"stdout: {_tail(stdout)}\nstderr (last lines):\n{_tail(stderr)}"
        )
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        raise BrowserError(
            f"Chromium wrote no screenshot to {screenshot}: {command}\n"
            f"stderr (last lines):\n{_tail(stderr)}"
        )
    return dom
