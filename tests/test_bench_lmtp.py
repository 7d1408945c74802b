"""`intermail bench lmtp --json` keeps the benchmark contract of ARCHITECTURE.md.

A smoke run (tiny durations): the figures mean nothing here, only the shape,
that every delivery on both sides was answered 250, and that nothing is left
behind (files or Dovecot processes).  CI installs Dovecot's LMTP (.ci/run),
so there the baseline must be measured; elsewhere a missing Dovecot must be
reported as a null baseline with a note.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from intermail.testing.procs import processes

pytestmark = pytest.mark.timeout(240)


def _bench_leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("bench-lmtp-*")}


def _bench_processes() -> list[str]:
    return processes(lambda cmdline: "bench-lmtp-" in cmdline or "intermail-bench-" in cmdline)


def test_bench_lmtp_json_contract(tmp_path):
    before = _bench_leftovers()
    out = subprocess.run(
        [sys.executable, "-m", "intermail", "bench", "lmtp", "--json", "--seconds", "0.3",
         "--concurrency", "1,4", "--users", "3", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=200, check=True,
    )
    report = json.loads(out.stdout)
    assert report["bench"] == "lmtp"
    assert set(report["host"]) >= {"cpus", "python", "platform"}
    assert any("fsync = true" in note and "2 mirrors" in note for note in report["notes"])
    assert not [note for note in report["notes"] if "first deliveries failed" in note]
    cases = report["results"]
    assert [c["params"]["concurrency"] for c in cases] == [1, 4]
    assert [c["case"] for c in cases] == ["lmtp conc=1 size=10KiB", "lmtp conc=4 size=10KiB"]
    for case in cases:
        assert set(case) >= {"case", "params", "metric", "ours", "baseline", "baseline_name", "ratio"}
        assert case["metric"] == "deliveries/s"
        assert case["params"] == {"concurrency": case["params"]["concurrency"], "size": 10240, "mirrors": 2,
                                  "fsync": True, "recipients": 1}
        assert case["ours"] > 0
        assert case["errors"]["ours"] == 0, case["details"]["ours"]["error_samples"]
        assert case["details"]["ours"]["delivered"] > 0
        if case["baseline"] is None:
            assert not os.environ.get("CI"), f"CI installs dovecot-lmtpd, yet: {case.get('note')}"
            assert case["ratio"] is None and "baseline unavailable" in case["note"]
            continue
        assert case["baseline_name"].startswith("dovecot 2.") and case["baseline_name"].endswith(" lmtp sdbox")
        assert case["baseline"] > 0
        assert case["errors"]["baseline"] == 0, case["details"]["baseline"]["error_samples"]
        assert abs(case["ratio"] - case["ours"] / case["baseline"]) < 0.01 * max(1.0, case["ratio"])
    assert list(tmp_path.iterdir()) == []  # the bench cleans up after itself
    assert _bench_leftovers() <= before
    assert _bench_processes() == []
