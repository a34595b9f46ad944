"""``bench/run.py --quick`` runs end to end and prints the table of issue 6."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[2]
EXPECTED_REQUESTS = (
    "lookup 1",
    "lookup 100",
    "lookup 1000",
    "hash_details",
    "store-invite",
    "requestToken",
)


def _table_rows(report: str, server: str) -> dict[tuple[str, str], list[str]]:
    """Rows of the requests table for ``server``, keyed by (request, concurrency)."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 18 and cells[2] == server:
            rows[(cells[3], cells[4])] = cells
    return rows


def test_quick_bench_prints_every_row_and_delivers_every_mail(tmp_path: Path) -> None:
    output = tmp_path / "latest.md"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--quick",
            "--output",
            str(output),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    assert output.read_text().strip() == report.strip()
    assert "## Processes" in report and "## Targets of issue 6" in report

    ours = _table_rows(report, "ours")
    for request in EXPECTED_REQUESTS:
        for concurrency in ("1", "32"):
            row = ours[(request, concurrency)]
            assert float(row[5].replace(",", "")) > 0, row  # requests/s
    for request in ("store-invite", "requestToken"):
        for concurrency in ("1", "32"):
            delivered, ok = ours[(request, concurrency)][14].split("/")
            assert delivered == ok != "0", (request, concurrency, delivered, ok)
            assert float(ours[(request, concurrency)][15]) > 0  # sink CPU ms/mail

    limit = _table_rows(report, "limit")
    assert {request for request, _ in limit} == {"lookup 1", "lookup 100", "lookup 1000"}
    processes = [
        cells
        for line in report.splitlines()
        if len(cells := [c.strip() for c in line.strip().strip("|").split("|")]) == 7
        and cells[2] == "ours"
    ]
    assert len(processes) == 1, report
    assert float(processes[0][3]) > 0  # start-up seconds
