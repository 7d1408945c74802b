"""intermail.log: JSON lines, context fields, the event catalogue and its policy."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from intermail import log
from intermail.log import log_context, log_event, register_events, setup_logging

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def capture(monkeypatch):
    """setup_logging into a buffer; the root logger and the policy are restored after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    monkeypatch.setattr(log, "_strict_events", log._strict_events)
    monkeypatch.setattr(log, "_warned_unknown", set())
    buf = io.StringIO()

    def start(**kwargs) -> io.StringIO:
        kwargs.setdefault("strict_events", True)
        setup_logging("mta1", "DEBUG", buf, **kwargs)
        return buf

    yield start
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_every_line_is_one_json_object(capture):
    buf = capture()
    logger = logging.getLogger("intermail.test")
    log_event(logger, "runner.listening", listener="smtp", host="127.0.0.1", port=2525)
    logger.warning("plain text with\nnewline and \u00e9")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log_event(logger, "runner.handler_failed", level=logging.ERROR, exc_info=True, listener="smtp")
    raw = buf.getvalue().splitlines()
    assert len(raw) == 3
    first, second, third = lines(buf)
    assert {"ts", "level", "instance", "event", "msg", "logger"} <= set(first)
    assert first["instance"] == "mta1"
    assert first["level"] == "info"
    assert first["event"] == "runner.listening"
    assert (first["listener"], first["port"]) == ("smtp", 2525)
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["event"] == "log.message"
    assert second["msg"] == "plain text with\nnewline and \u00e9"
    assert second["level"] == "warning"
    assert third["level"] == "error"
    assert "RuntimeError: boom" in third["exc"]


def test_msg_defaults_to_the_catalogue_doc(capture):
    buf = capture()
    log_event(logging.getLogger("t"), "storage.fenced")
    log_event(logging.getLogger("t"), "storage.fenced", "epoch 7 seen", epoch=7)
    one, two = lines(buf)
    assert one["msg"] == log.events()["storage.fenced"]
    assert (two["msg"], two["epoch"]) == ("epoch 7 seen", 7)


def test_context_fields_appear_and_nest(capture):
    buf = capture()
    logger = logging.getLogger("intermail.test")
    with log_context(session_id="S1"):
        log_event(logger, "storage.opened")
        with log_context(queue_id="Q1"):
            logger.info("inner")
        log_event(logger, "storage.opened", queue_id="override")
    log_event(logger, "storage.opened")
    a, b, c, d = lines(buf)
    assert a["session_id"] == "S1" and "queue_id" not in a
    assert (b["session_id"], b["queue_id"]) == ("S1", "Q1")
    assert c["queue_id"] == "override"  # the event's own field wins over the context
    assert "session_id" not in d


async def test_context_is_per_task(capture):
    buf = capture()
    logger = logging.getLogger("intermail.test")

    async def session(sid: str) -> None:
        with log_context(session_id=sid):
            for _ in range(3):
                await asyncio.sleep(0)
                log_event(logger, "storage.checkpoint", who=sid)

    await asyncio.gather(session("A"), session("B"))
    for line in lines(buf):
        assert line["session_id"] == line["who"]


def test_unknown_event_rejected_in_strict_mode(capture):
    buf = capture(strict_events=True)
    with pytest.raises(ValueError, match="unknown log event 'storage.opend'"):
        log_event(logging.getLogger("t"), "storage.opend")
    assert buf.getvalue() == ""


def test_strict_is_the_default_before_setup():
    # Library use and unit tests (no setup_logging call): typos fail fast.
    code = "import logging, intermail.log as l; l.log_event(logging.getLogger(), 'no.such_event')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode != 0
    assert "ValueError: unknown log event 'no.such_event'" in proc.stderr


def test_unknown_event_lenient_mode_logs_and_warns_once(capture):
    buf = capture(strict_events=False)
    logger = logging.getLogger("t")
    log_event(logger, "queue.deferd", queue_id="Q")
    log_event(logger, "queue.deferd", queue_id="Q2")
    events = [(line["event"], line.get("unknown_event")) for line in lines(buf)]
    assert events == [("queue.deferd", True), ("log.unknown_event", None), ("queue.deferd", True)]


def test_reserved_field_names_refused(capture):
    capture()
    with pytest.raises(ValueError, match="clash"):
        log_event(logging.getLogger("t"), "storage.opened", level_name="x", msg_id=1, ts=3)


def test_register_events():
    register_events({"testlog.sample_event": "an event registered by the test suite"})
    assert log.is_known_event("testlog.sample_event")
    # Same doc again: harmless (re-import); a different doc: a conflict.
    register_events({"testlog.sample_event": "an event registered by the test suite"})
    with pytest.raises(ValueError, match="already registered"):
        register_events({"testlog.sample_event": "something else"})
    with pytest.raises(ValueError, match="bad event name"):
        register_events({"NoDots": "x"})
    with pytest.raises(ValueError, match="doc"):
        register_events({"testlog.no_doc": ""})
    assert "testlog.no_doc" not in log.events()


def test_catalogue_has_the_foundation_events():
    names = set(log.events())
    for name in ("storage.opened", "storage.recovered", "storage.mirror_degraded", "storage.mirror_rebuilt",
                 "storage.fenced", "storage.checkpoint", "storage.segment_retired",
                 "runner.listening", "runner.draining", "runner.stopped"):
        assert name in names
    with pytest.raises(TypeError):
        log.events()["x.y"] = "z"  # type: ignore[index]


def test_level_filtering_and_text_format(capture):
    buf = capture(fmt="text")
    logging.getLogger().setLevel(logging.WARNING)
    with log_context(session_id="S9"):
        log_event(logging.getLogger("t"), "storage.opened")  # below WARNING: dropped
        log_event(logging.getLogger("t"), "storage.mirror_degraded", level=logging.WARNING, mirror="/d2 x")
    (line,) = buf.getvalue().splitlines()
    assert " warning mta1 storage.mirror_degraded " in line
    assert "session_id=S9" in line and "mirror='/d2 x'" in line


def test_setup_twice_replaces_the_handler(capture):
    first = capture()
    second = io.StringIO()
    setup_logging("mta2", "INFO", second, strict_events=True)
    logging.getLogger("t").info("hello")
    assert first.getvalue() == ""
    assert lines(second)[0]["instance"] == "mta2"


def test_setup_rejects_bad_arguments(capture):
    with pytest.raises(ValueError):
        setup_logging("x", "LOUD", io.StringIO())
    with pytest.raises(ValueError):
        setup_logging("x", "INFO", io.StringIO(), fmt="xml")


def test_unserialisable_values_are_stringified(capture, tmp_path):
    buf = capture()
    log_event(logging.getLogger("t"), "storage.opened", path=tmp_path, error=OSError(5, "EIO"))
    (line,) = lines(buf)
    assert line["path"] == str(tmp_path)
    assert "EIO" in line["error"]
