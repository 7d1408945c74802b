"""``python -m intermail ...``: the ``intermail`` command without an installed script."""

import sys

from intermail.admin.cli import main

sys.exit(main())
