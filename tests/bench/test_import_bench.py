"""``bench/import.py --rows N`` builds a sydent database, imports it into both of our databases
and prints its table."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[2]
ROWS = 2_000


def _table(report: str) -> dict[str, list[str]]:
    """The table's rows by backend."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("sqlite", "postgres", "read_sydent only"):
            rows[cells[0]] = cells
    return rows


def test_quick_import_bench(tmp_path: Path) -> None:
    output = tmp_path / "import.md"
    cache = tmp_path / "cache"
    command = [
        sys.executable,
        str(REPO / "bench" / "import.py"),
        "--rows",
        str(ROWS),
        "--invites",
        "30",
        "--cache-dir",
        str(cache),
        "--output",
        str(output),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert output.read_text().strip() == result.stdout.strip()

    # 2 of every 100 associations are unbound or expired; the others are imported, with the
    # pending invites, and the second run changes nothing (the bench checks both).
    expected = ROWS * 98 // 100
    rows = _table(result.stdout)
    assert set(rows) == {"sqlite", "postgres", "read_sydent only"}, result.stdout
    for backend in ("sqlite", "postgres"):
        _, count, seconds, per_s, rss, rerun, after = rows[backend]
        assert int(count.replace(",", "")) == expected
        assert float(seconds) > 0 and float(rerun) > 0
        assert float(per_s.replace(",", "")) > 0
        assert float(rss) > 0
        assert after == f"{expected:,} + 30"
    assert int(rows["read_sydent only"][1].replace(",", "")) == expected

    # The dataset is cached, shaped like sydent's: both association tables, invites.
    [dataset] = [p for p in cache.iterdir() if p.name.startswith("sydent-import-")]
    conn = sqlite3.connect(dataset / "sydent.db")
    try:
        (local,) = conn.execute("SELECT count(*) FROM local_threepid_associations").fetchone()
        (pending,) = conn.execute(
            "SELECT count(*) FROM invite_tokens WHERE sent_ts IS NULL"
        ).fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    assert (local, pending, version) == (ROWS * 90 // 100, 30, 5)
