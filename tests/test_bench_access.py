"""`intermail bench imap --json` and `intermail bench pop3 --json` keep the benchmark contract of ARCHITECTURE.md.

Smoke runs (tiny durations): the figures mean nothing here, only the shape,
that every session on both sides went through with every answer as
expected (no errors, no failed first session), and that nothing is left
behind (files, Dovecot or our processes).  Where Dovecot cannot be had
(no root, no apt-get) the baseline must be reported as null with a note.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from intermail.admin.bench_access import IMAP_COMMANDS, Mailbox
from intermail.admin.bench_load import mailbox_mix
from intermail.testing.procs import processes

pytestmark = pytest.mark.timeout(300)


def _bench_leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("bench-access-*")}


def _bench_processes(bench_pid: int) -> list[str]:
    """Processes started by a bench: named after its directory (ours, Dovecot's master) or its Dovecot
    instance (``intermail-bench-<pid of the bench>``, Dovecot's children)."""
    return processes(lambda cmdline: "bench-access-" in cmdline or f"intermail-bench-{bench_pid}/" in cmdline)


def _run(protocol: str, tmp_path: Path) -> tuple[dict, int]:
    """The report of a smoke run, and the pid the bench ran as."""
    with subprocess.Popen(
        [sys.executable, "-m", "intermail", "bench", protocol, "--json", "--seconds", "0.5", "--concurrency", "1,3",
         "--users", "4", "--messages", "6", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as bench:
        try:
            out, err = bench.communicate(timeout=280)
        except subprocess.TimeoutExpired:
            bench.kill()
            raise
    assert bench.returncode == 0, err
    return json.loads(out), bench.pid


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_bench_access_json_contract(tmp_path, protocol):
    before = _bench_leftovers()
    report, bench_pid = _run(protocol, tmp_path)
    assert report["bench"] == protocol
    assert set(report["host"]) >= {"cpus", "python", "platform"}
    assert any("argon2id" in note for note in report["notes"])
    assert not [n for n in report["notes"] if "failed" in n or "refused" in n], report["notes"]
    mailbox = Mailbox.of(mailbox_mix(6, "user0@bench.test"))
    cases = report["results"]
    assert [c["case"] for c in cases] == [f"{protocol} conc=1 msgs=6", f"{protocol} conc=3 msgs=6"]
    for case, concurrency in zip(cases, (1, 3)):
        assert set(case) >= {"case", "params", "metric", "ours", "baseline", "baseline_name", "ratio"}
        assert case["metric"] == ("ops/s" if protocol == "imap" else "sessions/s")
        assert case["params"] == {"concurrency": concurrency, "users": 4, "messages": 6,
                                  "mailbox_bytes": sum(mailbox.sizes),
                                  "commands_per_session": IMAP_COMMANDS if protocol == "imap" else 5 + 6}
        sides = ["ours"] if case["baseline"] is None else ["ours", "baseline"]
        for side in sides:
            details = case["details"][side]
            assert case["errors"][side] == 0, details["error_samples"]
            assert details["sessions"] > 0 and details["operations"] >= details["sessions"]
            assert set(details["command_ms"]) == (
                {"LOGIN", "SELECT", "FETCH 1:* (FLAGS ENVELOPE)", "FETCH BODY.PEEK[HEADER]", "FETCH BODY[]",
                 "UID SEARCH", "STORE", "APPEND", "UID STORE \\Deleted", "UID EXPUNGE", "LOGOUT"}
                if protocol == "imap" else {"USER", "PASS", "STAT", "UIDL", "RETR", "QUIT"})
            assert set(details["server_cpu"]) == ({"accessd", "mssd", "dird"} if side == "ours" else {"dovecot"})
        assert case["ours"] > 0
        if case["baseline"] is None:
            assert os.geteuid() != 0, f"root with apt-get gets Dovecot, yet: {case.get('note')}"
            assert case["ratio"] is None and "baseline unavailable" in case["note"]
            continue
        assert case["baseline_name"].startswith("dovecot 2.") and case["baseline_name"].endswith(f" {protocol} sdbox")
        assert case["baseline"] > 0
        assert abs(case["ratio"] - case["ours"] / case["baseline"]) < 0.01 * max(1.0, case["ratio"])
    assert list(tmp_path.iterdir()) == []  # the bench cleans up after itself
    assert _bench_leftovers() <= before
    assert _bench_processes(bench_pid) == []


def test_mailbox_mix_is_what_the_sessions_check():
    messages = mailbox_mix(10, "user0@bench.test")
    mailbox = Mailbox.of(messages)
    assert mailbox.count == 10 and mailbox.search_hits == 4  # alice: the notes and the reports
    assert all(b"\r\n" in m and b"\n" not in m.replace(b"\r\n", b"") for m in messages)
    assert sorted(set(mailbox.sizes)) == [2048, 4096, 8192, 12288, 40960]


def test_users_below_concurrency_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "intermail", "bench", "imap", "--concurrency", "8", "--users", "4",
                          "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--users" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_without_dovecot_the_baseline_is_null_with_a_note(tmp_path, monkeypatch):
    from intermail.admin import bench_access

    def unavailable(notes, protocols):
        notes.append("baseline unavailable: dovecot is not installed and cannot be installed here (test)")
        return None

    monkeypatch.setattr(bench_access, "find_or_install_dovecot", unavailable)
    report = asyncio.run(bench_access.run_bench("imap", [2], 0.3, 2, 3, str(tmp_path)))
    (case,) = report["results"]
    assert case["baseline"] is None and case["ratio"] is None and case["errors"]["baseline"] is None
    assert case["details"]["baseline"] is None and "baseline unavailable" in case["note"]
    assert case["baseline_name"] == "dovecot imap sdbox (unavailable)"
    assert case["ours"] > 0 and case["errors"]["ours"] == 0, case["details"]["ours"]["error_samples"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("answer", [b".\r\n", b"1 a\r\n.\r\n", b"1 a\r\n2 b\r\n.\r\n", b"..x\r\nfoo.\r\n.\r\n"])
def test_the_pop3_load_client_reads_every_multi_line_answer_to_its_end(answer):
    """Empty, one line (UIDL of one message), two lines, dot-stuffed and dot-ended lines."""
    import asyncio

    from intermail.admin.bench_access import Pop3Client

    async def scenario() -> tuple[bytes, bytes]:
        done = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"+OK\r\n" + answer)
            await done.wait()
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        try:
            return await asyncio.wait_for(Pop3Client(reader, writer).command(b"UIDL", multiline=True), 5)
        finally:
            done.set()
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(scenario()) == (b"+OK\r\n", answer)
