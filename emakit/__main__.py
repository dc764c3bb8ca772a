"""``python -m emakit``: the ``emakit`` command (see :mod:`emakit.cli`)."""
import sys

from emakit.cli import main

if __name__ == "__main__":
    sys.exit(main())
