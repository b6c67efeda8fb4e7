"""``python3 -m vhostkit``: the command line."""

import sys

from vhostkit.cli import main

sys.exit(main())
