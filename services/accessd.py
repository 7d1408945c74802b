"""accessd: one access server instance (IMAP + POP3) -- see intermail.apps.access."""

from __future__ import annotations

import sys

from intermail.apps import service_main
from intermail.apps.access import AccessApp


def main(argv: list[str] | None = None) -> int:
    return service_main("access", AccessApp, argv)


if __name__ == "__main__":
    sys.exit(main())
