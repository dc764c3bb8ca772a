"""``python -m emakit``: the ``emakit`` command (see :mod:`emakit.training.cli`)."""
from emakit.training.cli import console_main

if __name__ == "__main__":
    console_main()
