"""`intermail bench smtp --json` keeps the benchmark contract of ARCHITECTURE.md.

A smoke run (tiny durations): the figures mean nothing here, only the shape,
that every message on both sides was answered 250 and delivered into the
store, and that nothing is left behind (files, Postfix or our processes).
CI installs Postfix (.ci/run), so there the baseline must be measured;
elsewhere a missing Postfix must be reported as a null baseline with a note.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def _bench_leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("bench-smtp-*")}


def _bench_processes() -> list[str]:
    """Processes started by a bench: named after its directory, or working in it (Postfix's daemons)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if "bench-smtp-" in cmdline or "bench-smtp-" in cwd:
            found.append(f"{proc.name}: {cmdline} (in {cwd})")
    return found


def test_bench_smtp_json_contract(tmp_path):
    before = _bench_leftovers()
    out = subprocess.run(
        [sys.executable, "-m", "intermail", "bench", "smtp", "--json", "--seconds", "0.3", "--sessions", "4",
         "--messages", "60", "--users", "3", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=280, check=True,
    )
    report = json.loads(out.stdout)
    assert report["bench"] == "smtp"
    assert set(report["host"]) >= {"cpus", "python", "platform"}
    assert any("fsync = true" in note and "2 mirrors" in note for note in report["notes"])
    assert not [n for n in report["notes"] if "failed" in n or "not delivered" in n or "holds" in n], report["notes"]
    accept, end_to_end = report["results"]
    assert accept["case"] == "smtp accept sessions=4 size=10KiB" and accept["metric"] == "accepted/s"
    assert end_to_end["case"] == "smtp end-to-end sessions=4 size=10KiB" and end_to_end["metric"] == "delivered/s"
    assert end_to_end["params"]["messages"] == 60
    stored = end_to_end["details"]["stored_in_mss"]
    assert stored["messages"] == stored["expected"] > 0
    assert end_to_end["details"]["ours"]["delivered"] == 60
    for case in (accept, end_to_end):
        assert set(case) >= {"case", "params", "metric", "ours", "baseline", "baseline_name", "ratio"}
        assert {k: case["params"][k] for k in ("sessions", "size", "recipients", "users", "mirrors", "fsync")} == \
            {"sessions": 4, "size": 10240, "recipients": 1, "users": 3, "mirrors": 2, "fsync": True}
        assert case["ours"] > 0
        assert case["errors"]["ours"] == 0, case["details"]["ours"]["error_samples"]
        assert case["details"]["ours"]["accepted"] > 0
        if case["baseline"] is None:
            assert not os.environ.get("CI"), f"CI installs postfix, yet: {case.get('note')}"
            assert case["ratio"] is None and "baseline unavailable" in case["note"]
            continue
        assert case["baseline_name"].startswith("postfix 3.")
        assert case["baseline"] > 0
        assert case["errors"]["baseline"] == 0, case["details"]["baseline"]["error_samples"]
        assert abs(case["ratio"] - case["ours"] / case["baseline"]) < 0.01 * max(1.0, case["ratio"])
    if end_to_end["baseline"] is not None:
        assert end_to_end["details"]["baseline"]["delivered"] == 60
        sink = end_to_end["details"]["baseline_to_sink"]
        assert sink["errors"] == 0 and sink["delivered"] == 60, sink["error_samples"]
    assert list(tmp_path.iterdir()) == []  # the bench cleans up after itself
    assert _bench_leftovers() <= before
    assert _bench_processes() == []
