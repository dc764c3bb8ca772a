"""train.py's EMA equals timm's train.py for the same flags, also across a resume from a timm
checkpoint; resume checks (optimizer, EMA entries, --drop-ema, batch change) end before
anything is written.

The reference is timm's own ``ModelEmaV3``, updated with the step numbers timm's train.py
passes (``num_updates = epoch * updates_per_epoch``, ``+= 1`` before each
``update_ema(step=num_updates)``), fed the same model weights after every optimizer step.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, count_images

pytestmark = pytest.mark.slow

TIMM_FLAGS = ("model", "batch_size", "grad_accum_steps", "opt", "lr", "layer_decay", "epochs", "model_ema",
              "model_ema_decay", "model_ema_warmup", "seed")  # flags timm's train.py has too
BASE = ["--model", "test_resnet", "--img-size", "32", "--no-progress", "--log-interval", "1000", "--workers", "0",
        "--model-ema"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def fit_beside_timm(argv: list, *, timm_ema_from: dict | None = None) -> tuple[dict, dict, object]:
    """Train in-process with train.py's own build, updating a timm ModelEmaV3 beside our EMA
    with timm's step numbers. Returns (our EMA state, timm's EMA state, trainer)."""
    from timm.utils import ModelEmaV3

    from emakit.training.config import parse_args, settings_from_args
    from emakit.training.fit import RunState, run_epoch
    from emakit.training.trainer import build_trainer, close_trainer

    args = parse_args([str(a) for a in argv])
    tr = build_trainer(settings_from_args(args))
    try:
        ours = tr.averages.ema
        # timm builds its EMA from the (resumed) model, then loads state_dict_ema if resuming
        reference = ModelEmaV3(copy.deepcopy(tr.model_without_ddp), decay=args.model_ema_decay or 0.9998,
                               use_warmup=args.model_ema_warmup)
        if timm_ema_from is not None:
            reference.module.load_state_dict(timm_ema_from)
        step = {"n": tr.start_epoch * tr.updates_per_epoch}  # timm: num_updates = epoch * updates_per_epoch
        real_update = ours.update

        def update_both(model):
            real_update(model)
            step["n"] += 1
            reference.update(tr.model_without_ddp, step=step["n"])

        ours.update = update_both
        run = RunState.start(tr)
        for epoch in range(tr.start_epoch, args.epochs):  # fit() without its end-of-run plot
            run_epoch(tr, run, epoch)
        assert step["n"] == args.epochs * tr.updates_per_epoch
        return ours.module.state_dict(), reference.module.state_dict(), tr
    finally:
        close_trainer(tr)


def max_diff(ours: dict, theirs: dict) -> tuple[float, str]:
    assert ours.keys() == theirs.keys()
    return max(((ours[k].float() - theirs[k].float()).abs().max().item(), k) for k in ours)


def assert_close(ours: dict, theirs: dict, atol: float = 1e-6) -> None:
    diff, key = max_diff(ours, theirs)
    assert diff <= atol, f"{key}: max |diff| {diff:.3g}"


@pytest.mark.parametrize("extra", [["-b", "8", "--model-ema-decay", "0.9"],
                                   ["-b", "8", "--model-ema-decay", "0.99", "--model-ema-warmup"],
                                   ["-b", "4", "--grad-accum-steps", "2", "--model-ema-decay", "0.9"]],
                         ids=["constant", "warmup", "grad-accum"])
def test_train_py_ema_equals_timm_model_ema_v3_with_timms_step_numbers(image_folder, tmp_path, extra):
    ours, theirs, tr = fit_beside_timm([image_folder, *BASE, *extra, "--epochs", "1", "--output", tmp_path,
                                        "--experiment", "run"])
    assert tr.updates_per_epoch == 3
    assert_close(ours, theirs)
    assert_close(load(tmp_path / "run" / "last.pth.tar")["state_dict_ema"], theirs)


def timm_style_checkpoint(ckpt: dict, path: Path) -> Path:
    """What timm's train.py saves for the same run: Namespace args, no ``ema`` metadata, and
    (a DDP-era save) ``module.``-prefixed weights."""
    timm_ckpt = {"epoch": ckpt["epoch"], "arch": ckpt["arch"], "version": 2,
                 "state_dict": {f"module.{k}": v for k, v in ckpt["state_dict"].items()},
                 "state_dict_ema": {f"module.{k}": v for k, v in ckpt["state_dict_ema"].items()},
                 "optimizer": ckpt["optimizer"], "metric": ckpt["metric"],
                 "args": argparse.Namespace(**{k: ckpt["args"][k] for k in TIMM_FLAGS})}
    torch.save(timm_ckpt, path)
    return path


def test_resuming_a_timm_checkpoint_continues_timms_ema_step_count(image_folder, tmp_path, caplog):
    """--model-ema-warmup: with the counter restarting at 0 the next update would copy the raw
    weights over the resumed EMA; timm continues at step (epoch + 1) x steps per epoch."""
    warm = [*BASE, "-b", "8", "--model-ema-decay", "0.99", "--model-ema-warmup"]
    fit_beside_timm([image_folder, *warm, "--epochs", "1", "--output", tmp_path, "--experiment", "first"])
    ckpt = load(tmp_path / "first" / "last.pth.tar")
    timm_dir = tmp_path / "timm_run"
    timm_dir.mkdir()
    resume = timm_style_checkpoint(ckpt, timm_dir / "last.pth.tar")
    caplog.set_level("INFO", logger="emakit")
    ours, theirs, tr = fit_beside_timm([image_folder, *warm, "--epochs", "2", "--resume", resume, "--output", tmp_path],
                                       timm_ema_from=ckpt["state_dict_ema"])
    per_epoch = count_images(image_folder / "train") // 8
    assert tr.updates_per_epoch == per_epoch
    assert (f"has no EMA update counter (a timm checkpoint): set to {per_epoch} = (epoch 0 + 1) x {per_epoch} "
            "optimizer steps per epoch") in caplog.text
    assert_close(ours, theirs)
    assert load(tr.output_dir + "/last.pth.tar")["ema"]["num_updates"] == 2 * per_epoch


# ----------------------------------------------------------------------------------- resume checks
@pytest.fixture(scope="module")
def sgd_run(image_folder, tmp_path_factory) -> Path:
    """A finished 1-epoch run (sgd, EMA) whose folder the resume tests copy."""
    import train

    out = tmp_path_factory.mktemp("sgd")
    code = train.main([str(a) for a in [image_folder, *FAST_ARGS, "--epochs", "1", "--output", out,
                                        "--experiment", "run"]])
    assert code == 0
    return out / "run"


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def resume_copy(sgd_run: Path, tmp_path: Path, edit=None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(sgd_run, run)
    if edit is not None:
        ckpt = load(run / "last.pth.tar")
        edit(ckpt)
        torch.save(ckpt, run / "last.pth.tar")
    return run


def refused(run_train, run: Path, image_folder, *extra) -> str:
    before, parent = snapshot(run), sorted(os.listdir(run.parent))
    code, _, err = run_train([image_folder, *FAST_ARGS, "--epochs", "2", "--resume", run / "last.pth.tar", *extra])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len([ln for ln in lines if ln.startswith("train.py: error:")]) == 1, err
    assert snapshot(run) == before and sorted(os.listdir(run.parent)) == parent  # nothing written anywhere
    return lines[-1]


@pytest.mark.parametrize("extra, expected", [
    (["--opt", "adamw"], "(--opt sgd (checkpoint) vs adamw (now)); pass --opt sgd to continue its optimizer, or "
                         "--no-resume-opt to start a fresh optimizer state"),
    (["--layer-decay", "0.7"], "(--layer-decay None (checkpoint) vs 0.7 (now)); pass --opt sgd to continue its "
                               "optimizer, or --no-resume-opt"),
], ids=["opt", "layer-decay"])
def test_resuming_with_another_optimizer_exits_2_before_writing(run_train, sgd_run, tmp_path, image_folder,
                                                                extra, expected):
    run = resume_copy(sgd_run, tmp_path)
    line = refused(run_train, run, image_folder, *extra)
    assert line.startswith(f"train.py: error: --resume {run / 'last.pth.tar'}: the checkpoint's optimizer state "
                           "does not fit this run's optimizer "), line
    assert expected in line


def test_an_optimizer_state_of_another_optimizer_is_refused_even_without_recorded_args(run_train, sgd_run, tmp_path,
                                                                                        image_folder):
    run = resume_copy(sgd_run, tmp_path, lambda c: c.pop("args"))
    line = refused(run_train, run, image_folder, "--opt", "adamw")
    assert "the checkpoint's optimizer options (dampening, differentiable, foreach, " in line
    assert line.endswith("pass --no-resume-opt to start a fresh optimizer state")


def _wrong_shape(ckpt):
    ckpt["state_dict_ema"]["fc.weight"] = torch.zeros(7, 7)


def _missing_key(ckpt):
    del ckpt["state_dict_ema"]["fc.bias"]


def _momentum_shape(ckpt):
    first = next(iter(ckpt["optimizer"]["state"]))
    ckpt["optimizer"]["state"][first]["momentum_buffer"] = torch.zeros(3)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.update(ema="junk"), "ema is malformed (expected {'num_updates': int >= 0, 'config': dict}, found str"),
    (lambda c: c.update(ema={"num_updates": -4, "config": {}}), "ema is malformed"),
    (lambda c: c.update(state_dict_ema=[1, 2]), "state_dict_ema is not a state dict (name -> tensor) but list"),
    (_wrong_shape, "state_dict_ema: checkpoint does not fit ResNet: 1 shape mismatches: fc.weight (checkpoint [7, 7]"),
    (_missing_key, "state_dict_ema: checkpoint does not fit ResNet: 1 missing keys: fc.bias"),
    (lambda c: c.update(optimizer=[1, 2]), "its optimizer entry is malformed (expected a torch optimizer state_dict "
                                           "with 'state' and 'param_groups', found list)"),
    (_momentum_shape, "momentum_buffer of parameter 0 has shape [3]"),
], ids=["ema-type", "ema-counter", "ema-weights-type", "ema-shape", "ema-missing-key", "optimizer-type",
        "optimizer-shape"])
def test_a_malformed_checkpoint_entry_exits_2_before_writing(run_train, sgd_run, tmp_path, image_folder, edit,
                                                             expected):
    run = resume_copy(sgd_run, tmp_path, edit)
    assert expected in refused(run_train, run, image_folder)


def test_no_model_ema_on_a_checkpoint_with_an_ema_is_refused_without_drop_ema(run_train, sgd_run, tmp_path,
                                                                              image_folder):
    run = resume_copy(sgd_run, tmp_path)
    line = refused(run_train, run, image_folder, "--no-model-ema")
    assert line == (f"train.py: error: --resume {run / 'last.pth.tar'} holds 1 EMA(s) (state_dict_ema; 3 updates) "
                    "but this run has no --model-ema, so its checkpoints would lose them: pass --model-ema (and the "
                    "run's EMA flags) to continue, or --drop-ema to drop them")
    code, _, err = run_train([image_folder, *FAST_ARGS, "--epochs", "2", "--resume", run / "last.pth.tar",
                              "--no-model-ema", "--drop-ema"])
    assert code == 0, err
    assert "--drop-ema: the checkpoint's 1 EMA(s) (state_dict_ema, 3 updates) are not continued" in err
    ckpt = load(run / "last.pth.tar")
    assert ckpt["epoch"] == 1 and "state_dict_ema" not in ckpt


def test_a_changed_batch_on_resume_warns_what_changes(run_train, sgd_run, tmp_path, image_folder):
    run = resume_copy(sgd_run, tmp_path)
    # --epochs 1: the checkpoint finished it, so nothing trains; the warning comes at build time
    code, _, err = run_train([image_folder, *FAST_ARGS, "--epochs", "1", "--resume", run / "last.pth.tar", "-b", "4"])
    assert code == 0, err
    assert (f"--resume {run / 'last.pth.tar'}: -b 8 -> 4: lr 0.003125 -> 0.001563; steps per epoch 3 -> 6; the EMA "
            "time constant changes: each EMA step now averages 0.5x the images (give --model-ema-half-life in images, "
            "e.g. '1.2Mimg', to keep it fixed)") in err  # lr = lr-base 0.1 x global batch / 256
    code, _, err = run_train([image_folder, *FAST_ARGS, "--epochs", "1", "--resume", run / "last.pth.tar", "-b", "4",
                              "--grad-accum-steps", "2", "--model-ema-half-life", "48img"])
    assert code == 0, err
    assert ("-b 8 -> 4, --grad-accum-steps 1 -> 2: lr stays 0.003125 (same global batch); steps per epoch 3 -> 3; "
            "the EMA half-life (in images or epochs) stays the same") in err


@pytest.mark.parametrize("after", [0, 2])
@pytest.mark.parametrize("warmup", [False, True])
def test_copy_first_decays_equal_timms_get_decay_for_every_step(after, warmup):
    """``--model-ema-after N`` is timm's ``update_after_step=N``: the same decay at every step."""
    from timm.utils import ModelEmaV3

    from emakit import ModelEMA

    model = torch.nn.Linear(2, 2)
    ours = ModelEMA(model, decay=0.999, schedule="warmup" if warmup else "constant", update_after_step=after,
                    copy_first=True)
    theirs = ModelEmaV3(model, decay=0.999, update_after_step=after, use_warmup=warmup)
    assert [ours.decay_at(n) for n in range(1, 40)] == pytest.approx([theirs.get_decay(n) for n in range(1, 40)],
                                                                     abs=1e-12)
    assert ModelEMA(model, decay=0.999).decay_at(1) == 0.999  # the library default still blends


def test_an_optimizer_state_from_another_torch_with_fewer_options_still_fits():
    """torch adds optimizer options over versions and fills in their defaults on load: a
    state saved without one is the same optimizer, not another --opt."""
    from emakit.training.resume import _optimizer_mismatch

    model = torch.nn.Linear(3, 2)
    adamw, sgd = torch.optim.AdamW(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    older = adamw.state_dict()
    for group in older["param_groups"]:
        group.pop("fused", None), group.pop("capturable", None)
    assert _optimizer_mismatch(older, adamw) is None
    assert "differ from this optimizer's" in _optimizer_mismatch(sgd.state_dict(), adamw)
