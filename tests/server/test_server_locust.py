"""bench/locustfile.py runs headless against the live server for a few seconds without a failure."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def test_locustfile_runs_clean(live_server: Any, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--host", live_server.url,
           "--headless", "-u", "2", "-r", "2", "-t", "6s", "--stop-timeout", "60", "--csv", str(tmp_path / "run"),
           "--only-summary", "--exit-code-on-error", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, total


def test_locustfile_refuses_remote_hosts(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"),
           "--host", "http://example.com", "--headless", "-u", "1", "-t", "2s"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0
    assert "not a loopback address" in r.stdout + r.stderr
