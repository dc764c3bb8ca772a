"""Pin the options of timm's ``train.py`` and ``validate.py`` as JSON for tests/test_timm_flags.py.

timm's scripts are not in the timm wheel and CI has no timm source, so their option lists
(every flag with its aliases, dest, default, nargs, const, action and choices) are taken here
from the scripts' own argparse parsers and committed under ``tests/data/``::

    python bench/timm_args.py --timm-src /tmp/timm_src          # the folder holding train.py, validate.py

The scripts are imported (not run): their parsers are module globals built at import.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "tests", "data")


def load_script(path: str) -> Any:
    """Import a timm script by path without running its ``main``."""
    name = "timm_script_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [path]
    try:
        spec.loader.exec_module(module)
    finally:
        sys.argv = argv
    return module


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def options(*parsers: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """One entry per argparse action (``-h`` left out), in the parsers' order."""
    rows, seen = [], set()
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.dest in seen:
                continue
            seen.add(action.dest)
            rows.append({"names": list(action.option_strings) or [action.dest], "dest": action.dest,
                         "default": _plain(action.default), "nargs": _plain(action.nargs),
                         "const": _plain(action.const), "action": type(action).__name__,
                         "type": getattr(action.type, "__name__", None) if action.type else None,
                         "choices": _plain(list(action.choices)) if action.choices else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timm-src", default="/tmp/timm_src", help="folder with timm's train.py and validate.py")
    ap.add_argument("--out", default=OUT, help="where the JSON files go (default: tests/data)")
    ap.add_argument("--commit", default="aa4b5850", help="the timm repository commit the scripts came from")
    a = ap.parse_args()
    import timm

    train = load_script(os.path.join(a.timm_src, "train.py"))
    validate = load_script(os.path.join(a.timm_src, "validate.py"))
    os.makedirs(a.out, exist_ok=True)
    for name, rows in (("timm_train_args.json", options(train.config_parser, train.parser)),
                       ("timm_validate_args.json", options(validate.parser))):
        with open(os.path.join(a.out, name), "w") as f:
            json.dump({"timm_version": timm.__version__, "source": f"timm main branch {a.commit}",
                       "options": rows}, f, indent=1)
            f.write("\n")
        print(f"{name}: {len(rows)} options")


if __name__ == "__main__":
    main()
