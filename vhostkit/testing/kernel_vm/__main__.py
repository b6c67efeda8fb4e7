"""Entry point of ``python3 -m vhostkit.testing.kernel_vm`` (see :mod:`.cli`)."""

import sys

from vhostkit.testing.kernel_vm.cli import main

if __name__ == "__main__":
    sys.exit(main())
