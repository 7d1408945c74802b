"""`intermail bench storage --json` keeps the benchmark contract of ARCHITECTURE.md.

A smoke run (tiny durations): the figures mean nothing here, only the shape.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_storage_json_contract(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "intermail", "bench", "storage", "--json", "--seconds", "0.2",
         "--writers", "1,4", "--mirrors", "1", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    report = json.loads(out.stdout)
    assert report["bench"] == "storage"
    assert set(report["host"]) >= {"cpus", "python", "platform"}
    cases = report["results"]
    assert [c["params"].get("writers") for c in cases[:2]] == [1, 4]
    for case in cases:
        assert set(case) >= {"case", "params", "metric", "ours", "baseline", "baseline_name", "ratio"}
        assert case["ours"] > 0 and case["baseline"] > 0
        assert abs(case["ratio"] - case["ours"] / case["baseline"]) < 0.01 * max(1.0, case["ratio"])
    assert cases[-1]["metric"] == "frames/s" and cases[-1]["params"]["frames"] > 0
    assert list(tmp_path.iterdir()) == []  # the bench cleans up after itself
