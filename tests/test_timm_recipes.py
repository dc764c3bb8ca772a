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

import argparse
import csv
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

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

# Commands that need flags not in emakit yet: recipe -> the missing flags (strict xfail). None now.
PENDING: dict[str, str] = {}


# Commands emakit refuses on purpose (one line, exit 2): recipe -> (flag, why, for the README).
REFUSED = {"changes.mdx:119": ("--naflex-loader", "emakit has no NaFlex (variable-resolution patch) loader")}


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


def test_the_extractor_finds_commands_and_skips_prose(tmp_path):
    """bench/timm_recipes.py: a command in backticks or a code block, ./distributed_train.sh N
    as train.py, and never prose that names a script ("`validate.py` to trigger", "train.py to")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("timm_recipes", DATA.parents[1] / "bench" / "timm_recipes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = ("* Add `--reparam` arg to `benchmark.py`, and `validate.py` to trigger fusion\n"
            "* Added `--head-init-scale` to train.py to scale the head\n"
            "./distributed_train.sh 2 --data-dir /imagenet/ --model resnet50  --amp\n"
            "  * `python validate.py /imagenet --amp -j 8 --model vit_base_patch16_224` and more\n"
            "  * `train.py --data-dir /imagenet --model resnet50 --amp --model-kwargs output_stride=16`\n")
    assert bench.extract("x.mdx", text) == [
        ("x.mdx:3 ./distributed_train.sh 2 (torchrun, 2 processes)",
         "train.py --data-dir /imagenet/ --model resnet50 --amp"),
        ("x.mdx:4", "validate.py /imagenet --amp -j 8 --model vit_base_patch16_224"),
        ("x.mdx:5", "train.py --data-dir /imagenet --model resnet50 --amp --model-kwargs output_stride=16")]
    rendered = bench.render({"training_script.mdx": text, "changes.mdx": ""}, "here")
    path = tmp_path / "r.txt"
    path.write_text(rendered)
    assert [(r.source, r.script) for r in load_recipes(path)] == [
        ("training_script.mdx:3", "train.py"), ("training_script.mdx:4", "validate.py"),
        ("training_script.mdx:5", "train.py")]


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
    if "--amp" in recipe.args:  # float16 autocast on the CPU, as timm: no gradient scaler
        log = (out / "run" / "train.log").read_text()
        assert "AMP: autocast float16 on cpu" in log and "gradient scaler" not in log


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [_param(r) for r in RECIPES if r.script == "validate.py"])
def test_timm_validate_recipe_runs(recipe, image_folder, tmp_path, capsys, monkeypatch):
    import validate
    from timm.models import _builder

    asked = []  # timm's pretrained weights (--pretrained, or no --checkpoint as in timm): never downloaded here
    monkeypatch.setattr(_builder, "load_pretrained", lambda model, pretrained_cfg=None, **kw: asked.append(
        dict(pretrained_cfg or {})))
    out = tmp_path / "out"
    out.mkdir()
    code = validate.main(tiny_argv(recipe, image_folder, out))
    err = capsys.readouterr().err
    if recipe.source in REFUSED:  # refused on purpose: one line naming the flag, nothing written
        flag, _ = REFUSED[recipe.source]
        lines = [ln for ln in err.splitlines() if ln.startswith("validate.py: error:")]
        assert code == 2 and len(lines) == 1 and flag in lines[0] and "not supported" in lines[0], err[-3000:]
        assert not (out / "results.json").exists()
        return
    assert code == 0, err[-3000:]
    assert len(asked) == ("--pretrained" in recipe.args or "--checkpoint" not in recipe.args)
    results = json.loads((out / "results.json").read_text())
    rows = results if isinstance(results, list) else [results]
    assert rows and all(_finite(r.get("top1")) for r in rows), results


# --------------------------------------------------------------------------- must-show 3: the same build
ARGS_DIR = DATA / "timm_args"  # timm's own args.yaml per seeded recipe (bench/timm_recipes.py)
SEEDED = ("rsb_a3", "deit", "vit_finetune")
# Seeded recipes whose flags emakit does not parse yet (strict xfail, names the flags).
SEEDED_PENDING: dict[str, str] = {}


def timm_args(name: str, data_dir: Path) -> tuple[list[str], argparse.Namespace]:
    """(the recipe's argv, timm's parsed args as its train.py dumped them) with DATA = data_dir."""
    import yaml

    text = (ARGS_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    first, _, _ = text.partition("\n")
    assert first.startswith("# argv: "), f"{name}.yaml: no argv line"
    argv = [str(data_dir) if a == "DATA" else a for a in shlex.split(first[len("# argv: "):])]
    args = argparse.Namespace(**yaml.safe_load(text))
    args.data_dir = str(data_dir)
    return argv, args


def timm_build(args) -> dict:
    """What timm's train.py ``main()`` builds from ``args``, in its order and with its calls
    (timm's train.py is not in the wheel: this follows /tmp/timm_src/train.py, timm main of
    2026-08), for one process on the CPU. Two departures, both on timm's side: the loaders are
    made with ``use_prefetcher=False`` (timm's --no-prefetcher; its CPU prefetcher normalizes
    and random-erases on the device, which emakit does on CUDA only), and ``--aug-repeats`` is
    dropped (timm's single-process loader asserts it is 0; emakit samples repeats there too)."""
    from timm import utils
    from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.models import create_model
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from torch import nn

    assert not args.aug_splits and not args.jsd_loss and args.lr is not None  # not in these recipes
    device = torch.device("cpu")
    utils.random_seed(args.seed, 0)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    model = create_model(args.model, pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes,
                         drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
                         global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
                         scriptable=args.torchscript, checkpoint_path=args.initial_checkpoint, **args.model_kwargs)
    data_config = resolve_data_config(vars(args), model=model)
    dataset_train = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                   batch_size=args.batch_size, seed=args.seed, repeats=args.epoch_repeats)
    dataset_eval = create_dataset(args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
                                  batch_size=args.batch_size)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config["interpolation"]
    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.num_classes)
    common = dict(mean=data_config["mean"], std=data_config["std"], pin_memory=args.pin_mem, device=device,
                  distributed=False, use_prefetcher=False)
    loader_train = create_loader(
        dataset_train, input_size=data_config["input_size"], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=0, num_aug_splits=0,
        interpolation=train_interpolation, num_workers=args.workers, worker_seeding=args.worker_seeding, **common)
    create_loader(dataset_eval, input_size=data_config["input_size"], batch_size=args.validation_batch_size or
                  args.batch_size, is_training=False, interpolation=data_config["interpolation"],
                  num_workers=args.workers, crop_pct=data_config["crop_pct"], **common)
    if mixup_active:
        train_loss_fn = (BinaryCrossEntropy(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum,
                                            pos_weight=args.bce_pos_weight) if args.bce_loss
                         else SoftTargetCrossEntropy())
    elif args.smoothing:
        train_loss_fn = (BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh,
                                            sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
                         if args.bce_loss else LabelSmoothingCrossEntropy(smoothing=args.smoothing))
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == "loss"),
        updates_per_epoch=updates_per_epoch)
    return dict(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, num_epochs=num_epochs,
                train_transform=dataset_train.transform, eval_transform=dataset_eval.transform,
                train_loss_fn=train_loss_fn, mixup_fn=mixup_fn, updates_per_epoch=updates_per_epoch)


