"""``intermail load`` against a real cluster started with ``intermail up``, and its pure parts.

The cluster is the embedded topology moved to addresses of its own
(127.0.21n.k instead of 127.0.n.k: ``tests/test_up.py`` uses the embedded
addresses and ports), with cheap password hashes and short queue retries,
started with ``intermail up --config F --data D --detach`` once for the
module and stopped with ``intermail down``.

- mixed load with ``--verify --plot --json``: 0 lost, 0 doubled, a latency
  row per command, a PNG;
- SMTP load with ``--verify`` while ``intermail kill mss1`` makes the
  monitor hand the store to its spare: still 0 lost, 0 doubled.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time

import pytest

from intermail.admin import load, load_report
from intermail.admin.up import EMBEDDED_TOPOLOGY

pytestmark = pytest.mark.timeout(300)

SETTINGS = """
[directory]   # cheap hashes: the load logs in all the time
hash_time_cost = 1
hash_memory_kib = 8
hash_parallelism = 1

[queue]       # a delivery that failed during the take-over is retried soon
retry_base = 0.5
retry_max = 2.0
connect_timeout = 2.0

"""


def topology() -> str:
    """The embedded topology on 127.0.21n.k, with the settings above."""
    moved = re.sub(r'"127\.0\.(\d)\.(\d+)"', lambda m: f'"127.0.21{m.group(1)}.{m.group(2)}"', EMBEDDED_TOPOLOGY)
    assert "127.0.1." not in moved and "127.0.213.1" in moved
    return moved.replace("[tls]", SETTINGS + "[tls]", 1)


def intermail(data, *argv: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "intermail", *argv, "--data", str(data)], check=False,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, (argv, done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    return done


def busy(address: tuple[str, int]) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(address) == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if busy(("127.0.213.1", 2525)):
        pytest.skip("a cluster on 127.0.21n.k is already running on this machine")
    base = tmp_path_factory.mktemp("load")
    config = base / "topology.toml"
    config.write_text(topology())
    data = base / "data"
    intermail(data, "up", "--config", str(config), "--detach")
    try:
        yield data
    finally:
        subprocess.run([sys.executable, "-m", "intermail", "down", "--data", str(data)], check=False,
                       capture_output=True, timeout=120)


def test_mixed_load_with_verify_and_plot(cluster, tmp_path):
    plot = tmp_path / "out.png"
    done = intermail(cluster, "load", "mixed", "--verify", "--duration", "5", "--concurrency", "6", "--users", "5",
                     "--plot", str(plot), "--json")
    report = json.loads(done.stdout)
    verdict = report["verify"]
    assert verdict["lost"] == 0 and verdict["doubled"] == 0, verdict
    assert verdict["accepted"] > 20 and verdict["found"] == verdict["accepted"], verdict
    assert {"smtp", "imap", "pop3"} <= set(report["transactions"]), report["transactions"]
    assert all(t["ok"] > 0 for t in report["transactions"].values()), report["transactions"]
    for row in ("smtp MAIL", "smtp end of data", "smtp message", "imap LOGIN", "imap FETCH BODY[]",
                "imap session", "pop3 RETR", "pop3 session"):
        figures = report["latency_ms"][row]
        assert figures["count"] > 0 and figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"], row
    assert report["accounts_created"] == 5
    assert report["timeline"] and report["timeline"][0]["t"] == 0
    # the text report went to stderr: the latency table and the verdict
    assert re.search(r"command\s+count\s+p50 ms\s+p90 ms\s+p99 ms\s+max ms", done.stderr)
    assert "lost 0 doubled 0" in done.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_smtp_load_survives_the_store_takeover(cluster):
    """Kill the active store mid-run: the spare takes over; every 250 arrives exactly once."""
    run = subprocess.Popen([sys.executable, "-m", "intermail", "load", "smtp", "--verify", "--duration", "8",
                            "--concurrency", "8", "--users", "5", "--verify-timeout", "120", "--json",
                            "--data", str(cluster)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.5)  # well into the load (accounts exist: the first test made them)
        intermail(cluster, "kill", "mss1")
        stdout, stderr = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, (stdout[-2000:], stderr[-3000:])
    report = json.loads(stdout)
    verdict = report["verify"]
    assert verdict["lost"] == 0 and verdict["doubled"] == 0, verdict
    assert verdict["accepted"] > 100, verdict
    assert "lost 0 doubled 0" in stderr
    status = json.loads(intermail(cluster, "status", "--json").stdout)
    assert status["takeovers"] and status["takeovers"][-1]["by"] == "mss1b", status["takeovers"]


# -- the pure parts -----------------------------------------------------------------------


def test_mix_and_schedule_order():
    assert load.parse_mix("smtp=2,imap=1,pop3=1") == {"smtp": 2, "imap": 1, "pop3": 1}
    assert load.parse_mix("smtp=1,imap=0") == {"smtp": 1}
    with pytest.raises(argparse.ArgumentTypeError):
        load.parse_mix("ftp=1")
    cycle = load.weighted_cycle({"smtp": 4, "imap": 2, "pop3": 2})
    assert cycle.count("smtp") == 2 and cycle.count("imap") == 1 and len(cycle) == 4
    assert cycle[0] == "smtp" and cycle[1] != "smtp"  # interleaved, not in blocks


def test_percentiles_are_nearest_rank():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    figures = load_report.latency_figures(values)
    assert figures == {"count": 100, "p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert load_report.latency_figures([])["p50"] is None


def test_errors_are_counted_by_reply_code():
    from intermail.admin.bench_access import SessionError
    assert load.classify("smtp", load.SmtpRefused(451, b"451 4.3.0 try later\r\n", "end of data")) == "smtp 451"
    assert load.classify("imap", SessionError("b'SELECT': b'NO [UNAVAILABLE] store away'")) == "imap NO [UNAVAILABLE]"
    assert load.classify("pop3", SessionError("b'PASS': b'-ERR [IN-USE] locked'")) == "pop3 -ERR [IN-USE]"
    assert load.classify("imap", ConnectionRefusedError()) == "imap connection refused"
    assert load.classify("pop3", TimeoutError()) == "pop3 timeout"


def test_usage_errors(tmp_path, monkeypatch, capsys):
    from intermail.admin.cli import main
    data = ["--data", str(tmp_path)]
    assert main(["load", "smtp", *data]) == 2
    assert "--rate R, --count N or --duration T" in capsys.readouterr().err
    assert main(["load", "imap", "--count", "1", "--verify", *data]) == 2
    assert main(["load", "mixed", "--count", "1", "--target", "mta", *data]) == 2
    assert main(["load", "smtp", "--count", "1", "--target", "mta", *data]) == 2  # a name needs the cluster
    assert "HOST:PORT" in capsys.readouterr().err
    monkeypatch.setattr(load, "plot_available", lambda: False)
    assert main(["load", "smtp", "--count", "1", "--plot", str(tmp_path / "x.png"), *data]) == 2
    assert "matplotlib" in capsys.readouterr().err
