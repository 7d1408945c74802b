"""Structured logging: one JSON object per line, event names from a known catalogue.

Owns: the log line format (:class:`JsonFormatter`, :class:`TextFormatter`),
the event catalogue (:func:`register_events`, :func:`events`), the per-task
log context (:func:`log_context`: queue id, session id… carried by
``contextvars``, so every line a session's task writes carries its ids), and
process set-up (:func:`setup_logging`).

A JSON line always has ``ts`` (UTC, ISO 8601, milliseconds), ``level``
(lower case), ``instance``, ``event``, ``msg`` and ``logger``; then the
context fields, then the event's own fields; ``exc`` holds a traceback when
there is one.  Plain ``logger.info("...")`` calls (ours or a library's) get
the event ``log.message``.

Unknown event names — the policy, chosen so that a typo is caught early but
never takes a server down:

- **strict** (the default until :func:`setup_logging` is called, i.e. in unit
  tests and library use): :func:`log_event` raises ``ValueError``.
- **lenient** (what ``setup_logging`` selects, i.e. every running server):
  the line is still written, with ``"unknown_event": true``, and one
  ``log.unknown_event`` warning per name follows.  An error path must not
  turn into a crash because its log line was misnamed.

``setup_logging(..., strict_events=True)`` keeps the strict policy in a
process (used by the test suite's subprocesses).

Logs: ``log.unknown_event`` (lenient mode only).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import re
import sys
import threading
import types
from collections.abc import Iterator, Mapping
from typing import IO, Any

# The catalogue.  Other modules add their own with register_events() at import
# time, next to the code that logs them.
_CATALOGUE: dict[str, str] = {
    "log.message": "a plain logging call without an event name (ours or a library's)",
    "log.unknown_event": "a log_event call used a name missing from the catalogue (lenient mode)",
    "storage.opened": "a store or queue opened its journal and index",
    "storage.recovered": "recovery replayed the journal past the index's last applied sequence (I-3)",
    "storage.mirror_degraded": "a mirror failed (EIO, ENOSPC, missing) and was taken out of the write set (I-5)",
    "storage.mirror_rebuilt": "a replaced mirror was rebuilt online and rejoined the write set (I-5)",
    "storage.fenced": "a newer owner epoch was seen; this process stops writing (I-6)",
    "storage.checkpoint": "the index was checkpointed at a journal sequence number",
    "storage.segment_retired": "a journal segment no longer needed for recovery or backup was removed",
    "storage.mirror_repaired": "bad or missing bytes on one mirror were rewritten from a good copy (I-5)",
    "storage.index_rebuilt": "the index was damaged or ahead of the journal and was rebuilt from checkpoint + journal",
    "storage.tail_cut": "a torn tail (a frame without its commit marker) was cut at open (I-3)",
    "storage.failed": "the store can no longer write (no healthy mirror, or an I/O error); commits fail",
    "storage.checkpoint_failed": "an automatic checkpoint or compaction failed; it is retried later",
    "storage.checkpoint_unreadable": "a checkpoint failed verification on every mirror; an older one is used",
    "runner.listening": "a listener is bound and accepting (name, host, port)",
    "runner.ready": "every listener is bound and the ready file, if any, is written",
    "runner.draining": "a stop was requested: listeners closed, live connections get the drain timeout",
    "runner.cancelled": "connections still open at the end of the drain timeout were cancelled",
    "runner.handler_failed": "a connection handler raised an unexpected exception",
    "runner.start_failed": "the app failed to start; the process exits non-zero",
    "runner.stop_failed": "the app's stop() raised; the process exits non-zero",
    "runner.stopped": "the app stopped and the process is about to exit",
}
_lock = threading.Lock()
_EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")

# Keys the formatter writes itself; an event field of the same name would be
# ambiguous in the output, so log_event refuses it.
RESERVED_FIELDS = frozenset({"ts", "level", "instance", "event", "msg", "logger", "exc", "unknown_event"})

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "intermail_log_context", default=types.MappingProxyType({})
)

# Process-wide policy, set by setup_logging (see the module docstring).
_strict_events = True
_warned_unknown: set[str] = set()


def register_events(events: Mapping[str, str]) -> None:
    """Add ``{name: one-line doc}`` to the catalogue.

    Names are dotted lower case (``queue.deferred``).  Registering a name
    again with the same doc is harmless (modules may be re-imported); with a
    different doc it is a ValueError, since two meanings for one event name
    would make the logs ambiguous.
    """
    with _lock:
        for name, doc in events.items():
            if not _EVENT_NAME.match(name):
                raise ValueError(f"bad event name {name!r}: use dotted lower case, e.g. 'queue.deferred'")
            if not isinstance(doc, str) or not doc.strip():
                raise ValueError(f"event {name!r} needs a one-line doc")
            known = _CATALOGUE.get(name)
            if known is not None and known != doc:
                raise ValueError(f"event {name!r} is already registered as {known!r}")
        _CATALOGUE.update(events)


def events() -> Mapping[str, str]:
    """A read-only snapshot of the catalogue: event name -> one-line doc."""
    with _lock:
        return types.MappingProxyType(dict(_CATALOGUE))


def is_known_event(name: str) -> bool:
    return name in _CATALOGUE


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[Mapping[str, Any]]:
    """Add fields (``session_id=...``, ``queue_id=...``) to every line logged inside.

    The context is a ``contextvars`` value: an asyncio task started inside
    inherits it, and concurrent sessions on one loop never see each other's.
    """
    merged = types.MappingProxyType({**_context.get(), **fields})
    token = _context.set(merged)
    try:
        yield merged
    finally:
        _context.reset(token)


def current_context() -> Mapping[str, Any]:
    return _context.get()


def log_event(logger: logging.Logger, event: str, /, msg: str | None = None, *,
              level: int = logging.INFO, exc_info: Any = None, **fields: Any) -> None:
    """Log one catalogued event with its fields; ``msg`` defaults to the event's doc."""
    bad = RESERVED_FIELDS.intersection(fields)
    if bad:
        raise ValueError(f"log_event fields {sorted(bad)} clash with the line's own keys")
    doc = _CATALOGUE.get(event)
    unknown = doc is None
    if unknown and _strict_events:
        raise ValueError(f"unknown log event {event!r}: add it with intermail.log.register_events()")
    if not logger.isEnabledFor(level):
        return
    # Capture the context now: any handler (ours, pytest's caplog, a queue
    # handler on another thread) then sees this task's fields.
    extra = {"im_event": event, "im_fields": fields, "im_context": _context.get()}
    if unknown:
        extra["im_unknown"] = True
    logger.log(level, msg if msg is not None else (doc or event), exc_info=exc_info, extra=extra,
               stacklevel=2)
    if unknown and event not in _warned_unknown:
        _warned_unknown.add(event)
        logging.getLogger("intermail.log").warning(
            "log event %r is not in the catalogue", event,
            extra={"im_event": "log.unknown_event", "im_fields": {"name": event}},
        )