def emakit_build(argv: list[str], out: Path) -> dict:
    """What emakit's train.py builds from the same command line (``build_trainer``)."""
    from emakit.training.config import parse_settings
    from emakit.training.trainer import build_trainer, close_trainer

    tr = build_trainer(parse_settings([*argv, "--output", str(out)]))
    close_trainer(tr)
    # the epochs trained: the scheduler's count (warmup prefix, cooldown) once the parity work adds it
    epochs = getattr(tr.resolved, "epochs", tr.settings.schedule.epochs)
    return dict(model=tr.model_without_ddp, optimizer=tr.optimizer, lr_scheduler=tr.lr_scheduler,
                num_epochs=epochs, train_transform=tr.data.train.transform,
                eval_transform=tr.data.val.transform, train_loss_fn=tr.train_loss_fn, mixup_fn=tr.mixup_fn,
                updates_per_epoch=tr.updates_per_epoch)


def optimizer_groups(optimizer, model) -> list[dict]:
    """Each param group: its parameters by name and every hyperparameter but the kernel
    choice (emakit asks torch for its fused kernel where timm loops: same update, docs)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [{k: ([names[id(p)] for p in v] if k == "params" else v) for k, v in g.items()
             if k not in ("fused", "foreach")} for g in optimizer.param_groups]


def lrs_per_epoch(built: dict) -> list[list[float]]:
    """Every group's LR at the start of each epoch, stepped as timm's loop steps it."""
    sched, opt, per_epoch = built["lr_scheduler"], built["optimizer"], built["updates_per_epoch"]
    lrs = []
    for epoch in range(built["num_epochs"]):
        lrs.append([g["lr"] for g in opt.param_groups])
        if sched.t_in_epochs:
            sched.step(epoch + 1)
        else:
            sched.step_update((epoch + 1) * per_epoch)
    return lrs


def transformed(transform, image, seed: int) -> torch.Tensor:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)  # RandAugment picks its ops with numpy
    torch.manual_seed(seed)
    return transform(image)


def loss_values(loss_fn, mixup_fn, num_classes: int = 3) -> list[float]:
    """The loss of fixed logits against hard labels, or with mixup the mixed soft targets."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, num_classes, generator=g)
    labels = torch.randint(0, num_classes, (8,), generator=g)
    targets = [labels]
    if mixup_fn is not None:
        from timm.data.mixup import mixup_target

        targets = [mixup_target(labels, num_classes, lam=lam, smoothing=mixup_fn.label_smoothing) for lam in (1.0, 0.7)]
    return [float(loss_fn(logits, t)) for t in targets]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.xfail(
    strict=True, reason=f"needs {SEEDED_PENDING[n]}")] if n in SEEDED_PENDING else []) for n in SEEDED])
