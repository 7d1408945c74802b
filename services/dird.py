"""dird: one directory instance (primary or replica) -- see intermail.apps.directory."""

from __future__ import annotations

import sys

from intermail.apps import service_main
from intermail.apps.directory import DirectoryApp


def main(argv: list[str] | None = None) -> int:
    return service_main("directory", DirectoryApp, argv)


if __name__ == "__main__":
    sys.exit(main())
