"""emakit.checkpoint: atomic writes, safe reads, foreign formats, the checkpoint saver.

Expectations come from outside the code under test: tensors built here, bytes and files
on disk, plain ``torch.load(weights_only=True)``, torch's own AveragedModel, and timm.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from emakit.checkpoint import (
    CheckpointError,
    CheckpointSaver,
    check_state_dict_compat,
    describe_format,
    extract_state_dict,
    load_checkpoint,
    load_state_dict_strict,
    save_checkpoint,
    save_safetensors,
    strip_prefixes,
)


def _tiny_model(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm brings buffers, including the integer num_batches_tracked.
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, num_classes))


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(3, 4, generator=g), "fc.bias": torch.randn(3, generator=g)}


def _assert_same_tensors(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------- atomic save
def test_saved_checkpoint_loads_with_plain_weights_only_torch_load(tmp_path):
    state = {"epoch": 3, "state_dict": _weights(0), "args": {"lr": 0.1, "model": "resnet18"},
             "shape": torch.Size([2, 3]), "dtype": torch.bfloat16, "pair": (1, "a"), "none": None}
    path = tmp_path / "ckpt.pth.tar"
    save_checkpoint(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and loaded["args"] == {"lr": 0.1, "model": "resnet18"}
    assert loaded["shape"] == torch.Size([2, 3]) and loaded["dtype"] is torch.bfloat16
    assert loaded["pair"] == (1, "a") and loaded["none"] is None
    _assert_same_tensors(loaded["state_dict"], state["state_dict"])


def test_save_leaves_no_temp_files(tmp_path):
    save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.pth.tar")
    save_checkpoint({"w": torch.zeros(2)}, tmp_path / "a.pth.tar")
    assert _files(tmp_path) == ["a.pth.tar"]


def test_failed_save_keeps_previous_file_byte_for_byte(tmp_path, monkeypatch):
    path = tmp_path / "last.pth.tar"
    save_checkpoint({"w": torch.arange(10.0)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save_half_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # leave a torn file behind, as a crash mid-write would
            fh.truncate(len(before) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["last.pth.tar"]


def test_interrupted_save_removes_temp_file(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"w": torch.ones(1)}, tmp_path / "x.pth.tar")
    assert _files(tmp_path) == []


def test_saved_file_permissions_follow_umask(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    save_checkpoint({"w": torch.ones(1)}, tmp_path / "x.pth.tar")
    assert (tmp_path / "x.pth.tar").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "state, where",
    [
        ({"args": argparse.Namespace(lr=0.1)}, "state['args']"),
        ({"args": {"data": {"root": pathlib.Path("/data")}}}, "state['args']['data']['root']"),
        ({"metrics": [1.0, object()]}, "state['metrics'][1]"),
    ],
)
def test_save_refuses_objects_weights_only_load_would_refuse(tmp_path, state, where):
    path = tmp_path / "x.pth.tar"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(state, path)
    assert where in str(info.value)
    assert not path.exists()


# --------------------------------------------------------------------------- safe load
class _TouchWithOsSystem:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _TouchWithOpen:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload, global_name", [(_TouchWithOsSystem, "system"), (_TouchWithOpen, "open")])
def test_pickle_that_runs_code_is_refused_and_code_does_not_run(tmp_path, payload, global_name):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": _weights(0), "args": payload(marker)}, path)
    # The payload is live: an unsafe load does create the marker.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "refusing to load" in message and global_name in message
    assert "\n" not in message
    assert not marker.exists()


def _saved_bytes(tmp_path) -> bytes:
    save_checkpoint({"state_dict": _weights(0)}, tmp_path / "good.pth.tar")
    return (tmp_path / "good.pth.tar").read_bytes()


@pytest.mark.parametrize(
    "make_bytes",
    [
        lambda good: good[: len(good) // 2],  # cut in half
        lambda good: good[:-10],  # lost only the zip's end record
        lambda good: b"",  # empty
        lambda good: b"this is a text file, not a checkpoint\n",
    ],
    ids=["half", "tail", "empty", "text"],
)
def test_damaged_file_is_a_checkpoint_error_naming_the_file(tmp_path, make_bytes):
    path = tmp_path / "bad.pth.tar"
    path.write_bytes(make_bytes(_saved_bytes(tmp_path)))
    with pytest.raises(CheckpointError, match="truncated(,| or) corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth.tar")


# --------------------------------------------------------------------------- formats
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_timm_checkpoint_with_namespace_args_and_wrapper_prefixes(tmp_path, prefix):
    raw, ema = _weights(1), _weights(2)
    path = tmp_path / "timm.pth.tar"
    # What timm's CheckpointSaver writes: a pickled argparse.Namespace, keys from a wrapped model.
    torch.save({
        "epoch": 4, "arch": "resnet18", "version": 2, "metric": 71.5,
        "args": argparse.Namespace(model="resnet18", lr=0.4),
        "state_dict": {prefix + k: v for k, v in raw.items()},
        "state_dict_ema": {prefix + k: v for k, v in ema.items()},
    }, path)
    ckpt = load_checkpoint(path)
    assert ckpt["args"] == {"model": "resnet18", "lr": 0.4}
    assert describe_format(ckpt) == "timm"
    _assert_same_tensors(extract_state_dict(ckpt, "raw"), raw)
    _assert_same_tensors(extract_state_dict(ckpt, "ema"), ema)


def test_strip_prefixes_removes_any_sequence_of_wrapper_prefixes():
    t = torch.zeros(1)
    sd = {"module._orig_mod.module.a.weight": t, "_orig_mod._orig_mod.b": t, "c.module.d": t, "e": t}
    assert list(strip_prefixes(sd)) == ["a.weight", "b", "c.module.d", "e"]


def test_strip_prefixes_refuses_keys_that_collide():
    with pytest.raises(CheckpointError, match="'a'"):
        strip_prefixes({"a": torch.zeros(1), "module.a": torch.ones(1)})


def test_supergradients_net_and_ema_net(tmp_path):
    raw, ema = _weights(3), _weights(4)
    path = tmp_path / "ckpt_best.pth"
    torch.save({"net": {"module." + k: v for k, v in raw.items()}, "acc": 0.9, "epoch": 7,
                "ema_net": {"module." + k: v for k, v in ema.items()}}, path)
    ckpt = load_checkpoint(path)
    assert describe_format(ckpt) == "supergradients"
    _assert_same_tensors(extract_state_dict(ckpt, "raw"), raw)
    _assert_same_tensors(extract_state_dict(ckpt, "ema"), ema)


def test_supergradients_without_ema_is_refused_for_ema():
    ckpt = {"net": _weights(3), "ema_net": None}  # SuperGradients writes None when EMA is off
    with pytest.raises(CheckpointError, match="no EMA weights"):
        extract_state_dict(ckpt, "ema")


def test_torchvision_model_ema_drops_n_averaged_and_module_prefix(tmp_path):
    model = _tiny_model()
    # torchvision's ExponentialMovingAverage is an AveragedModel: same state_dict layout.
    averaged = torch.optim.swa_utils.AveragedModel(model)
    with torch.no_grad():
        for p in averaged.module.parameters():
            p.add_(1.0)
    path = tmp_path / "model_7.pth"
    torch.save({"model": model.state_dict(), "model_ema": averaged.state_dict(), "epoch": 7,
                "args": argparse.Namespace(model="resnet18")}, path)
    ckpt = load_checkpoint(path)
    assert describe_format(ckpt) == "torchvision"
    assert "n_averaged" in ckpt["model_ema"]
    _assert_same_tensors(extract_state_dict(ckpt, "ema"), averaged.module.state_dict())
    _assert_same_tensors(extract_state_dict(ckpt, "raw"), model.state_dict())


def test_bare_state_dict_is_the_raw_weights(tmp_path):
    model = _tiny_model()
    path = tmp_path / "weights.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    ckpt = load_checkpoint(path)
    assert describe_format(ckpt) == "bare state_dict"
    _assert_same_tensors(extract_state_dict(ckpt), model.state_dict())


def test_bare_state_dict_has_no_ema():
    with pytest.raises(CheckpointError, match="no EMA weights.*--weights raw"):
        extract_state_dict(_weights(0), "ema")


def test_ema_requested_from_file_without_ema_lists_keys_and_suggests_raw():
    ckpt = {"epoch": 1, "state_dict": _weights(0), "optimizer": {}}
    with pytest.raises(CheckpointError) as info:
        extract_state_dict(ckpt, "ema", source="run/last.pth.tar")
    message = str(info.value)
    assert "run/last.pth.tar has no EMA weights" in message
    assert "epoch, state_dict, optimizer" in message and "--weights raw" in message


def test_extra_ema_by_index_and_ema0_is_the_main_ema():
    main, extra = _weights(5), _weights(6)
    ckpt = {"state_dict": _weights(0), "state_dict_ema": main, "state_dict_ema_1": extra}
    _assert_same_tensors(extract_state_dict(ckpt, "ema:0"), main)
    _assert_same_tensors(extract_state_dict(ckpt, "ema:1"), extra)
    with pytest.raises(CheckpointError, match="state_dict_ema_2"):
        extract_state_dict(ckpt, "ema:2")


@pytest.mark.parametrize("weights", ["EMA", "both", "raw:1", "ema:-1", ""])
def test_unknown_weights_value_lists_accepted_values(weights):
    with pytest.raises(CheckpointError, match="use 'raw', 'ema', or 'ema:N'"):
        extract_state_dict({"state_dict": _weights(0)}, weights)


def test_ema_only_file_asked_for_raw_points_to_ema():
    with pytest.raises(CheckpointError, match="use --weights ema"):
        extract_state_dict({"state_dict_ema": _weights(0), "epoch": 1}, "raw")


def test_our_checkpoint_is_described_as_emakit():
    ckpt = {"state_dict": _weights(0), "state_dict_ema": _weights(1), "ema": {"num_updates": 10, "config": {}}}
    assert describe_format(ckpt) == "emakit"


# --------------------------------------------------------------------------- strict load
def test_strict_load_copies_matching_weights():
    source, target = _tiny_model(), _tiny_model()
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(2.0)
    load_state_dict_strict(target, source.state_dict())
    _assert_same_tensors(target.state_dict(), source.state_dict())


def test_strict_load_names_missing_unexpected_and_shape_mismatched_keys():
    model = _tiny_model(num_classes=3)
    sd = _tiny_model(num_classes=10).state_dict()
    del sd["1.running_var"]
    sd["head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, sd)
    message = str(info.value)
    assert "1 missing keys: 1.running_var" in message
    assert "1 unexpected keys: head.weight" in message
    assert "3.weight (checkpoint [10, 4] vs model [3, 4])" in message
    assert "--num-classes" in message and "\n" not in message


def test_compat_check_accepts_exact_match():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # same keys and shapes, other values and dtypes (a bf16 EMA): accepted, nothing changed
    other = {k: (v.bfloat16() + 1 if v.is_floating_point() else v + 7) for k, v in _tiny_model().state_dict().items()}
    assert check_state_dict_compat(model, model.state_dict()) is None
    assert check_state_dict_compat(model, other) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the same check rejects the smallest departure from an exact match, one key at a time
    for key in before:
        shrunk = dict(other)
        shrunk[key] = torch.zeros(3, 3) if before[key].dim() != 2 else torch.zeros(1)
        with pytest.raises(CheckpointError, match=f"shape mismatches: {key} "):
            check_state_dict_compat(model, shrunk)
        with pytest.raises(CheckpointError, match=f"1 missing keys: {key}"):
            check_state_dict_compat(model, {k: v for k, v in other.items() if k != key})


# --------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip_of_views_tied_and_strided_tensors(tmp_path):
    pytest.importorskip("safetensors")
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"row": base[1], "tied_a": base, "tied_b": base, "transposed": base.t(), "ints": torch.arange(3)}
    path = tmp_path / "model_ema.safetensors"
    save_safetensors(sd, path, metadata={"arch": "resnet18", "num_classes": 3})
    ckpt = load_checkpoint(path)
    assert describe_format(ckpt) == "safetensors"
    assert ckpt["metadata"] == {"arch": "resnet18", "num_classes": "3"}
    got = extract_state_dict(ckpt)
    assert sorted(got) == sorted(sd)
    for key, value in sd.items():
        assert torch.equal(got[key], value), key
    assert _files(tmp_path) == ["model_ema.safetensors"]


def test_failed_safetensors_write_keeps_previous_file(tmp_path, monkeypatch):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "model_ema.safetensors"
    save_safetensors(_weights(0), path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(_weights(1), path)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["model_ema.safetensors"]


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "w.safetensors"
    save_safetensors(_weights(0), path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_safetensors_refuses_non_tensor_values(tmp_path):
    with pytest.raises(CheckpointError, match="'epoch'"):
        save_safetensors({"w": torch.ones(1), "epoch": 3}, tmp_path / "w.safetensors")


# --------------------------------------------------------------------------- saver
def _save_epochs(saver: CheckpointSaver, metrics: list) -> list:
    results = []
    for epoch, metric in enumerate(metrics):
        results.append(saver.save({"state_dict": {"w": torch.full((2,), float(epoch))}}, epoch, metric))
    return results


def _epoch_in(path: pathlib.Path) -> int:
    return torch.load(path, weights_only=True)["epoch"]


def test_saver_keeps_the_best_checkpoints_and_deletes_the_worst(tmp_path):
    saver = CheckpointSaver(tmp_path, max_history=3)
    results = _save_epochs(saver, [50.0, 70.0, 60.0, 40.0, 80.0, 65.0])
    # Best three metrics: 80 (epoch 4), 70 (epoch 1), 65 (epoch 5).
    assert _files(tmp_path) == ["checkpoint-1.pth.tar", "checkpoint-4.pth.tar", "checkpoint-5.pth.tar",
                                "last.pth.tar", "model_best.pth.tar"]
    assert saver.history == [(4, 80.0), (1, 70.0), (5, 65.0)]
    assert results == [(50.0, 0), (70.0, 1), (70.0, 1), (70.0, 1), (80.0, 4), (80.0, 4)]
    assert _epoch_in(tmp_path / "model_best.pth.tar") == 4
    assert _epoch_in(tmp_path / "last.pth.tar") == 5
    for epoch in (1, 4, 5):
        ckpt = torch.load(tmp_path / f"checkpoint-{epoch}.pth.tar", weights_only=True)
        assert torch.equal(ckpt["state_dict"]["w"], torch.full((2,), float(epoch)))


def test_saver_with_decreasing_metric_keeps_the_lowest(tmp_path):
    saver = CheckpointSaver(tmp_path, max_history=2, decreasing=True)
    best = _save_epochs(saver, [1.0, 0.5, 0.8, 0.2])[-1]
    assert best == (0.2, 3)
    assert saver.history == [(3, 0.2), (1, 0.5)]
    assert _epoch_in(tmp_path / "model_best.pth.tar") == 3


def test_saver_tie_keeps_the_earlier_best(tmp_path):
    saver = CheckpointSaver(tmp_path, max_history=1)
    assert _save_epochs(saver, [60.0, 60.0])[-1] == (60.0, 0)
    assert _epoch_in(tmp_path / "model_best.pth.tar") == 0
    assert _files(tmp_path) == ["checkpoint-0.pth.tar", "last.pth.tar", "model_best.pth.tar"]


def test_saver_without_metric_keeps_the_most_recent(tmp_path):
    saver = CheckpointSaver(tmp_path, max_history=2)
    assert _save_epochs(saver, [None] * 4)[-1] == (None, None)
    assert _files(tmp_path) == ["checkpoint-2.pth.tar", "checkpoint-3.pth.tar", "last.pth.tar"]


def test_saver_with_zero_history_keeps_only_last_and_best(tmp_path):
    saver = CheckpointSaver(tmp_path, max_history=0)
    _save_epochs(saver, [1.0, 3.0, 2.0])
    assert _files(tmp_path) == ["last.pth.tar", "model_best.pth.tar"]
    assert _epoch_in(tmp_path / "model_best.pth.tar") == 1


def test_saver_restore_continues_ranking_and_best_after_resume(tmp_path):
    first = CheckpointSaver(tmp_path, max_history=3)
    _save_epochs(first, [50.0, 70.0, 60.0, 90.0])  # run continued past epoch 2, then abandoned
    assert _files(tmp_path)[:3] == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar", "checkpoint-3.pth.tar"]
    resumed = CheckpointSaver(tmp_path, max_history=2)
    # Resuming from epoch 2's checkpoint: epoch 3 (metric 90) is from the abandoned run.
    assert resumed.restore(up_to_epoch=2) == (70.0, 1)
    assert resumed.history == [(1, 70.0), (2, 60.0)]
    assert _epoch_in(tmp_path / "model_best.pth.tar") == 1
    assert resumed.save({"state_dict": {}}, 3, 55.0) == (70.0, 1)
    # The new epoch 3 ranks last and is not kept; the abandoned epoch-3 file must go too.
    assert _files(tmp_path) == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar", "last.pth.tar",
                                "model_best.pth.tar"]


def test_saver_restore_prunes_to_a_smaller_history(tmp_path):
    _save_epochs(CheckpointSaver(tmp_path, max_history=4), [10.0, 40.0, 30.0, 20.0])
    resumed = CheckpointSaver(tmp_path, max_history=2)
    assert resumed.restore() == (40.0, 1)
    assert _files(tmp_path) == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar", "last.pth.tar",
                                "model_best.pth.tar"]


def test_saver_restore_without_history_reads_the_best_file(tmp_path):
    _save_epochs(CheckpointSaver(tmp_path, max_history=0), [10.0, 40.0, 30.0])
    resumed = CheckpointSaver(tmp_path, max_history=0)
    assert resumed.restore(up_to_epoch=2) == (40.0, 1)
    assert resumed.save({"state_dict": {}}, 3, 35.0) == (40.0, 1)
    assert _epoch_in(tmp_path / "model_best.pth.tar") == 1


def test_saver_writes_epoch_and_metric_into_the_file(tmp_path):
    saver = CheckpointSaver(tmp_path)
    saver.save({"state_dict": {}}, 5, 12.5)
    ckpt = torch.load(tmp_path / "last.pth.tar", weights_only=True)
    assert (ckpt["epoch"], ckpt["metric"]) == (5, 12.5)


# --------------------------------------------------------------------------- interop
def test_timm_load_checkpoint_reads_our_ema_weights(tmp_path):
    timm_models = pytest.importorskip("timm.models")
    raw_model, ema_model = _tiny_model(), _tiny_model()
    with torch.no_grad():
        for p in ema_model.parameters():
            p.add_(0.5)
    path = tmp_path / "model_best.pth.tar"
    save_checkpoint({"epoch": 0, "arch": "tiny", "state_dict": raw_model.state_dict(),
                     "state_dict_ema": ema_model.state_dict(), "ema": {"num_updates": 1, "config": {}},
                     "args": {"model": "tiny"}}, path)
    target = _tiny_model()
    timm_models.load_checkpoint(target, str(path), use_ema=True)
    _assert_same_tensors(target.state_dict(), ema_model.state_dict())
    timm_models.load_checkpoint(target, str(path), use_ema=False)
    _assert_same_tensors(target.state_dict(), raw_model.state_dict())


def test_importing_checkpoint_module_pulls_in_no_training_dependencies():
    code = ("import sys, emakit.checkpoint; "
            "print(','.join(m for m in ('timm', 'torchvision', 'yaml', 'PIL', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == ""


# --------------------------------------------------------------------------- one write, hard links (issue 11)
def _inode(path: pathlib.Path) -> int:
    return os.stat(path).st_ino


def test_saver_writes_once_and_hard_links_the_copies(tmp_path, monkeypatch):
    writes = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (writes.append(f), real_save(obj, f, *a, **k)))
    saver = CheckpointSaver(tmp_path, max_history=2)
    saver.save({"state_dict": _weights(0)}, 0, 1.0)
    last, first, best = tmp_path / "last.pth.tar", tmp_path / "checkpoint-0.pth.tar", tmp_path / "model_best.pth.tar"
    assert len(writes) == 1
    assert _inode(last) == _inode(first) == _inode(best) and os.stat(last).st_nlink == 3
    saver.save({"state_dict": _weights(1)}, 1, 0.5)  # worse: kept in the history, not the best
    assert len(writes) == 2
    assert _inode(last) == _inode(tmp_path / "checkpoint-1.pth.tar") != _inode(best)
    # Replacing last.pth.tar made a new file: the epoch-0 copies still hold epoch 0's weights.
    assert _inode(first) == _inode(best) and os.stat(best).st_nlink == 2
    _assert_same_tensors(torch.load(best, weights_only=True)["state_dict"], _weights(0))
    _assert_same_tensors(torch.load(last, weights_only=True)["state_dict"], _weights(1))
    assert not list(tmp_path.glob(".*.tmp"))


def test_saver_copies_when_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst, *a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    saver = CheckpointSaver(tmp_path, max_history=2)
    saver.save({"state_dict": _weights(0)}, 0, 1.0)
    paths = [tmp_path / n for n in ("last.pth.tar", "checkpoint-0.pth.tar", "model_best.pth.tar")]
    assert len({_inode(p) for p in paths}) == 3
    assert len({p.read_bytes() for p in paths}) == 1
    assert _files(tmp_path) == ["checkpoint-0.pth.tar", "last.pth.tar", "model_best.pth.tar"]


def test_last_only_keys_stay_out_of_history_and_best_which_share_one_second_write(tmp_path, monkeypatch):
    writes = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (writes.append(f), real_save(obj, f, *a, **k)))
    saver = CheckpointSaver(tmp_path, max_history=2)
    profiles = {"profiles": [torch.ones(3)], "step": 7}
    saver.save({"state_dict": _weights(0), "posthoc_ema": profiles}, 0, 1.0, last_only_keys=("posthoc_ema",))
    last, first, best = tmp_path / "last.pth.tar", tmp_path / "checkpoint-0.pth.tar", tmp_path / "model_best.pth.tar"
    assert len(writes) == 2
    assert torch.load(last, weights_only=True)["posthoc_ema"]["step"] == 7
    for path in (first, best):
        ckpt = torch.load(path, weights_only=True)
        assert "posthoc_ema" not in ckpt and ckpt["epoch"] == 0 and ckpt["metric"] == 1.0
        _assert_same_tensors(ckpt["state_dict"], _weights(0))
    assert _inode(first) == _inode(best) != _inode(last)
    # An epoch that is neither kept nor best is one write: last.pth.tar alone.
    CheckpointSaver(tmp_path / "b", max_history=0).save({"state_dict": _weights(1), "posthoc_ema": profiles}, 3,
                                                         None, last_only_keys=("posthoc_ema",))
    assert len(writes) == 3 and _files(tmp_path / "b") == ["last.pth.tar"]


def test_remove_stale_temp_files_removes_only_our_temp_files(tmp_path):
    from emakit.checkpoint import remove_stale_temp_files

    ours = [".last.pth.tar.1a2b3c4d.tmp", ".summary.csv.deadbeef.tmp"]
    others = ["other.tmp", ".x.tmp", ".last.pth.tar.XYZ12345.tmp", ".last.pth.tar.1a2b3c4.tmp", "last.pth.tar",
              "notes.txt", ".hidden"]
    for name in ours + others:
        (tmp_path / name).write_text("x")
    (tmp_path / ".dir.0badcafe.tmp").mkdir()  # our name, but a folder: not ours
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted(str(tmp_path / n) for n in ours)
    assert _files(tmp_path) == sorted(others + [".dir.0badcafe.tmp"])
    assert remove_stale_temp_files(tmp_path / "missing") == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and a kernel that allows the mount; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        done = subprocess.run(["umount", str(disk)], capture_output=True, text=True)
        assert done.returncode == 0, f"umount: {done.stderr} (a file on the full disk is still open)"


def test_a_full_disk_is_enospc_naming_the_target_and_the_old_file_survives(tiny_disk):
    import errno

    target = tiny_disk / "last.pth.tar"
    save_checkpoint({"w": torch.zeros(1000)}, target)
    before = target.read_bytes()
    with pytest.raises(OSError) as info:
        save_checkpoint({"w": torch.zeros(1_000_000)}, target)  # 4 MB into what is left of 1 MiB
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == before and _files(tiny_disk) == ["last.pth.tar"]


def test_find_nonfinite_names_exactly_the_tensors_holding_nan_or_inf_in_state_order():
    """The fused 2-norm screen must not flag huge finite values (their norm overflows) and must
    name every bad tensor of every dtype, nested anywhere, in the order of the state."""
    from emakit.checkpoint import find_nonfinite

    huge = torch.full((8,), 3e38)                                    # finite; its 2-norm is inf in float32
    nan_bf16 = torch.ones(3, dtype=torch.bfloat16)
    nan_bf16[1] = float("nan")
    state = {
        "a": {"w": torch.zeros(4), "huge": huge, "ints": torch.arange(3)},
        "b": [torch.ones(2), torch.tensor([1.0, float("inf")])],
        "c": (nan_bf16, torch.tensor([1 + 1j, complex(float("nan"), 0)])),
        "mask": torch.tensor([float("-inf"), 0.0]),                  # skipped by key
        "empty": torch.empty(0),
        "d": torch.tensor([-float("inf")], dtype=torch.float64),
    }
    assert find_nonfinite(state, skip_keys=frozenset({"mask"})) == [
        "state['b'][1]", "state['c'][0]", "state['c'][1]", "state['d']"]
    assert find_nonfinite(state)[-2:] == ["state['mask']", "state['d']"]
    assert find_nonfinite({"a": {"huge": huge, "w": torch.zeros(4)}}) == []
