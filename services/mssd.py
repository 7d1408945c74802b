"""mssd: one message store instance (LMTP + store RPC) -- see intermail.apps.mss."""

from __future__ import annotations

import sys

from intermail.apps import service_main
from intermail.apps.mss import MssApp


def main(argv: list[str] | None = None) -> int:
    return service_main("mss", MssApp, argv)


if __name__ == "__main__":
    sys.exit(main())
