"""Which instance owns each store identity now, and the take-overs so far: ``<data>/run/owners.json``.

Owns the one record every party reads after a take-over: the store that
took an identity over writes itself in (:func:`record_takeover`); an
``mssd`` starting reads it to know whether it comes back as the owner or as
the spare (the repaired machine returns as the new spare: no fail-back);
the monitor and ``intermail status`` read it for roles and the history::

    {"owners": {"mss1": "mss1b"},
     "takeovers": [{"identity": "mss1", "by": "mss1b", "from": "mss1", "at": 1796000000.0, "seconds": 0.21}]}

Without the file (no take-over ever happened) the owner of an identity is
its instance with role ``active`` in the Config.

Invariants: the file is replaced atomically (write, fsync, rename, fsync the
directory), so a reader sees the old record or the new one; the history
keeps the last :data:`HISTORY` take-overs.

Logs: nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from intermail.config import Config

__all__ = ["OWNERS_FILE", "owners_path", "read", "owner_of", "record_takeover", "HISTORY"]

OWNERS_FILE = "owners.json"
HISTORY = 50


def owners_path(config: Config) -> Path:
    return Path(config.cluster.data_dir or ".") / "run" / OWNERS_FILE


def read(config: Config) -> dict[str, Any]:
    """The record (``{"owners": {}, "takeovers": []}`` when there is none or it is unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        content = json.loads(owners_path(config).read_text())
        if isinstance(content, dict):
            return {"owners": dict(content.get("owners", {})), "takeovers": list(content.get("takeovers", []))}
    return {"owners": {}, "takeovers": []}


def owner_of(config: Config, identity: str) -> str:
    """The instance name that owns ``identity`` now."""
    recorded = read(config)["owners"].get(identity)
    names = {i.name for i in config.instances_of("mss") if (i.identity or i.name) == identity}
    if recorded in names:
        return recorded
    for inst in config.instances_of("mss"):
        if (inst.identity or inst.name) == identity and inst.role in ("active", ""):
            return inst.name
    raise KeyError(identity)


def record_takeover(config: Config, identity: str, by: str, previous: str, seconds: float) -> None:
    record = read(config)
    record["owners"][identity] = by
    record["takeovers"] = (record["takeovers"] + [{"identity": identity, "by": by, "from": previous,
                                                   "at": round(time.time(), 3), "seconds": round(seconds, 3)}])[-HISTORY:]
    path = owners_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
