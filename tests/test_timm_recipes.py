"""timm's documented commands run through emakit unchanged (issue 21, must-shows 2-4).

**Recipes** (``tests/data/timm_recipes.txt``, written by ``bench/timm_recipes.py`` from timm's
``training_script.mdx`` and ``changes.mdx``): each train.py / validate.py command runs in-process
on the CPU with its own flags, ``--amp`` included. Only these are changed, so that a command
takes seconds on a tiny generated ImageFolder (``tests/conftest.py``):

=================================  ==========================================================
what the docs say                  what the test runs, and why
=================================  ==========================================================
``./distributed_train.sh N ...``   ``train.py ...`` as one process (the CPU tests have no GPUs;
                                   DDP itself is tested in test_train_distributed.py)
``--data-dir DIR`` / positional    the same flag or position, DIR = the generated ImageFolder
                                   (its ``val/`` folder where the docs name the validation folder)
``--model NAME``                   a timm ``test_*`` model of the same family (``TINY_MODELS``);
                                   swin has none: ``swin_tiny_patch4_window7_224`` made tiny
                                   with ``--model-kwargs embed_dim=16 depths=1,1 num_heads=1,1``
``--epochs N``                     ``--epochs 1`` (added where the docs leave timm's 300)
``-b N`` / ``--batch-size N``      ``-b 8`` (added where absent)
``-j N``                           ``-j 0`` (added where absent): no worker processes
image size                         ``--img-size 32`` added where the command sets none; a
                                   command's own size is scaled down keeping what it tests
                                   (``SIZES``: 255 -> 40, not a multiple of the patch; 240 with
                                   ``patch_size=12`` -> 36; ``3 256 320`` -> ``3 64 80``)
outputs                            ``--output``/``--experiment`` (train), ``--results-file``
                                   (validate) in the test's folder
``--pretrained``                   timm's ``load_pretrained`` answered with the initial
                                   weights (no network in tests), after checking it was asked
``/--data-dir imagenet/``          ``--data-dir``: a typo in training_script.mdx (timm itself
                                   refuses the command: ``unrecognized arguments``)
``dyamic_img_pad=True``            ``dynamic_img_pad=True``: a typo in changes.mdx (timm's
                                   ``create_model`` raises ``TypeError`` on the unknown kwarg)
=================================  ==========================================================

Commands that need flags other helpers are adding are ``xfail(strict=True)`` with the
missing flags named (``PENDING``); the marks go when those flags land.
"""
from __future__ import annotations

import csv
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
RECIPES_FILE = DATA / "timm_recipes.txt"

# A timm test_* model of each documented model's family (timm 1.0: test_resnet is a ResNet,
# test_efficientnet an EfficientNet built by _efficientnet_builder, as MixNet and MobileNetV3 are).
TINY_MODELS = {
    "seresnet34": "test_resnet", "seresnext26_32x4d": "test_resnet", "seresnext26t_32x4d": "test_resnet",
    "resnet50": "test_resnet", "resnext50_32x4d": "test_resnet",
    "efficientnet_b0": "test_efficientnet", "efficientnet_b2": "test_efficientnet",
    "efficientnet_es": "test_efficientnet", "mixnet_xl": "test_efficientnet",
    "mobilenetv3_large_100": "test_efficientnet",
    "vit_base_patch16_224": "test_vit", "vit_base_patch16_clip_224": "test_vit",
    "swin_base_patch4_window7_224.ms_in22k_ft_in1k": "swin_tiny_patch4_window7_224",
}
# Extra --model-kwargs that make a model without a test_* variant tiny.
TINY_KWARGS = {"swin_tiny_patch4_window7_224": ["embed_dim=16", "depths=1,1", "num_heads=1,1"]}
# A command's own image size, scaled down keeping its point (flag -> values, per recipe).
SIZES = {
    "changes.mdx:529": {"--img-size": ["40"]},  # 255: not a multiple of 16, padded (dynamic_img_pad)
    "changes.mdx:546": {"--input-size": ["3", "64", "80"], "--model-kwargs": ["window_size=8,10", "img_size=64,80"]},
    "changes.mdx:751": {"--img-size": ["36"], "--model-kwargs": ["img_size=36", "patch_size=12"]},
}
# The docs' typos (each refused by timm's own train.py / create_model as written).
TYPOS = {"/--data-dir": "--data-dir", "dyamic_img_pad=True": "dynamic_img_pad=True"}
_SIZE_FLAGS = ("--img-size", "--input-size")