def test_a_seeded_recipe_builds_as_timms_train_py(name, image_folder, tmp_path):
    """Must-show 3: emakit's build and timm's own factories, from timm's parsed args of the
    same command, agree on optimizer param groups, the LR of every group at every epoch,
    train/eval transforms (outputs under one seed), train loss and mixup, and initial weights
    (bit-identical under --seed)."""
    from PIL import Image

    argv, args = timm_args(name, image_folder)
    theirs = timm_build(args)
    ours = emakit_build(argv, tmp_path / "out")

    a, b = theirs["model"].state_dict(), ours["model"].state_dict()
    assert list(a) == list(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "initial weights differ"

    assert type(ours["optimizer"]) is type(theirs["optimizer"])
    assert optimizer_groups(ours["optimizer"], ours["model"]) == optimizer_groups(theirs["optimizer"], theirs["model"])

    assert ours["num_epochs"] == theirs["num_epochs"] == args.epochs
    assert ours["updates_per_epoch"] == theirs["updates_per_epoch"]
    assert lrs_per_epoch(ours) == lrs_per_epoch(theirs)

    with Image.open(next((image_folder / "train" / "ant").iterdir())) as im:
        image = im.convert("RGB")
    for key in ("train_transform", "eval_transform"):
        assert str(ours[key]) == str(theirs[key]), key
        for seed in range(5):
            assert torch.equal(transformed(ours[key], image, seed), transformed(theirs[key], image, seed))

    assert type(ours["train_loss_fn"]) is type(theirs["train_loss_fn"])
    assert loss_values(ours["train_loss_fn"], ours["mixup_fn"]) == loss_values(theirs["train_loss_fn"],
                                                                             theirs["mixup_fn"])
    assert (ours["mixup_fn"] is None) == (theirs["mixup_fn"] is None)
    if theirs["mixup_fn"] is not None:
        assert vars(ours["mixup_fn"]) == vars(theirs["mixup_fn"])


# --------------------------------------------------------------------------- must-show 4: --amp on the CPU
def timm_train_steps(model, optimizer, loss_fn, batches, amp_dtype, clip_grad=None) -> list[float]:
    """timm's ``train_one_epoch`` for one process on the CPU with ``--amp``: ``loss_scaler`` is
    None there (timm makes a ``NativeScaler`` for CUDA float16 only), so each step is autocast
    forward + loss, ``loss.backward()``, optional clipping, ``optimizer.step()``, ``zero_grad``."""
    from timm.utils import dispatch_clip_grad

    losses = []
    model.train()
    for inputs, target in batches:
        with torch.autocast(device_type="cpu", dtype=amp_dtype):
            loss = loss_fn(model(inputs), target)
        loss.backward()
        if clip_grad is not None:
            dispatch_clip_grad(model.parameters(), value=clip_grad, mode="norm")
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--warmup-epochs", "0"]], ids=["as-documented", "no-warmup"])
def test_amp_float16_on_the_cpu_trains_as_timm(extra, image_folder, tmp_path):
    """Must-show 4: training_script.mdx:15 (seresnet34 -> test_resnet, --amp float16, SGD) on the
    same 12 batches from the same initial weights: emakit's engine (its fused SGD, no scaler
    on the CPU) and timm's step (timm's unfused SGD, no scaler) give the same per-step losses.
    As documented the first epoch's LR is the warmup LR 1e-5, where emakit's GradScaler path
    diverged (NaN at step 3); without warmup the LR is 0.4 and the weights move far.

    Tolerance: float16 autocast keeps 11 significant bits (relative rounding 2^-11 ~ 5e-4
    per op). Measured on torch 2.14 CPU: bit-identical losses at both LRs (torch's fused and
    looping SGD round alike here); another torch or CPU may round the fused update apart by
    an ulp, which float16 activations and 12 steps at LR 0.4 can grow to ~1e-3. A scaler path
    that skips or poisons a step differs by O(1) or NaN (seen: NaN from step 2). rtol 1e-2.
    """
    import copy

    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2

    from emakit.training.config import parse_settings
    from emakit.training.engine import TrainOptions, train_one_epoch
    from emakit.training.trainer import build_trainer, close_trainer

    recipe = next(r for r in RECIPES if r.source == "training_script.mdx:15")
    argv = tiny_argv(recipe, image_folder, tmp_path / "out") + ["--seed", "0", *extra]
    tr = build_trainer(parse_settings(argv))
    close_trainer(tr)
    assert tr.amp.enabled and tr.amp.dtype == torch.float16 and tr.amp.scaler is None
    reference = copy.deepcopy(tr.model_without_ddp)
    torch.manual_seed(0)
    batches = [b for _ in range(4) for b in tr.train_loader]  # 4 epochs' batches, fixed
    s = tr.settings

    ours: list[float] = []

    def record(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # emakit's loss, each value kept
        loss = tr.train_loss_fn(output, target)
        ours.append(loss.item())
        return loss

    train_one_epoch(0, tr.model, batches, tr.optimizer, record, device=torch.device("cpu"),
                    opts=TrainOptions(optim=s.optim, run=s.run, amp=tr.amp))
    timm_opt = create_optimizer_v2(reference, opt=s.optim.opt, lr=tr.optimizer.param_groups[0]["lr"],
                                   weight_decay=s.optim.weight_decay, momentum=s.optim.momentum)
    timm_loss = LabelSmoothingCrossEntropy(s.loss.smoothing) if s.loss.smoothing else torch.nn.CrossEntropyLoss()
    theirs = timm_train_steps(reference, timm_opt, timm_loss, batches, torch.float16)
    assert len(ours) == len(theirs) == 12
    assert all(math.isfinite(v) for v in ours), ours
    assert ours == pytest.approx(theirs, rel=1e-2), (ours, theirs)


# --------------------------------------------------------------------------- --config with timm's args.yaml
def _unknown_keys(name: str) -> set[str]:
    import yaml

    from emakit.training.config import build_parser

    keys = yaml.safe_load((ARGS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    return set(keys) - {a.dest for a in build_parser()._actions}


@pytest.mark.parametrize("name", SEEDED)
def test_every_key_of_timm_args_yaml_is_known(name):
    assert sorted(_unknown_keys(name)) == []


@pytest.mark.slow
def test_train_py_config_reads_timms_args_yaml(run_train, image_folder, tmp_path):
    """``--config`` with the args.yaml timm's train.py wrote for the DeiT recipe (its keys,
    spellings and types, e.g. ``model_kwargs: {}``, ``lr_noise: null``), the data folder and
    epochs on the command line: the run is that recipe's."""
    out = tmp_path / "out"
    code, _, err = run_train(["--config", ARGS_DIR / "deit.yaml", "--data-dir", image_folder, "--epochs", "1",
                              "--device", "cpu", "--val-split", "val", "--output", out, "--experiment", "run"])
    # timm wrote device cuda and val_split validation: the command line wins
    assert code == 0, err[-3000:]
    import yaml

    written = yaml.safe_load((out / "run" / "args.yaml").read_text())
    timm_args_ = yaml.safe_load((ARGS_DIR / "deit.yaml").read_text())
    for key in ("model", "opt", "lr", "weight_decay", "sched", "warmup_lr", "min_lr", "smoothing", "mixup", "cutmix",
                "aa", "reprob", "remode", "drop_path", "model_ema_decay", "seed"):
        assert written[key] == timm_args_[key], key


# --------------------------------------------------------------------------- summary.csv as timm's tools read it
@pytest.mark.slow
def test_summary_eval_columns_mean_what_timm_means(run_train, image_folder, tmp_path):
    """timm's train.py with --model-ema writes the EMA's metrics as eval_loss/eval_top1/eval_top5
    (``eval_metrics = ema_eval_metrics``) and picks model_best by them; its tools read
    summary.csv so. emakit must write timm's columns with that meaning and its own beside."""
    from conftest import FAST_ARGS

    out = tmp_path / "out"
    code, _, err = run_train(["--data-dir", image_folder, *FAST_ARGS, "--epochs", "2", "--output", out,
                              "--experiment", "run"])
    assert code == 0, err[-3000:]
    with open(out / "run" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(f in rows[0] for f in ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"))
    for row in rows:
        assert row["eval_loss"] != "" and row["eval_loss"] == row["ema_eval_loss"], row
        assert row["eval_top1"] == row["ema_eval_top1"] and row["eval_top5"] == row["ema_eval_top5"], row
