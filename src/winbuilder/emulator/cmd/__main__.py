"""``python -m winbuilder.emulator.cmd``: see the package docstring."""

import sys

from winbuilder.emulator.cmd.cli import main

if __name__ == "__main__":
    sys.exit(main())