# Commands that need flags not in emakit yet: recipe -> the missing flags (strict xfail).
PENDING = {
    "training_script.mdx:30": "validate.py --pretrained (parity-v)",
    "training_script.mdx:80": "--aug-splits, --resplit, --split-bn, --jsd (parity / parity-v)",
    "training_script.mdx:92": "--lr-noise (parity)",
    "changes.mdx:119": "validate.py --model-kwargs, --naflex-loader, --naflex-max-seq-len (parity-v)",
    "changes.mdx:529": "validate.py --model-kwargs (parity-v)",
    "changes.mdx:546": "validate.py --input-size, --model-kwargs (parity-v)",
    "changes.mdx:750": "--model-kwargs (parity)",
    "changes.mdx:751": "--model-kwargs (parity)",
}


@dataclass(frozen=True)
class Recipe:
    source: str   # "file.mdx:line"
    launcher: str  # the comment after the source ("./distributed_train.sh 2 ...") or ""
    script: str   # "train.py" or "validate.py"
    args: tuple[str, ...]


def load_recipes(path: Path = RECIPES_FILE) -> list[Recipe]:
    """The pinned commands: each a comment line (source, launcher) then the command."""
    recipes, comment = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# ") and re.match(r"# \S+\.mdx:\d+", line):
            comment = line[2:]
        elif line.strip() and not line.startswith("#"):
            assert comment is not None, f"{path}: command without its source line: {line}"
            source, _, launcher = comment.partition(" ")
            script, *args = shlex.split(line)
            recipes.append(Recipe(source, launcher, script, tuple(args)))
            comment = None
    return recipes


RECIPES = load_recipes()


