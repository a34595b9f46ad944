"""SIGTERM (what systemd's KillSignal, ``podman stop`` and Kubernetes send) stops the server
cleanly and quickly: exit status 0, no traceback, well within the unit's TimeoutStopSec=30s,
even while a client holds a keep-alive connection open."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STOP_WITHIN = 5.0  # seconds; the unit allows 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_with_an_open_keepalive_connection_exits_0_quickly(tmp_path: Path) -> None:
    port = _free_port()
    config = str(tmp_path / "config.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "appservice", "run", "-c", config, "--listen", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn.request("GET", "/_matrix/identity/v2")
                response = conn.getresponse()
                break
            except OSError:
                conn.close()
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        assert (response.status, response.read()) == (200, b"{}")
        assert response.getheader("Connection", "keep-alive").lower() != "close"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=STOP_WITHIN + 10)
        took = time.monotonic() - started
    finally:
        conn.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    assert took < STOP_WITHIN, f"stopping took {took:.1f} s"
