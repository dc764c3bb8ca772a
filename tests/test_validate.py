"""validate.py: raw/EMA evaluation of checkpoints in every format, errors, export, post-hoc sweeps.

Expectations are independent of the code under test: each weight set is also scored by a
plain loop written here (fresh timm model, PIL -> tensor by hand, argmax and cross-entropy
in float64), tensors are compared with the ones the test built, timm's own loaders read
the files, and train.py's summary.csv is the reference for what training logged.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CLASSES, REPO, count_images, make_image_folder, subprocess_env
from conftest import load_images as _load_images
from conftest import plain_eval as _plain_eval

timm = pytest.importorskip("timm")

import validate  # noqa: E402  (the CLI at the repository root; conftest puts it on sys.path)
from emakit.checkpoint import save_checkpoint  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# The eval transform is the identity resize/crop for 32 px images: scale 32 / crop 1.0.
TRAIN_ARGS = {"model": "test_resnet", "num_classes": 3, "img_size": 32, "crop_pct": 1.0,
              "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear"}
DATA_FLAGS = ["--img-size", "32", "--crop-pct", "1.0", "--mean", *map(str, MEAN), "--std", *map(str, STD)]


# --------------------------------------------------------------------------- helpers
def _weights(seed: int, num_classes: int = 3, arch: str = "test_resnet") -> dict[str, torch.Tensor]:
    """A distinct, deterministic state dict (BN statistics randomised too)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.add_(0.2 * torch.randn(t.shape, generator=g))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _run(capsys, argv: list) -> tuple[int, str, str]:
    capsys.readouterr()
    code = validate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _assert_matches(record: dict, expected: dict) -> None:
    assert record["samples"] == expected["samples"]
    assert record["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert record["top5"] == pytest.approx(expected["top5"], abs=1e-9)
    # validate's loss is float32 cross-entropy, the reference float64
    assert record["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)


def _our_checkpoint(path: Path, raw: dict, ema: dict | None, args: dict | None = None, epoch: int = 4) -> Path:
    state = {"epoch": epoch, "arch": "test_resnet", "version": 2, "state_dict": raw,
             "args": dict(TRAIN_ARGS if args is None else args), "metric": 0.0, "metrics": {}}
    if ema is not None:
        state.update(state_dict_ema=ema, ema={"num_updates": 10, "config": {"decay": 0.99}})
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("valdata"), train_per_class=2, val_per_class=4)


@pytest.fixture(scope="module")
def val_batch(data) -> tuple[torch.Tensor, torch.Tensor]:
    return _load_images(data / "val")


@pytest.fixture(scope="module")
def raw_ema() -> tuple[dict, dict]:
    return _weights(1), _weights(2)


# --------------------------------------------------------------------------- settings
def test_the_command_line_becomes_frozen_settings_with_every_derived_value_resolved(tmp_path):
    import dataclasses

    from emakit.training.validate_config import ValidateSettings, parse_args

    s = parse_args(["DIR", "--checkpoint", "c.pth", "--use-ema", "--img-size", "48", "--amp", "--amp-dtype",
                    "bfloat16", "--no-progress", "--results-file", str(tmp_path / "r.JSON"), "-b", "7"])
    assert isinstance(s, ValidateSettings)
    assert (s.weights.weights, s.weights.sets) == ("ema", ("ema",))  # --use-ema resolved
    assert s.outputs.results_format == "json"  # from the file name, case-insensitively
    assert s.runtime.amp_dtype is torch.bfloat16 and s.runtime.amp and not s.runtime.progress
    assert dict(s.data.overrides) == {"img_size": 48}  # only the eval-transform flags given
    assert (s.data.root, s.data.batch_size, s.posthoc.sigma_rels) == ("DIR", 7, ())
    both = parse_args(["--checkpoint", "c.pth", "--weights", "both", "--posthoc-sigma-rel", "0.05,0.1"])
    assert both.weights.sets == ("raw", "ema") and both.posthoc.sigma_rels == (0.05, 0.1)
    assert both.outputs.results_format == "csv" and both.runtime.amp_dtype is torch.float16
    for holder, name in ((s, "weights"), (s.weights, "weights"), (s.outputs, "results_format")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(holder, name, "raw")
    with pytest.raises(TypeError):
        s.data.overrides["img_size"] = 64  # read-only mapping


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "c", "--posthoc-sigma-rel", "0.05,x"],
     "--posthoc-sigma-rel: 'x' is not a number (e.g. 0.02,0.05,0.1)"),
    (["--checkpoint", "c", "--posthoc-sigma-rel", "0.1,0.1000001"],
     "--posthoc-sigma-rel lists a value twice (values must differ in the first 6 decimals): 0.1,0.1"),
    (["--checkpoint", "c", "--use-ema", "--weights", "raw"],
     "--use-ema conflicts with --weights raw; give one of them"),
    (["--checkpoint", "c", "--weights", "emma"], "--weights 'emma': use raw, ema, both or ema:N"),
    (["--checkpoint", "c", "--posthoc-sigma-rel", "0.1", "--export-ema", "e.safetensors"],
     "--export-ema exports a checkpoint's EMA; with --posthoc-sigma-rel use --posthoc-save"),
    (["--posthoc-sigma-rel", "0.1", "--model", "test_resnet"],
     "--posthoc-sigma-rel needs --checkpoint (the run's checkpoint), or --posthoc-dir and --model"),
])
def test_conflicting_flags_are_one_line_usage_errors_before_anything_runs(argv, message):
    from emakit.training import UsageError
    from emakit.training.validate_config import parse_args

    with pytest.raises(UsageError) as info:
        parse_args(argv)
    assert str(info.value) == message


# --------------------------------------------------------------------------- our files, --weights
def test_weights_both_prints_raw_and_ema_side_by_side_and_each_matches_a_plain_loop(
        tmp_path, capsys, data, val_batch, raw_ema):
    raw, ema = raw_ema
    ckpt = _our_checkpoint(tmp_path / "last.pth.tar", raw, ema)
    code, out, err = _run(capsys, [data, "--checkpoint", ckpt, "--weights", "both"])
    assert code == 0, err
    records = _json_lines(out)
    assert [r["weights"] for r in records] == ["raw", "ema"]
    _assert_matches(records[0], _plain_eval(raw, *val_batch))
    _assert_matches(records[1], _plain_eval(ema, *val_batch))
    assert records[0]["loss"] != records[1]["loss"]  # two different weight sets were scored
    header = next(line for line in out.splitlines() if "raw" in line and "ema" in line)
    assert header.split() == ["raw", "ema", "ema-raw"]
    for field in ("model", "checkpoint", "weights", "top1", "top1_err", "top5", "top5_err", "loss",
                  "param_count", "img_size", "samples"):
        assert field in records[0], field
    assert records[1]["top1_err"] == pytest.approx(100.0 - records[1]["top1"])
    assert records[0]["img_size"] == 32 and records[0]["model"] == "test_resnet" and records[0]["epoch"] == 4


def test_use_ema_is_weights_ema_and_conflicts_with_weights_raw(tmp_path, capsys, data, val_batch, raw_ema):
    ckpt = _our_checkpoint(tmp_path / "c.pth.tar", *raw_ema)
    code, out, _ = _run(capsys, [data, "--checkpoint", ckpt, "--use-ema"])
    assert code == 0
    (record,) = _json_lines(out)
    assert record["weights"] == "ema"
    _assert_matches(record, _plain_eval(raw_ema[1], *val_batch))
    code, out, err = _run(capsys, [data, "--checkpoint", ckpt, "--use-ema", "--weights", "raw"])
    assert code == 2 and "--use-ema conflicts with --weights raw" in err and out == ""


def test_extra_ema_is_selected_by_index(tmp_path, capsys, data, val_batch, raw_ema):
    extra = _weights(3)
    path = tmp_path / "multi.pth.tar"
    save_checkpoint({"epoch": 0, "arch": "test_resnet", "state_dict": raw_ema[0], "state_dict_ema": raw_ema[1],
                     "state_dict_ema_1": extra, "args": TRAIN_ARGS}, path)
    code, out, _ = _run(capsys, [data, "--checkpoint", path, "--weights", "ema:1"])
    assert code == 0
    _assert_matches(_json_lines(out)[0], _plain_eval(extra, *val_batch))


# --------------------------------------------------------------------------- foreign formats
def test_timm_load_checkpoint_reads_our_ema_weights(tmp_path, raw_ema):
    ckpt = _our_checkpoint(tmp_path / "ours.pth.tar", *raw_ema)
    model = timm.create_model("test_resnet", num_classes=3)
    timm.models.load_checkpoint(model, str(ckpt), use_ema=True)
    for key, value in raw_ema[1].items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_timm_format_with_namespace_args_and_wrapper_prefixes_is_read_with_the_right_weights(
        tmp_path, capsys, data, val_batch, raw_ema, prefix):
    raw, ema = raw_ema
    # timm's CheckpointSaver: arch is the class name, args an argparse.Namespace.
    args = argparse.Namespace(**TRAIN_ARGS, input_size=None, data_dir=str(data))
    path = tmp_path / "timm.pth.tar"
    torch.save({"epoch": 7, "arch": "resnet", "version": 2, "args": args, "metric": 1.0,
                "state_dict": {prefix + k: v for k, v in raw.items()},
                "state_dict_ema": {prefix + k: v for k, v in ema.items()}}, path)
    code, out, err = _run(capsys, [data, "--checkpoint", path, "--weights", "both"])
    assert code == 0, err
    raw_rec, ema_rec = _json_lines(out)
    _assert_matches(raw_rec, _plain_eval(raw, *val_batch))
    _assert_matches(ema_rec, _plain_eval(ema, *val_batch))
    assert raw_rec["model"] == "test_resnet" and raw_rec["img_size"] == 32


def test_supergradients_net_and_ema_net_are_read_with_the_right_weights(tmp_path, capsys, data, val_batch, raw_ema):
    raw, ema = raw_ema
    path = tmp_path / "ckpt_best.pth"
    torch.save({"net": {"module." + k: v for k, v in raw.items()}, "ema_net": {"module." + k: v for k, v in ema.items()},
                "epoch": 3, "acc": 0.5}, path)
    # No args in the file: model and transform from flags, class count from the classifier shape.
    code, out, err = _run(capsys, [data, "--checkpoint", path, "--model", "test_resnet", "--weights", "both",
                                   *DATA_FLAGS])
    assert code == 0, err
    raw_rec, ema_rec = _json_lines(out)
    _assert_matches(raw_rec, _plain_eval(raw, *val_batch))
    _assert_matches(ema_rec, _plain_eval(ema, *val_batch))


def test_torchvision_model_ema_with_module_prefix_and_n_averaged_is_read(tmp_path, capsys, data, val_batch, raw_ema):
    raw, ema = raw_ema
    model_ema = {"n_averaged": torch.tensor(42), **{"module." + k: v for k, v in ema.items()}}
    path = tmp_path / "model_9.pth"
    torch.save({"model": raw, "model_ema": model_ema, "optimizer": {}, "epoch": 9,
                "args": argparse.Namespace(model="test_resnet", num_classes=None)}, path)
    code, out, err = _run(capsys, [data, "--checkpoint", path, "--use-ema", *DATA_FLAGS])
    assert code == 0, err
    _assert_matches(_json_lines(out)[0], _plain_eval(ema, *val_batch))


# --------------------------------------------------------------------------- errors
class _TouchMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("validate.py: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_pickle_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path, capsys, data, raw_ema):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": raw_ema[0], "args": _TouchMarker(marker)}, path)
    code, out, err = _run(capsys, [data, "--checkpoint", path])
    assert code == 2 and out == ""
    assert "refusing to load" in _one_error_line(err)
    assert not marker.exists()


@pytest.mark.slow
def test_pickle_that_would_run_code_is_refused_in_a_child_process_too(tmp_path, data, raw_ema):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": raw_ema[0], "args": _TouchMarker(marker)}, path)
    proc = subprocess.run([sys.executable, str(REPO / "validate.py"), str(data), "--checkpoint", str(path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("validate.py: error: refusing to load")
    assert not marker.exists()


def test_truncated_checkpoint_is_a_one_line_error(tmp_path, capsys, data, raw_ema):
    good = _our_checkpoint(tmp_path / "good.pth.tar", *raw_ema)
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, out, err = _run(capsys, [data, "--checkpoint", bad])
    line = _one_error_line(err)
    assert code == 2 and out == ""
    assert str(bad) in line and "truncated" in line


def test_wrong_architecture_names_the_first_mismatching_keys(tmp_path, capsys, data, raw_ema):
    ckpt = _our_checkpoint(tmp_path / "c.pth.tar", *raw_ema)
    code, _, err = _run(capsys, [data, "--checkpoint", ckpt, "--model", "test_efficientnet"])
    line = _one_error_line(err)
    assert code == 2
    assert "missing keys: conv_stem.weight" in line and "unexpected keys: conv1.0.weight" in line
    assert "--model" in line


def test_wrong_class_count_names_the_classifier_shape_mismatch(tmp_path, capsys, data, raw_ema):
    ckpt = _our_checkpoint(tmp_path / "c.pth.tar", *raw_ema)
    code, _, err = _run(capsys, [data, "--checkpoint", ckpt, "--num-classes", "5"])
    line = _one_error_line(err)
    assert code == 2 and "fc.weight (checkpoint [3, " in line and "vs model [5, " in line


def test_data_with_more_classes_than_the_model_is_an_error(tmp_path, capsys, raw_ema):
    root = make_image_folder(tmp_path / "wide", classes=("a", "b", "c", "d"), train_per_class=1, val_per_class=1)
    ckpt = _our_checkpoint(tmp_path / "c.pth.tar", *raw_ema)
    code, _, err = _run(capsys, [root, "--checkpoint", ckpt])
    assert code == 2 and "labels up to 3" in _one_error_line(err) and "3 outputs" in err


def test_use_ema_on_a_file_without_ema_says_so_lists_keys_and_does_not_fall_back(tmp_path, capsys, data, raw_ema):
    ckpt = _our_checkpoint(tmp_path / "noema.pth.tar", raw_ema[0], None)
    code, out, err = _run(capsys, [data, "--checkpoint", ckpt, "--use-ema"])
    line = _one_error_line(err)
    assert code == 2 and out == ""  # nothing evaluated
    assert "no EMA weights" in line and "state_dict" in line and "epoch" in line


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys, data):
    code, out, err = _run(capsys, [data, "--checkpoint", tmp_path / "nope.pth.tar"])
    assert code == 2 and out == "" and "checkpoint not found" in _one_error_line(err)


def test_missing_checkpoint_flag_is_a_one_line_error(capsys, data):
    code, _, err = _run(capsys, [data])
    assert code == 2 and "--checkpoint is required" in _one_error_line(err)


# --------------------------------------------------------------------------- export
def test_exported_safetensors_loads_in_timm_and_gives_the_ema_logits(tmp_path, capsys, data, val_batch, raw_ema):
    from safetensors import safe_open

    raw, ema = raw_ema
    path = tmp_path / "wrapped.pth.tar"
    torch.save({"epoch": 1, "arch": "test_resnet", "args": TRAIN_ARGS,
                "state_dict": {"module." + k: v for k, v in raw.items()},
                "state_dict_ema": {"_orig_mod." + k: v for k, v in ema.items()}}, path)
    out_file = tmp_path / "export" / "model_ema.safetensors"
    code, out, err = _run(capsys, [data, "--checkpoint", path, "--export-ema", out_file])
    assert code == 0, err
    assert os.listdir(out_file.parent) == ["model_ema.safetensors"]  # no temp files left
    with safe_open(str(out_file), framework="pt") as f:
        assert sorted(f.keys()) == sorted(ema)  # unprefixed, EMA weights alone
        meta = f.metadata()
    assert (meta["arch"], meta["num_classes"], meta["weights"]) == ("test_resnet", "3", "ema")

    loaded = timm.create_model("test_resnet", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out_file), num_classes=3), num_classes=3).eval()
    reference = timm.create_model("test_resnet", num_classes=3).eval()
    reference.load_state_dict(ema)
    with torch.no_grad():
        assert torch.equal(loaded(val_batch[0]), reference(val_batch[0]))
    assert f"pretrained_cfg_overlay=dict(file='{out_file}', num_classes=3)" in out


def test_exported_file_validates_to_the_same_numbers_as_the_checkpoint_ema(tmp_path, capsys, data, raw_ema):
    ckpt = _our_checkpoint(tmp_path / "c.pth.tar", *raw_ema)
    exported = tmp_path / "ema.safetensors"
    _, out, _ = _run(capsys, [data, "--checkpoint", ckpt, "--use-ema", "--export-ema", exported])
    first = _json_lines(out)[0]
    code, out, err = _run(capsys, [data, "--checkpoint", exported, "--use-ema"])  # no flags: metadata has them
    assert code == 0, err
    again = _json_lines(out)[0]
    assert (again["top1"], again["loss"], again["img_size"]) == (first["top1"], first["loss"], first["img_size"])


# --------------------------------------------------------------------------- discovery, data, results
def test_checkpoint_folder_evaluates_every_checkpoint_in_natural_order(tmp_path, capsys, data, raw_ema):
    run = tmp_path / "run"
    for name in ("checkpoint-10.pth.tar", "checkpoint-2.pth.tar", "last.pth.tar", "weights.pt"):
        run.mkdir(exist_ok=True)
        _our_checkpoint(run / name, *raw_ema)
    (run / "summary.csv").write_text("epoch\n0\n")
    (run / "posthoc").mkdir()
    (run / ".last.pth.tar.1234.tmp").write_bytes(b"torn")
    code, out, err = _run(capsys, [data, "--checkpoint", run, "--use-ema"])
    assert code == 0, err
    names = [os.path.basename(r["checkpoint"]) for r in _json_lines(out)]
    assert names == ["checkpoint-2.pth.tar", "checkpoint-10.pth.tar", "last.pth.tar", "weights.pt"]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_results_file_holds_every_record(tmp_path, capsys, data, raw_ema, fmt):
    ckpt = _our_checkpoint(tmp_path / "c.pth.tar", *raw_ema)
    results = tmp_path / f"results.{fmt}"
    code, out, _ = _run(capsys, [data, "--checkpoint", ckpt, "--weights", "both", "--results-file", results])
    assert code == 0
    printed = _json_lines(out)
    if fmt == "json":
        stored = json.loads(results.read_text())
    else:
        with open(results, newline="") as f:
            stored = list(csv.DictReader(f))
    assert [r["weights"] for r in stored] == ["raw", "ema"]
    for row, rec in zip(stored, printed):
        assert float(row["top1"]) == rec["top1"] and float(row["loss"]) == rec["loss"]
        assert int(row["samples"]) == rec["samples"] == count_images(data / "val")


def test_eval_transform_defaults_to_the_checkpoint_args_and_flags_override(tmp_path, capsys, data, raw_ema):
    args = {**TRAIN_ARGS, "img_size": 24, "crop_pct": 0.75, "interpolation": "bicubic"}
    ckpt = _our_checkpoint(tmp_path / "c.pth.tar", *raw_ema, args=args)
    _, out, _ = _run(capsys, [data, "--checkpoint", ckpt])
    rec = _json_lines(out)[0]
    assert (rec["img_size"], rec["crop_pct"], rec["interpolation"]) == (24, 0.75, "bicubic")
    _, out, _ = _run(capsys, [data, "--checkpoint", ckpt, "--img-size", "40", "--crop-pct", "1.0"])
    rec = _json_lines(out)[0]
    assert (rec["img_size"], rec["crop_pct"], rec["interpolation"]) == (40, 1.0, "bicubic")


def test_validation_folder_and_a_split_folder_given_directly(tmp_path, capsys, raw_ema, val_batch, data):
    root = tmp_path / "root"
    (root / "train").mkdir(parents=True)
    os.symlink(data / "val", root / "validation")
    for name in CLASSES:
        (root / "train" / name).mkdir()
    ckpt = _our_checkpoint(tmp_path / "c.pth.tar", *raw_ema)
    expected = _plain_eval(raw_ema[0], *val_batch)
    for target in (root, root / "validation"):  # labels from root/train in both cases
        code, out, err = _run(capsys, [target, "--checkpoint", ckpt])
        assert code == 0, err
        _assert_matches(_json_lines(out)[0], expected)


def test_val_split_missing_a_class_keeps_the_train_split_label_indices(tmp_path, capsys, data, raw_ema):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(data / "train", root / "train")
    (root / "val").mkdir()
    for name in CLASSES[1:]:  # no "ant" images in val: "bee" must stay label 1, "cat" label 2
        os.symlink(data / "val" / name, root / "val" / name)
    images, labels = _load_images(data / "val")
    keep = labels > 0
    ckpt = _our_checkpoint(tmp_path / "c.pth.tar", *raw_ema)
    code, out, err = _run(capsys, [root, "--checkpoint", ckpt])
    assert code == 0, err
    _assert_matches(_json_lines(out)[0], _plain_eval(raw_ema[0], images[keep], labels[keep]))


# --------------------------------------------------------------------------- post-hoc EMA
@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory, data) -> Path:
    """A run folder: last.pth.tar plus posthoc/ snapshots of two power EMAs (sigma_rel 0.05,
    0.10) written every 2 of 24 SGD steps of a tiny model on the train images."""
    from emakit.posthoc import PowerEMA, SnapshotWriter

    run = tmp_path_factory.mktemp("posthoc_run")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    images, labels = _load_images(data / "train")
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    ema = PowerEMA(model, (0.05, 0.10))
    writer = SnapshotWriter(run / "posthoc", every=2)
    for _ in range(24):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        writer.maybe_save(ema)
    _our_checkpoint(run / "last.pth.tar", model.state_dict(), ema.profile_state_dict(0), epoch=5)
    return run


SIGMAS = (0.03, 0.05, 0.1, 0.2)


def test_posthoc_sweep_numbers_equal_evaluating_each_reconstruction_directly(
        tmp_path, capsys, data, val_batch, posthoc_run):
    from emakit.posthoc import reconstruct

    results = tmp_path / "out" / "results.json"
    code, out, err = _run(capsys, [data, "--checkpoint", posthoc_run / "last.pth.tar", "--posthoc-sigma-rel",
                                   ",".join(map(str, SIGMAS)), "--results-file", results])
    assert code == 0, err
    records = _json_lines(out)
    assert [r["sigma_rel"] for r in records] == list(SIGMAS)
    expected = [_plain_eval(reconstruct(posthoc_run / "posthoc", s), *val_batch) for s in SIGMAS]
    for rec, exp in zip(records, expected):
        _assert_matches(rec, exp)
        assert rec["posthoc_step"] == 24
        # the printed classic-EMA equivalent: sqrt(d) / ((1 - d) t) = sigma_rel
        d = rec["decay_equiv"]
        assert math.sqrt(d) / ((1 - d) * 24) == pytest.approx(rec["sigma_rel"], rel=1e-9)
    best = max(range(len(SIGMAS)), key=lambda i: (expected[i]["top1"], -expected[i]["loss"]))
    best_line = next(line for line in out.splitlines() if "<- best" in line)
    assert best_line.split()[0] == f"{SIGMAS[best]:.4f}"
    assert len(json.loads(results.read_text())) == len(SIGMAS)


def test_posthoc_sweep_writes_the_png_and_the_sweep_table_next_to_the_results(tmp_path, capsys, data, posthoc_run):
    from PIL import Image

    results = tmp_path / "out" / "results.csv"
    code, out, _ = _run(capsys, [data, "--checkpoint", posthoc_run / "last.pth.tar",
                                 "--posthoc-sigma-rel", "0.05,0.15", "--results-file", results])
    assert code == 0
    png = tmp_path / "out" / "posthoc_sweep.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (600, 400)  # plot_sweep: 6 x 4 in at 100 dpi
    with open(tmp_path / "out" / "posthoc_sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["sigma_rel"]) for r in rows] == [0.05, 0.15]
    assert sum(r["best"] == "True" for r in rows) == 1
    assert f"wrote {png}" in out


@pytest.mark.parametrize("name", ["best.safetensors", "best.pth.tar"])
def test_posthoc_save_of_a_single_sigma_rel_equals_reconstruct(tmp_path, capsys, data, posthoc_run, name):
    from emakit.checkpoint import extract_state_dict, load_checkpoint
    from emakit.posthoc import reconstruct

    out_path = tmp_path / name
    code, _, err = _run(capsys, [data, "--checkpoint", posthoc_run, "--posthoc-sigma-rel", "0.08",
                                 "--posthoc-step", "16", "--posthoc-save", out_path])
    assert code == 0, err
    ckpt = load_checkpoint(out_path)
    saved = extract_state_dict(ckpt, "raw" if name.endswith(".safetensors") else "ema")
    expected = reconstruct(posthoc_run / "posthoc", 0.08, step=16)
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
    if name.endswith(".pth.tar"):  # our schema: raw weights and args of the run's checkpoint
        assert ckpt["posthoc"]["sigma_rel"] == 0.08 and ckpt["posthoc"]["step"] == 16
        assert ckpt["arch"] == "test_resnet" and ckpt["args"] == TRAIN_ARGS and ckpt["epoch"] == 5
        assert torch.equal(ckpt["state_dict"]["fc.weight"], load_checkpoint(posthoc_run / "last.pth.tar")
                           ["state_dict"]["fc.weight"])


def test_posthoc_save_of_a_sweep_keeps_the_best_and_validates_to_its_numbers(tmp_path, capsys, data, posthoc_run):
    saved = tmp_path / "best.pth.tar"
    _, out, _ = _run(capsys, [data, "--checkpoint", posthoc_run / "last.pth.tar",
                              "--posthoc-sigma-rel", "0.03,0.2", "--posthoc-save", saved])
    records = _json_lines(out)
    best = max(records, key=lambda r: (r["top1"], -r["loss"]))
    code, out, _ = _run(capsys, [data, "--checkpoint", saved, "--use-ema"])
    assert code == 0
    again = _json_lines(out)[0]
    assert again["top1"] == best["top1"] and again["loss"] == pytest.approx(best["loss"], rel=1e-6)


def test_posthoc_without_a_checkpoint_needs_only_the_folder_and_the_model(tmp_path, capsys, data, val_batch,
                                                                        posthoc_run):
    from emakit.posthoc import reconstruct

    code, out, err = _run(capsys, [data, "--posthoc-dir", posthoc_run / "posthoc", "--model", "test_resnet",
                                   "--posthoc-sigma-rel", "0.1", "--results-file", tmp_path / "r.csv", *DATA_FLAGS])
    assert code == 0, err
    _assert_matches(_json_lines(out)[0], _plain_eval(reconstruct(posthoc_run / "posthoc", 0.1), *val_batch))


@pytest.mark.parametrize("argv_tail, message", [
    (["--posthoc-sigma-rel", "0.5"], "outside (0, 0.2887]"),
    (["--posthoc-sigma-rel", "0.05", "--posthoc-step", "7"], "not a snapshot step; nearest: 6, 8"),
    (["--posthoc-sigma-rel", "0.05", "--posthoc-dir", "/nonexistent/posthoc"], "no snapshot folder"),
    (["--posthoc-step", "4"], "--posthoc-step needs --posthoc-sigma-rel"),
])
def test_posthoc_mistakes_are_one_line_errors(capsys, data, posthoc_run, argv_tail, message):
    code, _, err = _run(capsys, [data, "--checkpoint", posthoc_run / "last.pth.tar", *argv_tail])
    assert code == 2 and message in _one_error_line(err)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_validate_reports_the_ema_top1_train_py_logged_for_that_epoch(tmp_path, capsys, run_train):
    """Embedded digits, the train.py defaults for the transform: same 360 samples, same counts."""
    code, _, err = run_train(["--model", "test_resnet", "--epochs", "2", "-b", "64", "--no-progress",
                              "--output", tmp_path, "--experiment", "run"])
    assert code == 0, err
    run = tmp_path / "run"
    with open(run / "summary.csv", newline="") as f:
        logged = {int(r["epoch"]): r for r in csv.DictReader(f)}
    for name, epoch in (("checkpoint-0.pth.tar", 0), ("last.pth.tar", 1)):
        code, out, err = _run(capsys, ["--checkpoint", run / name, "--use-ema"])
        assert code == 0, err
        (rec,) = _json_lines(out)
        assert rec["samples"] == 360 and rec["epoch"] == epoch
        correct = round(rec["top1"] * rec["samples"] / 100)
        assert correct == round(float(logged[epoch]["ema_eval_top1"]) * 360 / 100)
        assert rec["loss"] == pytest.approx(float(logged[epoch]["ema_eval_loss"]), rel=1e-5)
    code, out, _ = _run(capsys, ["--checkpoint", run / "last.pth.tar", "--weights", "both"])
    raw_rec, ema_rec = _json_lines(out)
    assert round(raw_rec["top1"] * 3.6) == round(float(logged[1]["raw_eval_top1"]) * 3.6)
    assert round(ema_rec["top1"] * 3.6) == round(float(logged[1]["ema_eval_top1"]) * 3.6)
    ckpt = torch.load(run / "last.pth.tar", weights_only=True)
    model = timm.create_model("test_resnet", num_classes=10)
    timm.models.load_checkpoint(model, str(run / "last.pth.tar"), use_ema=True)
    for key, value in ckpt["state_dict_ema"].items():
        assert torch.equal(model.state_dict()[key], value), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_with_two_processes_counts_every_sample_once(tmp_path, capsys, raw_ema):
    root = make_image_folder(tmp_path / "odd", train_per_class=1, val_per_class=3)
    (root / "val" / CLASSES[0] / f"{CLASSES[0]}_000.jpg").unlink()  # 8 images: 4 + 4, then a ragged batch
    (root / "val" / CLASSES[1] / f"{CLASSES[1]}_000.jpg").unlink()  # 7 images: 4 + 3
    ckpt = _our_checkpoint(tmp_path / "c.pth.tar", *raw_ema)
    _, out, _ = _run(capsys, [root, "--checkpoint", ckpt, "--weights", "both"])
    single = _json_lines(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(REPO / "validate.py"),
           str(root), "--checkpoint", str(ckpt), "--weights", "both", "-b", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    multi = _json_lines(proc.stdout)
    assert len(multi) == 2  # rank 0 alone prints
    for a, b in zip(single, multi):
        assert a["samples"] == b["samples"] == 7
        assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
