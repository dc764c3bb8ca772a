"""validate.py: evaluate checkpoints (raw and EMA weights). Not implemented yet (issue 4)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Placeholder until issue 4 lands: says so and exits non-zero."""
    print("validate.py: not implemented yet (issue 4)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
