"""mssd: one message store instance (LMTP + store RPC) -- see intermail.apps.mss.

``--store-dir DIR`` (repeatable) serves the store in DIR instead of the
instance's configured ``store_dirs``: a restored store (``intermail restore``)
under the identity.  DIR is a store root holding ``mirror-N`` directories,
or one mirror directory.
"""

from __future__ import annotations

import argparse
import functools
import sys

from intermail.apps import service_main
from intermail.apps.mss import MssApp
from intermail.storage.backup import store_mirrors


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--store-dir", action="append", default=[])
    known, rest = pre.parse_known_args(argv)
    build = functools.partial(MssApp, store_dirs=store_mirrors(known.store_dir)) if known.store_dir else MssApp
    return service_main("mss", build, rest)


if __name__ == "__main__":
    sys.exit(main())