def _groups(args: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    """(positional arguments before the first flag, [[flag, value, ...], ...])."""
    positional, groups = [], []
    for token in args:
        if token.startswith("-") and not re.fullmatch(r"-?\d*\.?\d+(e-?\d+)?", token):
            groups.append([token])
        elif groups:
            groups[-1].append(token)
        else:
            positional.append(token)
    return positional, groups


def tiny_argv(recipe: Recipe, data_root: Path, out: Path) -> list[str]:
    """The recipe's arguments with only the substitutions of the module docstring."""
    args = tuple(TYPOS.get(a, a) for a in recipe.args)
    positional, groups = _groups(args)

    def data_path(doc_path: str) -> str:
        return str(data_root / "val") if doc_path.rstrip("/").endswith("validation") else str(data_root)

    positional = [data_path(p) for p in positional]
    sizes = SIZES.get(recipe.source, {})
    seen: set[str] = set()
    model = None
    for group in groups:
        flag = group[0]
        seen.add(flag)
        if flag == "--data-dir":
            group[1:] = [data_path(group[1])]
        elif flag == "--model":
            model = group[1] = TINY_MODELS[group[1]]
        elif flag in ("-b", "--batch-size"):
            group[1:] = ["8"]
        elif flag in ("-j", "--workers"):
            group[1:] = ["0"]
        elif flag == "--epochs":
            group[1:] = ["1"]
        if flag in sizes:
            group[1:] = list(sizes[flag])
    if model in TINY_KWARGS:
        kw = next((g for g in groups if g[0] == "--model-kwargs"), None)
        if kw is None:
            groups.append(kw := ["--model-kwargs"])
        kw += TINY_KWARGS[model]
    added = []
    if not seen & {"-b", "--batch-size"}:
        added += ["-b", "8"]
    if not seen & {"-j", "--workers"}:
        added += ["-j", "0"]
    if not seen & set(_SIZE_FLAGS):
        added += ["--img-size", "32"]
    if recipe.script == "train.py":
        if "--epochs" not in seen:
            added += ["--epochs", "1"]
        added += ["--output", str(out), "--experiment", "run"]
    else:
        added += ["--results-file", str(out / "results.json")]
    return positional + [token for group in groups for token in group] + added


def _param(recipe: Recipe):
    marks = []
    if recipe.source in PENDING:
        marks.append(pytest.mark.xfail(strict=True, reason=f"needs {PENDING[recipe.source]}"))
    return pytest.param(recipe, id=f"{recipe.script}@{recipe.source}", marks=marks)


def test_the_pinned_recipes_are_timms_documented_commands():
    """What the file holds (regenerate with bench/timm_recipes.py): 15 commands, 11 train.py
    and 4 validate.py, each with its source line, and each documented model mapped to a
    tiny one."""
    assert len(RECIPES) == 15
    assert sum(r.script == "train.py" for r in RECIPES) == 11
    assert sum(r.script == "validate.py" for r in RECIPES) == 4
    assert len({r.source for r in RECIPES}) == len(RECIPES)
    assert set(PENDING) <= {r.source for r in RECIPES} and set(SIZES) <= {r.source for r in RECIPES}
    for r in RECIPES:
        model = r.args[r.args.index("--model") + 1]
        assert model in TINY_MODELS, model
        assert ("--amp" in r.args) or r.source in ("training_script.mdx:30", "training_script.mdx:62"), r


def test_tiny_argv_changes_only_the_documented_things(tmp_path):
    recipe = next(r for r in RECIPES if r.source == "training_script.mdx:46")
    argv = tiny_argv(recipe, tmp_path / "data", tmp_path / "out")
    assert argv[:4] == ["--data-dir", str(tmp_path / "data"), "--model", "test_efficientnet"]
    assert argv[argv.index("-b") + 1] == "8" and argv[argv.index("-j") + 1] == "0"
    assert argv[argv.index("--epochs") + 1] == "1" and "--amp" in argv
    kept = [a for a in recipe.args if a not in ("/imagenet/", "efficientnet_b2", "128", "450", "8")]
    assert all(a in argv for a in kept)
    swin = tiny_argv(next(r for r in RECIPES if r.source == "changes.mdx:546"), tmp_path, tmp_path / "o")
    assert swin[swin.index("--input-size"):swin.index("--input-size") + 4] == ["--input-size", "3", "64", "80"]
    kwargs = swin[swin.index("--model-kwargs") + 1:]
    assert kwargs[:5] == ["window_size=8,10", "img_size=64,80", "embed_dim=16", "depths=1,1", "num_heads=1,1"]
    typo = tiny_argv(next(r for r in RECIPES if r.source == "training_script.mdx:92"), tmp_path, tmp_path / "o")
    assert typo[:2] == ["--data-dir", str(tmp_path)]
    val = tiny_argv(next(r for r in RECIPES if r.source == "training_script.mdx:30"), tmp_path, tmp_path / "o")
    assert val[:2] == ["--data-dir", str(tmp_path / "val")] and "--pretrained" in val


def _finite(value: str | float | None) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [_param(r) for r in RECIPES if r.script == "train.py"])
def test_timm_train_recipe_runs(recipe, run_train, image_folder, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_train(tiny_argv(recipe, image_folder, out))
    assert code == 0, err[-3000:]
    with open(out / "run" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and _finite(rows[0]["train_loss"]) and _finite(rows[0]["eval_loss"]), rows


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [_param(r) for r in RECIPES if r.script == "validate.py"])
def test_timm_validate_recipe_runs(recipe, image_folder, tmp_path, capsys, monkeypatch):
    import validate
    from timm.models import _builder

    asked = []  # --pretrained: timm is asked for the weights, which tests never download
    monkeypatch.setattr(_builder, "load_pretrained", lambda model, pretrained_cfg=None, **kw: asked.append(
        dict(pretrained_cfg or {})))
    out = tmp_path / "out"
    out.mkdir()
    code = validate.main(tiny_argv(recipe, image_folder, out))
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert len(asked) == ("--pretrained" in recipe.args)
    results = json.loads((out / "results.json").read_text())
    rows = results if isinstance(results, list) else [results]
    assert rows and all(_finite(r.get("top1")) for r in rows), results
