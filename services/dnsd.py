"""dnsd: the cluster's authoritative DNS server (UDP + TCP, RFC 2136 updates) -- see intermail.apps.dns."""

from __future__ import annotations

import sys

from intermail.apps import service_main
from intermail.apps.dns import DnsApp


def main(argv: list[str] | None = None) -> int:
    return service_main("dns", DnsApp, argv)


if __name__ == "__main__":
    sys.exit(main())
