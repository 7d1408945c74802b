"""`intermail bench directory --json` keeps the benchmark contract of ARCHITECTURE.md.

A smoke run (tiny durations, cheap hashing): the figures mean nothing here, only the shape.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)


def test_bench_directory_json_contract(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "intermail", "bench", "directory", "--json", "--seconds", "0.3",
         "--concurrency", "1,4", "--users", "3", "--time-cost", "1", "--memory-kib", "8", "--parallelism", "1",
         "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=150, check=True,
    )
    report = json.loads(out.stdout)
    assert report["bench"] == "directory"
    assert set(report["host"]) >= {"cpus", "python", "platform"}
    cases = report["results"]
    assert [c["metric"] for c in cases] == ["lookups/s", "lookups/s", "logins/s"]
    assert [c["params"]["concurrency"] for c in cases[:2]] == [1, 4]
    assert cases[2]["params"]["memory_kib"] == 8
    for case in cases:
        assert set(case) >= {"case", "params", "metric", "ours", "baseline", "baseline_name", "ratio"}
        assert case["ours"] > 0 and case["baseline"] > 0
        assert abs(case["ratio"] - case["ours"] / case["baseline"]) < 0.01 * max(1.0, case["ratio"])
    assert list(tmp_path.iterdir()) == []  # the bench cleans up after itself
