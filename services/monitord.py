"""monitord: the monitor sidecar -- see intermail.apps.monitor."""

from __future__ import annotations

import sys

from intermail.apps import service_main
from intermail.apps.monitor import MonitorApp


def main(argv: list[str] | None = None) -> int:
    return service_main("monitor", MonitorApp, argv)


if __name__ == "__main__":
    sys.exit(main())
