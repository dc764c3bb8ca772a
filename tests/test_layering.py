"""Layering rules of issue 9, read from the source: the argparse namespace stays in the
modules that define command-line flags, and no trainer module imports another module's
private names."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Modules that define command-line flags: they build the parser and turn its namespace into settings.
FLAG_MODULES = {"emakit/training/config.py", "emakit/training/validate_config.py", "emakit/training/kinds.py",
                "emakit/training/options.py"}
# Being restructured into settings/build/outputs/fit (issue 9); remove each from here once it is.
PENDING: set[str] = set()


def _sources(*folders: str) -> list[Path]:
    files = [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]
    return files + [REPO / "train.py", REPO / "validate.py"]


def _namespace_annotations(tree: ast.AST) -> list[str]:
    """``function(parameter)`` for every parameter or return annotated with a Namespace."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            for arg in args + [a for a in (node.args.vararg, node.args.kwarg) if a]:
                if arg.annotation is not None and "Namespace" in ast.unparse(arg.annotation):
                    found.append(f"{node.name}({arg.arg})")
            if node.returns is not None and "Namespace" in ast.unparse(node.returns):
                found.append(f"{node.name}() -> Namespace")
        elif isinstance(node, ast.AnnAssign) and "Namespace" in ast.unparse(node.annotation):
            found.append(f"a field {ast.unparse(node.target)} holds a Namespace")
    return found


def test_no_function_outside_the_flag_modules_takes_or_holds_an_argparse_namespace():
    bad = {}
    for path in _sources("emakit"):
        rel = path.relative_to(REPO).as_posix()
        if rel in FLAG_MODULES or rel in PENDING:
            continue
        found = _namespace_annotations(ast.parse(path.read_text(encoding="utf-8")))
        if found:
            bad[rel] = found
    assert bad == {}


def test_the_rule_sees_a_namespace_parameter_and_a_holder():
    code = "import argparse\ndef f(a: argparse.Namespace): ...\nclass T:\n    args: 'argparse.Namespace'\n"
    assert _namespace_annotations(ast.parse(code)) == ["f(a)", "a field args holds a Namespace"]


def test_trainer_modules_import_no_private_name_of_another_emakit_module():
    bad = []
    for path in _sources("emakit/training"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("emakit")):
                bad += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []
