"""timm's commands run unchanged: every option of timm's ``train.py`` / ``validate.py`` parses
with emakit's parsers, with timm's spelling, aliases, dest (its ``args.yaml`` key) and default;
and the flags whose use matters reach timm's own factories.

The option lists are pinned in ``tests/data/timm_{train,validate}_args.json``, taken from timm's
scripts by ``bench/timm_args.py`` (timm's scripts are not in the wheel and CI has no timm source).

Deliberate differences (also in docs/TIMM_DIFFERENCES.md)
---------------------------------------------------------
Defaults that differ from timm's (``DEFAULT_DIFFERENCES``):

| flag | timm | emakit | why |
|---|---|---|---|
| ``--val-split`` | validation | None | val/ or validation/, whichever the folder has |
| ``--device`` | cuda | None | cuda if available, else cpu (timm fails on a CPU-only machine) |
| ``--model-ema-decay`` | 0.9998 | None | 0.9998 unless ``--model-ema-half-life`` is given |
| ``--output`` | '' | ./output | timm's '' means ./output/train; a run folder goes under it either way |

Flags parsed with timm's default and refused otherwise (one line, exit 2: ``config.UNSUPPORTED``):

| flag | why |
|---|---|
| ``--torchscript`` | torch.jit is deprecated (timm deprecates it too); use ``--torchcompile`` |
| ``--model-dtype`` (not float32) | an EMA of float16/bfloat16 weights cannot move at decay 0.9998 |
| ``--epoch-repeats`` | timm applies it to iterable (tfds/wds) datasets only |
| ``--recovery-interval`` | a stop signal writes a resumable mid-epoch checkpoint instead |
| ``--train-img-sizes``, ``--train-*``, ``--variable-batch-loss-scale`` | timm's scheduled loader replaces |
|   | the data loader that emakit's exact mid-epoch resume relies on |
| ``--naflex-*`` | timm's NaFlex loader replaces the loader and the input format |
| ``--in-chans`` / ``--input-size`` C other than 3 | the loaders decode RGB images |
| ``--kd-distill-type feature`` | its projection layer trains outside the model: EMA, checkpoints, resume miss it |
| ``--kd-model-name`` with ``--fsdp`` | the teacher would be a full copy on every rank beside the sharded student |

No flag of timm's train.py or validate.py is unknown (the data-source and wandb flags included).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from emakit.training import UsageError

DATA = Path(__file__).resolve().parent / "data"
TRAIN_OPTIONS = json.loads((DATA / "timm_train_args.json").read_text())["options"]
VALIDATE_OPTIONS = json.loads((DATA / "timm_validate_args.json").read_text())["options"]

DEFAULT_DIFFERENCES = {  # flag -> why emakit's default differs (table above)
    "--val-split": "val/ or validation/, whichever exists",
    "--device": "cuda if available, else cpu",
    "--model-ema-decay": "0.9998 unless --model-ema-half-life is given",
    "--output": "timm's '' is ./output/train; ours is ./output",
    "--wandb-tags": "None = no tags, as timm's []; a YAML [] reads back as a config",
}
VALIDATE_DEFAULT_DIFFERENCES = {  # docs/TIMM_DIFFERENCES.md: validate.py
    "--split": "the checkpoint's --val-split, else val/ or validation/",
    "--model": "the checkpoint's training model (timm: dpn92)",
    "-j": "0 = the main process, as train.py's digits preset (timm: 4)",
    "--interpolation": "None = the checkpoint's training interpolation, else the model's (timm's '' = the model's)",
    "--checkpoint": "None = no checkpoint: the model's pretrained weights, as timm's ''",
    "--results-file": "None = none, as timm's ''",
    "--results-format": "json when --results-file ends in .json, else csv",
    "--real-labels": "None = off, as timm's ''",
    "--valid-labels": "None = off, as timm's ''",
}


def _param(option: dict):
    return pytest.param(option, id=option["names"][0])


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {name: a for a in parser._actions for name in (a.option_strings or [a.dest])}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _check_option(option: dict, parser: argparse.ArgumentParser, differences: dict[str, str]) -> None:
    actions = _actions(parser)
    names = option["names"]
    missing = [n for n in names if n not in actions]
    assert not missing, f"unknown to emakit: {missing}"
    action = actions[names[0]]
    assert all(actions[n] is action for n in names), f"{names} are not aliases of one flag"
    assert action.dest == option["dest"], "the dest (timm's args.yaml key) differs"
    if names[0] not in differences:
        assert _plain(action.default) == option["default"], (
            f"default {action.default!r}, timm's {option['default']!r}")
    if option["choices"]:
        assert set(option["choices"]) <= set(action.choices or option["choices"])


@pytest.fixture(scope="module")
def train_parser() -> argparse.ArgumentParser:
    from emakit.training.config import build_parser

    return build_parser()


@pytest.mark.parametrize("option", [_param(o) for o in TRAIN_OPTIONS])
def test_timm_train_option_parses_with_timms_default(option: dict, train_parser: argparse.ArgumentParser) -> None:
    _check_option(option, train_parser, DEFAULT_DIFFERENCES)


@pytest.mark.parametrize("option", [_param(o) for o in VALIDATE_OPTIONS])
def test_timm_validate_option_parses_with_timms_default(option: dict) -> None:
    from emakit.training.validate_config import build_parser

    _check_option(option, build_parser(), {**DEFAULT_DIFFERENCES, **VALIDATE_DEFAULT_DIFFERENCES})


def test_no_train_or_validate_flag_of_timm_is_unknown(train_parser: argparse.ArgumentParser) -> None:
    from emakit.training.validate_config import build_parser

    for options, parser in ((TRAIN_OPTIONS, train_parser), (VALIDATE_OPTIONS, build_parser())):
        actions = _actions(parser)
        assert not {n for o in options for n in o["names"] if n not in actions}


def test_timm_args_yaml_reads_as_config(tmp_path: Path) -> None:
    """A timm args.yaml (every train.py dest at timm's default, as timm writes it) is a valid --config."""
    from emakit.training.config import parse_settings

    values = {o["dest"]: o["default"] for o in TRAIN_OPTIONS
              if o["dest"] != "config"}
    values.update(device="cpu", data_dir=str(tmp_path), model_kwargs={"zero_init_last": False},  # a CPU run's
                  opt_kwargs={"betas": [0.9, 0.95]})
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(values))
    settings = parse_settings(["--config", str(path)])
    assert dict(settings.model.kwargs) == {"zero_init_last": False} and settings.schedule.decay_rate == 0.1
    assert dict(settings.optim.kwargs) == {"betas": [0.9, 0.95]}
    assert settings.schedule.noise is None and settings.loaders.naflex_train_seq_lens == (128, 256, 576, 784, 1024)


# --------------------------------------------------------------------------- parsing
def _settings(tmp_path: Path, *flags: str):
    from emakit.training.config import parse_settings

    return parse_settings([str(tmp_path), *flags])


def test_dr_is_decay_rate(tmp_path: Path) -> None:
    assert _settings(tmp_path, "--dr", "0.5").schedule.decay_rate == 0.5
    assert _settings(tmp_path, "--decay-rate", "0.25").schedule.decay_rate == 0.25


def test_kwargs_flags_read_python_literals_as_timm(tmp_path: Path) -> None:
    s = _settings(tmp_path, "--model-kwargs", "img_size=240", "act_layer=gelu", "--opt-kwargs", "betas=(0.8,0.9)")
    assert dict(s.model.kwargs) == {"img_size": 240, "act_layer": "gelu"}  # timm's ParseKwargs
    assert dict(s.optim.kwargs) == {"betas": (0.8, 0.9)}
    with pytest.raises(UsageError, match="--model-kwargs: 'img_size' is not KEY=VALUE"):
        _settings(tmp_path, "--model-kwargs", "img_size")


REFUSED = [("--torchscript",), ("--model-dtype", "bfloat16"), ("--epoch-repeats", "2"), ("--recovery-interval", "10"),
           ("--train-img-sizes", "224", "256"), ("--train-batches-per-epoch", "100"),
           ("--variable-batch-loss-scale", "sqrt"), ("--naflex-loader",), ("--naflex-max-seq-len", "256"),
           ("--in-chans", "1"), ("--input-size", "1", "32", "32")]


@pytest.mark.parametrize("flags", REFUSED, ids=[f[0] for f in REFUSED])
def test_unsupported_timm_flag_is_refused_in_one_line(flags: tuple[str, ...], tmp_path: Path) -> None:
    with pytest.raises(UsageError) as e:
        _settings(tmp_path, *flags)
    assert str(e.value).startswith(flags[0].split("/")[0]) or flags[0] in str(e.value)
    assert "\n" not in str(e.value)


def test_unsupported_flags_at_timms_default_are_accepted(tmp_path: Path) -> None:
    s = _settings(tmp_path, "--model-dtype", "float32", "--naflex-max-seq-len", "576",
                  "--in-chans", "3", "--input-size", "3", "32", "32", "--local_rank", "3")
    assert s.model.input_size == (3, 32, 32) and s.run.local_rank == 3


def test_jsd_loss_needs_aug_splits(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--jsd-loss needs --aug-splits"):
        _settings(tmp_path, "--jsd-loss")


# --------------------------------------------------------------------------- the model
CPU = torch.device("cpu")


def test_model_kwargs_img_size_builds_a_vit_at_240(tmp_path: Path) -> None:
    """timm's documented ViT fine-tune at another resolution: --model-kwargs img_size=240."""
    from emakit.training.build import build_train_model, train_data_config

    s = _settings(tmp_path, "--model", "vit_tiny_patch16_224", "--img-size", "240", "--model-kwargs", "img_size=240")
    model = build_train_model(s.model, 3, CPU).eval()
    config = train_data_config(model, s.data, s.model)
    assert config["input_size"] == (3, 240, 240)
    with torch.no_grad():
        assert model(torch.zeros(1, *config["input_size"])).shape == (1, 3)


def test_model_factory_flags_reach_create_model(tmp_path: Path) -> None:
    from emakit.training.build import build_train_model

    s = _settings(tmp_path, "--model", "test_resnet", "--gp", "max", "--drop-block", "0.1", "--drop-connect", "0.05",
                  "--head-init-scale", "0.0", "--head-init-bias", "0.5", "--grad-checkpointing")
    model = build_train_model(s.model, 3, CPU)
    assert model.global_pool.pool_type == "max"
    assert any(type(m).__name__ == "DropBlock2d" for m in model.modules())
    assert any(getattr(m, "drop_prob", 0) == pytest.approx(0.05) for m in model.modules()
               if type(m).__name__ == "DropPath")  # --drop-connect: timm's old name of --drop-path
    head = model.get_classifier()
    assert torch.all(head.weight == 0) and torch.all(head.bias == 0.5)
    assert model.grad_checkpointing


def test_bn_flags_reach_the_models_that_take_them(tmp_path: Path) -> None:
    """timm: "only works with gen_efficientnet based models"; another model refuses them (one line)."""
    from emakit.training.build import build_train_model

    model = build_train_model(_settings(tmp_path, "--model", "test_efficientnet", "--bn-momentum", "0.2",
                                        "--bn-eps", "1e-3").model, 3, CPU)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (bn.momentum, bn.eps) == (0.2, 1e-3)
    with pytest.raises(UsageError, match="unexpected keyword argument 'bn_momentum'"):
        build_train_model(_settings(tmp_path, "--model", "test_resnet", "--bn-momentum", "0.2").model, 3, CPU)


def test_input_size_sets_the_data_config(tmp_path: Path) -> None:
    from emakit.training.build import build_train_model, train_data_config

    s = _settings(tmp_path, "--model", "test_resnet", "--img-size", "32", "--input-size", "3", "48", "40")
    model = build_train_model(s.model, 3, CPU)
    assert train_data_config(model, s.data, s.model)["input_size"] == (3, 48, 40)  # wins over --img-size


def test_initial_checkpoint_loads_the_weights(tmp_path: Path) -> None:
    import timm

    from emakit.training.build import build_train_model

    source = timm.create_model("test_resnet", num_classes=3)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    s = _settings(tmp_path, "--model", "test_resnet", "--initial-checkpoint", str(path), "--seed", "7")
    model = build_train_model(s.model, 3, CPU)
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UsageError, match="--initial-checkpoint .*: no such file"):
        build_train_model(_settings(tmp_path, "--initial-checkpoint", str(tmp_path / "missing.pth")).model, 3, CPU)


def test_sync_bn_converts_batchnorm_when_several_processes_train(tmp_path: Path) -> None:
    from emakit.training.build import build_train_model, convert_sync_bn
    from emakit.training.distributed import DistInfo

    s = _settings(tmp_path, "--model", "test_resnet", "--sync-bn", "--no-ddp-bb")
    assert s.parallel.ddp_broadcast_buffers is False and s.flags["no_ddp_bb"] is True  # timm's dest
    model = build_train_model(s.model, 3, CPU)
    assert convert_sync_bn(model, DistInfo(), s.parallel) is model  # one process: nothing to sync
    synced = convert_sync_bn(model, DistInfo(world_size=2), s.parallel)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())


def test_fast_norm_and_device_modules(tmp_path: Path) -> None:
    from timm.layers import is_fast_norm, set_fast_norm

    from emakit.training.build import build_train_model, import_device_modules

    try:
        build_train_model(_settings(tmp_path, "--model", "test_resnet", "--fast-norm").model, 3, CPU)
        assert is_fast_norm()
    finally:
        set_fast_norm(False)
    import_device_modules(["json"])
    with pytest.raises(UsageError, match="--device-modules no_such_backend_xyz: cannot import it"):
        import_device_modules(["no_such_backend_xyz"])


def test_torchcompile_mode_reaches_torch_compile(tmp_path: Path, monkeypatch) -> None:
    from emakit.training.build import compile_model

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, _settings(tmp_path).model) is model and not calls
    compile_model(model, _settings(tmp_path, "--torchcompile", "--torchcompile-mode", "max-autotune").model)
    assert calls == [{"backend": "inductor", "mode": "max-autotune"}]


def test_a_model_refusing_a_factory_flag_is_one_line(tmp_path: Path) -> None:
    from emakit.training.build import build_train_model

    with pytest.raises(UsageError, match="refused its arguments"):
        build_train_model(_settings(tmp_path, "--model", "test_resnet", "--gp", "no_such_pool").model, 3, CPU)


# --------------------------------------------------------------------------- optimizer, schedule, loss
def _timm_args(**overrides) -> argparse.Namespace:
    """timm's train.py args: every dest at timm's pinned default, then ``overrides``."""
    values = {o["dest"]: o["default"] for o in TRAIN_OPTIONS}
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("min_scale,no_opt_scale", [(0.2, None), (0.0, 0.3)], ids=["min-scale", "no-opt-scale"])
def test_optimizer_flags_reach_create_optimizer_v2(min_scale: float, no_opt_scale: float | None,
                                                   tmp_path: Path) -> None:
    """Param groups (lr scale, weight decay, parameters) as timm's train.py makes them."""
    import timm
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    from emakit.training.build import build_optimizer

    flags = dict(opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5, layer_decay_min_scale=min_scale,
                 layer_decay_no_opt_scale=no_opt_scale)
    no_opt = ["--layer-decay-no-opt-scale", str(no_opt_scale)] if no_opt_scale else []
    s = _settings(tmp_path, "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05", "--layer-decay", "0.5",
                  "--layer-decay-min-scale", str(min_scale), *no_opt, "--opt-kwargs", "amsgrad=True", "--no-opt-fused")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=3)
    ours = build_optimizer(s.optim, model, 1e-3)
    theirs = create_optimizer_v2(model, **optimizer_kwargs(_timm_args(**flags)), amsgrad=True)  # timm's train.py
    assert type(ours) is type(theirs) and ours.defaults["amsgrad"] is True

    def groups(opt):
        return [(g["lr_scale"], g["weight_decay"], [id(p) for p in g["params"] if p.requires_grad])
                for g in opt.param_groups]
    assert groups(ours) == groups(theirs)
    scales = [g["lr_scale"] for g in ours.param_groups]
    if min_scale:
        assert min(scales) == min_scale  # clamped: 0.5 ** depth goes below it
    else:
        assert min(scales) >= no_opt_scale  # the layers scaled below it are not optimized


SCHEDULES = {
    "cosine-cycles-k-decay": (["--sched", "cosine", "--epochs", "6", "--lr-cycle-limit", "3", "--lr-cycle-mul", "2",
                               "--lr-cycle-decay", "0.7", "--lr-k-decay", "2", "--warmup-epochs", "1",
                               "--cooldown-epochs", "2"],
                              dict(sched="cosine", epochs=6, lr_cycle_limit=3, lr_cycle_mul=2.0, lr_cycle_decay=0.7,
                                   lr_k_decay=2.0, warmup_epochs=1, cooldown_epochs=2)),
    "noise": (["--sched", "cosine", "--epochs", "20", "--lr-noise", "0.3", "0.8", "--lr-noise-pct", "0.5",
               "--lr-noise-std", "0.8", "--seed", "3"],
              dict(sched="cosine", epochs=20, lr_noise=[0.3, 0.8], lr_noise_pct=0.5, lr_noise_std=0.8, seed=3)),
    "step-dr": (["--sched", "step", "--epochs", "12", "--decay-epochs", "3", "--dr", "0.5", "--warmup-epochs", "0"],
                dict(sched="step", epochs=12, decay_epochs=3.0, decay_rate=0.5, warmup_epochs=0)),
    "poly-k-decay-cycles": (["--sched", "poly", "--epochs", "5", "--lr-k-decay", "0.5", "--lr-cycle-limit", "2",
                             "--warmup-prefix"],
                            dict(sched="poly", epochs=5, lr_k_decay=0.5, lr_cycle_limit=2, warmup_prefix=True)),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_flags_give_timms_lr_at_every_epoch(name: str, tmp_path: Path) -> None:
    """LR per epoch (and the number of epochs) as timm's train.py: create_scheduler_v2(**scheduler_kwargs(args))."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    from emakit.training.build import build_scheduler, scheduled_epochs

    flags, timm_flags = SCHEDULES[name]
    s = _settings(tmp_path, *flags, "--lr", "0.1")
    args = _timm_args(lr=0.1, **timm_flags)

    def lrs(scheduler, optimizer, epochs):
        out = []
        for epoch in range(epochs):
            scheduler.step(epoch)
            out.append(optimizer.param_groups[0]["lr"])
        return out

    ours_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    theirs_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ours = build_scheduler(s.schedule, ours_opt, 10, seed=s.run.seed)
    theirs, epochs = create_scheduler_v2(theirs_opt, **scheduler_kwargs(args, decreasing_metric=False),
                                         updates_per_epoch=10)
    assert scheduled_epochs(s.schedule) == epochs
    assert lrs(ours, ours_opt, epochs) == lrs(theirs, theirs_opt, epochs)


def _loss(tmp_path: Path, *flags: str):
    from emakit.training.build import build_losses

    return build_losses(_settings(tmp_path, *flags).loss, 3, CPU)[0]


def test_bce_loss_is_timms_binary_cross_entropy(tmp_path: Path) -> None:
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixed = _loss(tmp_path, "--bce-loss", "--bce-target-thresh", "0.2", "--bce-sum", "--bce-pos-weight", "2",
                  "--mixup", "0.8")
    assert isinstance(mixed, BinaryCrossEntropy)
    assert (mixed.target_threshold, mixed.sum_classes, float(mixed.pos_weight)) == (0.2, True, 2.0)
    assert mixed.smoothing == BinaryCrossEntropy().smoothing  # timm's train.py passes no smoothing with mixup
    smoothed = _loss(tmp_path, "--bce-loss", "--smoothing", "0.05")
    assert isinstance(smoothed, BinaryCrossEntropy) and smoothed.smoothing == 0.05
    assert isinstance(_loss(tmp_path, "--mixup", "0.8"), SoftTargetCrossEntropy)
    assert isinstance(_loss(tmp_path, "--smoothing", "0.1"), LabelSmoothingCrossEntropy)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_lr_cycles_train_timms_scheduled_epochs(run_train, image_folder: Path, tmp_path: Path) -> None:
    """--lr-cycle-limit 2 with --epochs 1 trains 2 epochs, as timm's train.py (num_epochs of the scheduler)."""
    from conftest import FAST_ARGS

    code, out, err = run_train([str(image_folder), *FAST_ARGS, "--epochs", "1", "--lr-cycle-limit", "2",
                                "--output", str(tmp_path), "--experiment", "cycles", "--warmup-epochs", "0",
                                "--model-kwargs", "zero_init_last=False", "--opt-kwargs", "nesterov=True"])
    assert code == 0, err
    rows = (tmp_path / "cycles" / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2


# --------------------------------------------------------------------------- distillation
def test_kd_from_the_runs_ema_is_timms_logit_distillation(tmp_path: Path) -> None:
    """--kd-model-name ema: timm's LogitDistillationTask with this run's EMA as the teacher; the
    loop's step computes task loss + T^2 KL(teacher || student), checked by a formula here."""
    import torch.nn.functional as F

    from emakit.training.build import build_averages, build_distillation, build_losses, build_train_model
    from emakit.training.distributed import DistInfo
    from emakit.training.engine import TrainOptions, _forward_backward
    from emakit.training.settings import Resolved

    s = _settings(tmp_path, "--model", "test_resnet", "--model-ema", "--kd-model-name", "ema", "--kd-temperature",
                  "2", "--distill-loss-weight", "0.7", "--task-loss-weight", "0.4", "--smoothing", "0")
    torch.manual_seed(0)
    model = build_train_model(s.model, 3, CPU)
    resolved = Resolved(num_classes=3, lr=0.1, updates_per_epoch=1, total_steps=1, img_size=32,
                        global_batch_size=4, epochs=1)
    averages = build_averages(s.ema, model, DistInfo(), resolved)
    teacher = averages.members[0].module
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the EMA lags the model
    criterion = build_losses(s.loss, 3, CPU)[0]
    task = build_distillation(s.loss.distill, model, model, criterion, CPU, averages=averages)
    inputs, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    model.train()
    loss = _forward_backward(model, inputs, target, task, TrainOptions(run=s.run, optim=s.optim), CPU, 1, True)
    with torch.no_grad():
        student, ema = model(inputs), teacher(inputs)
        kl = F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(ema / 2, -1), reduction="batchmean",
                      log_target=True) * 4
        expected = 0.4 * F.cross_entropy(student, target) + 0.7 * kl
    assert kl > 0 and float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_with_a_named_teacher_asks_timm_for_its_pretrained_weights(tmp_path: Path, monkeypatch) -> None:
    from emakit.training.build import build_distillation

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = {}

    def fake_create_model(model_name, **kwargs):  # what timm's DistillationTeacher asks the factory for
        seen.update(kwargs, name=model_name)
        raise RuntimeError("offline")

    monkeypatch.setattr("timm.task.distillation.create_model", fake_create_model)
    s = _settings(tmp_path, "--kd-model-name", "test_resnet")
    with pytest.raises(UsageError, match="--kd-model-name test_resnet: cannot build the teacher"):
        build_distillation(s.loss.distill, torch.nn.Identity(), __import__("timm").create_model("test_resnet"),
                           torch.nn.CrossEntropyLoss(), CPU)
    assert seen["name"] == "test_resnet" and seen["pretrained"] is True


@pytest.mark.parametrize("flags,match", [(("--kd-model-name", "ema"), "add --model-ema"),
                                         (("--kd-model-name", "x", "--kd-distill-type", "feature"), "feature is not")])
def test_kd_refusals(flags: tuple[str, ...], match: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=match):
        _settings(tmp_path, *flags)


@pytest.mark.slow
def test_self_distillation_from_the_ema_trains(run_train, image_folder: Path, tmp_path: Path) -> None:
    """The EMA teacher changes the training loss (the same seeded run without it differs)."""
    from conftest import FAST_ARGS

    losses = {}
    for name, extra in (("kd", ["--kd-model-name", "ema"]), ("plain", [])):
        code, out, err = run_train([str(image_folder), *FAST_ARGS, "--epochs", "1", *extra, "--output", str(tmp_path),
                                    "--experiment", name])
        assert code == 0, err
        header, row = (tmp_path / name / "summary.csv").read_text().strip().splitlines()[:2]
        losses[name] = float(row.split(",")[header.split(",").index("train_loss")])
    assert "distillation: logit from this run's EMA" in (tmp_path / "kd" / "train.log").read_text()
    assert losses["kd"] != losses["plain"]


@pytest.mark.slow
def test_start_epoch_starts_there_with_its_lr(run_train, image_folder: Path, tmp_path: Path) -> None:
    """--start-epoch 2 of --epochs 3 trains epoch 2 only, at the schedule's LR of epoch 2 (timm)."""
    from conftest import FAST_ARGS

    code, out, err = run_train([str(image_folder), *FAST_ARGS, "--epochs", "3", "--start-epoch", "2",
                                "--warmup-epochs", "0", "--lr", "0.1", "--output", str(tmp_path),
                                "--experiment", "start"])
    assert code == 0, err
    header, *rows = (tmp_path / "start" / "summary.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows] == ["2"]
    lr = float(rows[0].split(",")[header.split(",").index("lr")])
    # cosine at epoch 2 of 3 with no warmup: 0.1 * (1 + cos(pi * 2 / 3)) / 2
    assert lr == pytest.approx(0.025)


@pytest.mark.slow
def test_refused_flag_exits_2_in_one_line_leaving_nothing(run_train, image_folder: Path, tmp_path: Path) -> None:
    from conftest import FAST_ARGS

    code, out, err = run_train([str(image_folder), *FAST_ARGS, "--naflex-loader", "--output", str(tmp_path / "out")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--naflex-loader" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_val_interval_validates_and_checkpoints_every_nth_and_the_last_epoch(run_train, image_folder: Path,
                                                                             tmp_path: Path) -> None:
    """timm's --val-interval 2 over 3 epochs: epochs 1 and 2 (the last) are validated and written."""
    from conftest import FAST_ARGS

    import emakit.checkpoint as ckpt

    code, out, err = run_train([str(image_folder), *FAST_ARGS, "--epochs", "3", "--val-interval", "2",
                                "--output", str(tmp_path), "--experiment", "vi", "--warmup-epochs", "0"])
    assert code == 0, err
    rows = (tmp_path / "vi" / "summary.csv").read_text().strip().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2"]
    assert int(ckpt.load_checkpoint(str(tmp_path / "vi" / "last.pth.tar"))["epoch"]) == 2
