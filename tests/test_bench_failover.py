"""`intermail bench failover --json` keeps the benchmark contract of ARCHITECTURE.md and loses nothing.

A smoke run (2 trials with the monitor's take-over, 1 with a direct one):
the figures mean little here, only the shape (``"metric": "s"`` with
``median``, ``p99``, ``lost``, ``doubled``), that every trial was served
again, that every acknowledged delivery is stored exactly once although
the store was killed under load, and that nothing is left behind (files or
processes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from intermail.admin.bench_failover import quantile
from intermail.testing.procs import processes

pytestmark = pytest.mark.timeout(300)


def _leftovers(base: Path) -> list[str]:
    found = [p.name for p in base.glob("bench-failover-*")]
    return found + processes(lambda cmdline: str(base) in cmdline and "bench-failover-" in cmdline)


def test_nearest_rank_p99_of_few_trials_is_the_largest():
    assert quantile([0.3, 0.1, 0.2], 0.99) == 0.3
    assert quantile([float(i) for i in range(1, 201)], 0.99) == 198.0
    assert quantile([], 0.5) is None


def test_bench_failover_json_smoke(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "intermail", "bench", "failover", "--json", "--trials", "2", "--baseline-trials", "1",
         "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["bench"] == "failover"
    assert set(report["host"]) >= {"cpus", "platform", "python"}
    assert [r["case"] for r in report["results"]] == ["kill to LMTP 250", "kill to IMAP FETCH"]
    for result in report["results"]:
        assert result["metric"] == "s"
        assert set(result) >= {"case", "params", "metric", "ours", "baseline", "baseline_name", "ratio",
                               "median", "p99", "max", "trials", "lost", "doubled", "bye", "target"}
        assert result["trials"] == 2 and result["failed_trials"] == 0, report["notes"]
        assert result["lost"] == 0 and result["doubled"] == 0, report["deliveries"]
        assert result["bye"] == 0, report["notes"]  # a pause, never a BYE
        assert result["ours"] == result["median"] and 0 < result["median"] <= result["p99"] <= result["max"] < 30
        assert result["baseline"] is not None and result["baseline"] > 0
        assert result["ratio"] == pytest.approx(result["ours"] / result["baseline"], rel=0.01)
        assert result["params"]["interval"] == 0.1 and result["params"]["down_after"] == 3
        assert result["target"] == {"median": 1.0, "p99": 2.0}
    deliveries = report["deliveries"]
    assert deliveries["acknowledged"] > 0 and deliveries["stored"] == deliveries["acknowledged"]
    assert deliveries["unacked_stored"] == [] and deliveries["refused"] == 0
    trials = report["trials"]
    assert [t["phase"] for t in trials] == ["baseline", "monitor", "monitor"]  # alternating
    # the identity flips between the two instances: each kill hits the previous trial's successor
    assert [t["killed"] for t in trials] == ["mss1", "mss1b", "mss1"]
    assert all(t["took_over"] != t["killed"] for t in trials)
    assert not _leftovers(tmp_path)