class _ContextFilter(logging.Filter):
    """Copies the task's log context onto each record when it is created.

    A handler may format the record later (or on another thread), when the
    contextvar no longer holds the task's values: capture them now.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "im_context"):
            record.im_context = _context.get()
        return True


def _record_fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    context = getattr(record, "im_context", None)
    if context is None:
        context = _context.get()
    fields = {**context, **getattr(record, "im_fields", {})}
    return getattr(record, "im_event", "log.message"), fields


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; values JSON cannot hold are written with str()."""

    def __init__(self, instance: str):
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        event, fields = _record_fields(record)
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "instance": self.instance,
            "event": event,
            "msg": record.getMessage(),
            "logger": record.name,
        }
        if getattr(record, "im_unknown", False):
            line["unknown_event"] = True
        for key, value in fields.items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        # ensure_ascii keeps each line one physical line whatever the input;
        # default=str so a stray Path or exception object never loses the line.
        return json.dumps(line, ensure_ascii=True, default=str)


class TextFormatter(logging.Formatter):
    """``ts level instance event msg key=value ...`` for people reading a terminal."""

    def __init__(self, instance: str):
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        event, fields = _record_fields(record)
        parts = [_timestamp(record), record.levelname.lower(), self.instance, event, record.getMessage()]
        parts += [f"{key}={value!r}" if isinstance(value, str) and " " in value else f"{key}={value}"
                  for key, value in fields.items()]
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _OurHandler(logging.StreamHandler):
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(instance: str, level: str | int = "INFO", stream: IO[str] | None = None, *,
                  fmt: str = "json", strict_events: bool = False) -> logging.Handler:
    """Send every log record of this process to ``stream`` (stderr) as ``fmt`` lines.

    Call once at process start (the services do, with values from
    ``Config.log``).  Calling again replaces the handler installed before.
    Returns the handler.
    """
    global _strict_events
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', not {fmt!r}")
    if isinstance(level, str):
        numeric = logging.getLevelName(level.upper())
        if not isinstance(numeric, int):
            raise ValueError(f"unknown log level {level!r}")
        level = numeric
    handler = _OurHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(instance) if fmt == "json" else TextFormatter(instance))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
        old.close()  # flushes; a StreamHandler never closes the stream it was given
    root.addHandler(handler)
    root.setLevel(level)
    _strict_events = strict_events
    return handler
