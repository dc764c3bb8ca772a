"""``python -m emakit``: the ``emakit`` command (see :mod:`emakit.training.cli`)."""
import sys

from emakit.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
