#!/usr/bin/env python3
"""Product code lines per module: emakit/, train.py and validate.py without docstrings,
comment-only lines and blank lines (issue 20's measure of the package's size).

    python bench/code_lines.py [REPO] [--base OTHER_REPO]   # a table; with --base, before/after
"""
from __future__ import annotations

import argparse
import ast
import io
import tokenize
from pathlib import Path


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not inside a docstring."""
    tree = ast.parse(source)
    doc_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                doc_lines.update(range(first.lineno, first.end_lineno + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENDMARKER):
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - doc_lines)


def count(repo: Path) -> dict[str, int]:
    """``{relative path: code lines}`` for the product files of ``repo``."""
    files = sorted((repo / "emakit").rglob("*.py")) + [repo / "train.py", repo / "validate.py"]
    return {p.relative_to(repo).as_posix(): code_lines(p.read_text(encoding="utf-8")) for p in files if p.exists()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--base", default=None, help="another checkout to compare with (default: None)")
    args = parser.parse_args()
    now = count(Path(args.repo))
    before = count(Path(args.base)) if args.base else {}
    print(f"{'module':42s} {'before':>7s} {'after':>7s} {'change':>7s}" if before else f"{'module':42s} {'lines':>7s}")
    for name in sorted(set(now) | set(before)):
        if before:
            b, a = before.get(name, 0), now.get(name, 0)
            if a != b:
                print(f"{name:42s} {b:7d} {a:7d} {a - b:+7d}")
        else:
            print(f"{name:42s} {now[name]:7d}")
    total_b, total_a = sum(before.values()), sum(now.values())
    print(f"{'total':42s} {total_b:7d} {total_a:7d} {total_a - total_b:+7d}" if before else f"{'total':42s} {total_a:7d}")


if __name__ == "__main__":
    main()
