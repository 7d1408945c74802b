"""mtad: one MTA instance (SMTP in, queue, delivery) -- see intermail.apps.mta."""

from __future__ import annotations

import sys

from intermail.apps import service_main
from intermail.apps.mta import MtaApp


def main(argv: list[str] | None = None) -> int:
    return service_main("mta", MtaApp, argv)


if __name__ == "__main__":
    sys.exit(main())
