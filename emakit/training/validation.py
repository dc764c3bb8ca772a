"""The work behind ``validate.py``: evaluate the raw and EMA weights of saved checkpoints.

Flags are timm's ``validate.py`` flags where timm has the feature (``--checkpoint``,
``--use-ema``, ``-b``, ``--img-size``, ``--crop-pct``, ``--amp``, ``--results-file``, ...).
Beyond timm:

- ``--weights raw|ema|both|ema:N`` picks the weight sets; ``both`` scores the trained and
  the EMA weights of each checkpoint in one run and prints them side by side;
- the model name, class count and eval transform (image size, crop, mean, std,
  interpolation) default to what the checkpoint's training arguments used, so the numbers
  are exactly the ones ``train.py`` logged for that epoch (same val split, same transform,
  same ``evaluate``), also under torchrun, where every sample is counted once;
- ``--export-ema FILE.safetensors`` writes the EMA weights alone for
  ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=FILE, num_classes=N))``;
- ``--posthoc-sigma-rel 0.02,0.05,...`` reconstructs post-hoc EMAs (EDM2, ``emakit.posthoc``)
  from the run's snapshot folder, evaluates each, marks the best, appends the sweep to
  ``posthoc_sweep.csv`` (earlier sweeps are kept), plots all sweeps and can save the chosen
  weights (``--posthoc-save``).

The flags live in :mod:`.validate_config`, which resolves them once into a frozen
``ValidateSettings``; the functions here take that object or explicit values. Nothing here
prints: :func:`report_lines` gives the CLI the lines to print.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from emakit.checkpoint import (CheckpointError, check_state_dict_compat, describe_nonfinite, extract_state_dict,
                               load_checkpoint, save_checkpoint, save_safetensors, state_dict_mismatch, strip_prefixes,
                               write_text_atomic)
from emakit.posthoc import list_snapshots, reconstruct_many, sigma_rel_to_decay, sigma_rel_to_half_life

from . import UsageError, one_line
from .build import build_model as _build_model, check_model_name
from .sources import load_eval_split, wants_sources
from .data import (AugmentConfig, DeviceLoader, ImageListDataset, build_eval_loader, build_transforms, class_folders,
                   image_mode, load_digits_splits, scan_split)
from .distributed import DistInfo
from .dcp import dcp_folder_to_checkpoint, is_dcp_folder, names_dcp_folder, resolve_dcp_folder
from .engine import AmpSettings, EvalTarget, evaluate_many
from .outputs import writing_output
from .plots import plot_sweeps
from .validate_config import CHECKPOINT_EXTENSIONS, EVAL_DATA_KEYS as _DATA_KEYS, ValidateSettings

__all__ = [
    "CHECKPOINT_EXTENSIONS", "RESULT_FIELDS", "ResultRecord", "SweepRow", "ValidationReport", "EvalSetup",
    "run_checkpoints", "run_posthoc", "find_checkpoints", "resolve_arch", "resolve_num_classes", "select_weights",
    "build_model", "load_weights", "load_eval_dataset", "eval_data_config", "torchvision_eval_settings",
    "evaluate_weights", "evaluate_weight_sets", "run_pretrained", "read_valid_labels", "subsample",
    "real_label_accuracy", "precision_recall_f1", "model_in_chans", "model_kwargs",
    "write_results", "export_weights", "check_weights_fit", "timm_load_hint", "resolve_posthoc_dir",
    "reconstruct_profiles",
    "posthoc_equivalents", "pick_best", "save_posthoc_weights", "new_sweep_id", "read_sweep_table",
    "write_sweep_outputs", "run",
    "report_lines", "format_results_table", "format_sweep_table",
]

_log = logging.getLogger(__name__)

# The JSON result line and the results file, in this order (timm's validate.py fields plus
# weights, loss and samples); param_count is in millions, as timm reports it.
RESULT_FIELDS = ("model", "checkpoint", "weights", "top1", "top1_err", "top5", "top5_err", "loss",
                 "param_count", "img_size", "crop_pct", "interpolation", "samples", "epoch")
POSTHOC_FIELDS = ("sigma_rel", "posthoc_step", "decay_equiv", "half_life_equiv")
# Where classifiers live in timm models whose pretrained cfg does not say (last resort).
_CLASSIFIER_NAMES = ("fc", "head.fc", "head", "classifier", "last_linear", "head.l")


# =========================================================================== checkpoints
def _natural_key(name: str) -> list[Any]:
    """checkpoint-2 before checkpoint-10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def find_checkpoints(path: str) -> list[str]:
    """``[path]`` for a file or a DCP checkpoint folder (``train.py --checkpoint-format dcp``);
    for any other folder every checkpoint file and DCP folder directly in it, in natural order."""
    if not os.path.exists(path) and resolve_dcp_folder(path) is None:
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    if not os.path.isdir(path) or is_dcp_folder(path):
        return [path]
    names = [e.name for e in os.scandir(path) if not e.name.startswith(".") and (
        (e.is_file() and e.name.lower().endswith(CHECKPOINT_EXTENSIONS)) or is_dcp_folder(e.path))]
    if not names:
        raise UsageError(f"{path} holds no checkpoint files ({', '.join('*' + e for e in CHECKPOINT_EXTENSIONS)}) "
                         "nor checkpoint folders (*.dcp)")
    return [os.path.join(path, n) for n in sorted(names, key=_natural_key)]


def read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint file (:func:`emakit.checkpoint.load_checkpoint`), or a DCP checkpoint folder
    converted offline to the same dict (:func:`emakit.training.dcp.dcp_folder_to_checkpoint`:
    whole tensors in memory, one process)."""
    if names_dcp_folder(path):
        try:
            return dcp_folder_to_checkpoint(path)
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable torch.distributed.checkpoint folder ({one_line(e)[:200]}); "
                                  "pass a checkpoint file or a last.dcp / model_best.dcp folder") from None
    return load_checkpoint(path)


def _train_args(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The training arguments: the ``args`` dict, or for our exported ``.safetensors`` the
    eval-transform subset stored as JSON in the metadata."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):  # timm and torchvision references pickle their Namespace
        args = vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    try:
        stored = json.loads(_metadata(ckpt).get("args", "{}"))
    except json.JSONDecodeError:
        return {}
    return stored if isinstance(stored, dict) else {}


def _export_args(train_args: Mapping[str, Any], arch: str | None, num_classes: int | None) -> str:
    """What a validate run of an exported file needs to reproduce the eval transform, as JSON."""
    keep = {k: train_args[k] for k in _DATA_KEYS + ("in_chans", "input_size") if train_args.get(k) is not None}
    keep.update({k: v for k, v in (("model", arch), ("num_classes", num_classes)) if v})
    return json.dumps(keep)


def _metadata(ckpt: Mapping[str, Any]) -> dict[str, str]:
    meta = ckpt.get("metadata") if ckpt.get("format") == "safetensors" else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def resolve_arch(ckpt: Mapping[str, Any], source: str, model_flag: str | None) -> str:
    """The timm model name: ``--model``, else the training ``args['model']``, the ``arch`` entry,
    or safetensors metadata ``arch`` (the first that timm knows; timm's own files store the
    class name, e.g. ``resnet``, as ``arch``)."""
    import timm

    if model_flag:
        check_model_name(model_flag)
        return model_flag
    found = [("args.model", _train_args(ckpt).get("model")), ("arch", ckpt.get("arch")),
             ("metadata arch", _metadata(ckpt).get("arch"))]
    for _, name in found:
        if isinstance(name, str) and name and timm.is_model(name):
            return name
    seen = ", ".join(f"{where}={name!r}" for where, name in found if name) or "no model name"
    raise UsageError(f"cannot tell which timm model {source} holds ({seen}); pass --model NAME")


def _classifier_outputs(arch: str, state_dict: Mapping[str, Any]) -> int | None:
    """Rows of the classifier weight, located by the model's pretrained cfg ``classifier``."""
    from timm.models import get_pretrained_cfg_value

    try:
        names = get_pretrained_cfg_value(arch, "classifier")
    except (RuntimeError, KeyError, ValueError):
        names = None
    names = [names] if isinstance(names, str) else list(names or [])
    for name in names + [n for n in _CLASSIFIER_NAMES if n not in names]:
        weight = state_dict.get(f"{name}.weight")
        if isinstance(weight, torch.Tensor) and weight.ndim >= 2:
            return int(weight.shape[0])
    return None


def resolve_num_classes(ckpt: Mapping[str, Any], state_dict: Mapping[str, Any], arch: str, source: str,
                        flag: int | None) -> int:
    """``--num-classes``, else the training ``args['num_classes']``, safetensors metadata, or
    the classifier weight's shape."""
    if flag:
        return int(flag)
    stored = _train_args(ckpt).get("num_classes")
    if isinstance(stored, int) and not isinstance(stored, bool) and stored > 0:
        return stored
    meta = _metadata(ckpt).get("num_classes", "")
    if meta.isdigit() and int(meta) > 0:
        return int(meta)
    found = _classifier_outputs(arch, state_dict)
    if found is None:
        raise UsageError(f"cannot tell the number of classes of {source} (no args.num_classes, no classifier "
                         "weight found); pass --num-classes N")
    return found


def select_weights(ckpt: Mapping[str, Any], weights: str, source: str) -> tuple[dict[str, Any], str]:
    """(unprefixed state dict, label) of one weight set: ``raw``, ``ema`` or ``ema:N``.

    A ``.safetensors`` file holds one weight set; its metadata ``weights`` (``ema`` for files
    from ``--export-ema``) is the label, and ``--weights ema`` is accepted for such a file.
    Missing EMA weights are a :class:`CheckpointError` listing the keys found (no fallback).
    Every weight set validate.py scores or ``emakit export`` writes comes through here, and
    here it must be finite: a tensor holding NaN or an infinity is a :class:`CheckpointError`
    naming the file, the weight set and the tensor (a score of such weights is meaningless).
    """
    stored = _metadata(ckpt).get("weights", "")
    if ckpt.get("format") == "safetensors" and stored:
        if weights == "raw" or weights == stored or {weights, stored} <= {"ema", "ema:0"}:
            state_dict, label = strip_prefixes(ckpt["state_dict"]), stored
        else:
            raise CheckpointError(f"{source} holds only its {stored!r} weights, not {weights!r}; "
                                  "evaluate it with --weights raw")
    else:
        state_dict, label = extract_state_dict(ckpt, weights, source=source), weights
    problem = describe_nonfinite(state_dict)
    if problem:
        raise CheckpointError(f"{source}: its {label} weights are not finite: {problem}; the file is damaged or "
                              "from a diverged run, use another checkpoint (e.g. an earlier "
                              "checkpoint-<epoch>.pth.tar)")
    return state_dict, label


def check_weights_fit(state_dict: Mapping[str, Any], arch: str, num_classes: int, *, output: str,
                      in_chans: int | None = None, fix: str = "pass --model with the name of the model "
                      "that wrote them") -> None:
    """``UsageError`` unless ``state_dict`` has exactly the keys and shapes of timm's ``arch``
    with ``num_classes`` classes, the labels about to be written to ``output`` with it: a
    wrong class count says the right one, another architecture ends with ``fix``. The models
    are built on the meta device (no memory, no init), so this costs milliseconds."""
    problem = state_dict_mismatch(_shape_model(arch, num_classes, in_chans), state_dict, max_listed=2)
    if problem is None:
        return
    found = _classifier_outputs(arch, state_dict)
    if found is not None and found != num_classes \
            and state_dict_mismatch(_shape_model(arch, found, in_chans), state_dict) is None:
        raise UsageError(f"refusing to write {output}: the weights have {found} classes but would be labelled "
                         f"num_classes={num_classes}; pass --num-classes {found} (or leave --num-classes out)")
    raise UsageError(f"refusing to write {output}: the weights do not fit {arch} with {num_classes} classes, the "
                     f"model they would be labelled with ({problem}); {fix}")


def _shape_model(arch: str, num_classes: int, in_chans: int | None) -> nn.Module:
    """timm's ``arch`` on the meta device (parameter names and shapes only); on the CPU for a
    model whose constructor computes with its tensors."""
    import timm

    check_model_name(arch)
    kwargs: dict[str, Any] = {"num_classes": num_classes, **({"in_chans": in_chans} if in_chans else {})}
    try:
        with torch.device("meta"):
            return timm.create_model(arch, **kwargs)
    except Exception:  # noqa: BLE001 - any failure on meta: the real build says what is wrong, if anything
        return timm.create_model(arch, **kwargs)


# =========================================================================== model
def build_model(arch: str, num_classes: int | None, *, device: torch.device, channels_last: bool = False,
                in_chans: int | None = None, model_kwargs: Mapping[str, Any] | None = None,
                pretrained: bool = False) -> nn.Module:
    """A fresh timm model (:func:`emakit.training.build.build_model`) in eval mode on ``device``;
    ``model_kwargs``: timm's ``--model-kwargs`` (and ``--gp`` as ``global_pool``);
    ``pretrained``: the model's pretrained weights (``num_classes`` None: the model's own)."""
    return _build_model(arch, num_classes, device, channels_last=channels_last, in_chans=in_chans, log=False,
                        factory_kwargs=dict(model_kwargs or {}), pretrained=pretrained).eval()


def load_weights(model: nn.Module, state_dict: Mapping[str, Any], source: str, label: str) -> None:
    """Strict load with an error naming the file, the weight set and the first mismatching keys.

    The auxiliary BatchNorms of a ``--split-bn`` run (``*.aux_bn.<split>.*``, timm's
    ``SplitBatchNorm2d``) are left out when ``model`` has none: in eval mode a split BatchNorm
    is its main one, so the scores are those of the trained model."""
    own = model.state_dict()
    aux = [k for k in state_dict if ".aux_bn." in k and k not in own]
    if aux:
        state_dict = {k: v for k, v in state_dict.items() if k not in set(aux)}
    try:
        check_state_dict_compat(model, state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{source} ({label} weights): {e}") from None
    model.load_state_dict(state_dict, strict=True)


# =========================================================================== data
def _locate_split(root: str, split: str | None, train_split: str, val_split: str | None) -> tuple[str, str]:
    """(split folder to evaluate, folder whose class folders define the label indices).

    Labels come from the train split's class folders when it exists, as in train.py."""
    if split:
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UsageError(f"{root} has no split folder {split}/")
    else:
        names = [n for n in (val_split, "val", "validation") if n]
        path = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
        if path is None:
            if os.path.isdir(os.path.join(root, train_split)):
                raise UsageError(f"{root} has {train_split}/ but no val/ or validation/; pass --split NAME")
            # DIR is a split folder itself: labels from the train split beside it, if any.
            sibling = os.path.join(os.path.dirname(os.path.abspath(root)), train_split)
            same = os.path.abspath(root) == sibling
            return root, sibling if os.path.isdir(sibling) and not same else root
    train_dir = os.path.join(root, train_split)
    return path, train_dir if os.path.isdir(train_dir) else path


def _scan_image_folder(split_dir: str, class_dir: str) -> ImageListDataset:
    """The images of ``split_dir``, labelled by the index of their class among ``class_dir``'s
    class folders (the train split's), as train.py labels them."""
    classes = class_folders(class_dir)
    if not classes:
        raise UsageError(f"{class_dir} has no class folders: expected {class_dir}/<class name>/<image files>")
    paths, targets, _ = scan_split(split_dir, {c: i for i, c in enumerate(classes)})
    return ImageListDataset(paths, targets)


def load_eval_dataset(data: str | None, split: str | None,
                      train_args: Mapping[str, Any]) -> tuple[ImageListDataset, str]:
    """(dataset, description) to evaluate on, labelled as train.py labelled it.

    ``data`` None: the embedded digits split train.py validates on (``split`` ``train`` for
    its training split). Otherwise an ImageFolder root (``split``, the checkpoint's
    ``val_split``, ``val/`` or ``validation/``) or a split folder itself; label indices come
    from the sorted class folders of the train split beside it when there is one.
    """
    if data is None:
        if train_args.get("data"):
            _log.warning("the checkpoint was trained on %s; evaluating on the embedded digits dataset "
                         "(pass DIR to use the training data)", train_args["data"])
        if split not in (None, "val", "validation", "train"):
            raise UsageError(f"--split {split}: the embedded digits dataset has train and val splits")
        splits = load_digits_splits()
        dataset = splits.train if split == "train" else splits.val
        return dataset, f"embedded digits, {'train' if split == 'train' else 'val'} split, {len(dataset)} images"
    if not os.path.isdir(data):
        raise UsageError(f"data folder {data} does not exist or is not a folder")
    split_dir, class_dir = _locate_split(data, split, str(train_args.get("train_split") or "train"),
                                         train_args.get("val_split"))
    dataset = _scan_image_folder(split_dir, class_dir)
    return dataset, f"ImageFolder {split_dir}: {len(dataset)} images, labels from {class_dir}"


def torchvision_eval_settings(train_args: Mapping[str, Any]) -> dict[str, Any]:
    """The eval transform of a torchvision-references checkpoint, in timm's terms.

    torchvision's ``references/classification`` evaluates with ``Resize(val_resize_size)``
    (shorter side) then ``CenterCrop(val_crop_size)``, its ``--interpolation`` and the
    ImageNet mean/std (``presets.ClassificationPresetEval``). timm resizes the shorter side
    to ``floor(img_size / crop_pct)``, so crop_pct = crop / resize, nudged down by ulps when
    float rounding would make the floor one pixel short. {} for other checkpoints.
    """
    crop, resize = train_args.get("val_crop_size"), train_args.get("val_resize_size")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (crop, resize)):
        return {}
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    crop_pct = crop / resize
    while math.floor(crop / crop_pct) < resize:
        crop_pct = math.nextafter(crop_pct, 0.0)
    settings = {"img_size": crop, "crop_pct": crop_pct, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    if isinstance(train_args.get("interpolation"), str) and train_args["interpolation"]:
        settings["interpolation"] = train_args["interpolation"]
    return settings


def eval_data_config(model: nn.Module, train_args: Mapping[str, Any], overrides: Mapping[str, Any], *,
                     use_test_size: bool = True) -> dict[str, Any]:
    """timm ``resolve_data_config`` of the training args' image size, crop, mean, std and
    interpolation (train.py resolves exactly these), each replaced by its flag when given
    (``overrides`` may also hold ``input_size``, ``in_chans`` and ``crop_mode``). Where
    neither gives a size, the model's pretrained cfg's test size is used unless
    ``use_test_size`` is False (``--use-train-size``), as timm's validate.py does."""
    from timm.data import resolve_data_config

    settings = {k: train_args.get(k) for k in _DATA_KEYS if train_args.get(k) not in (None, "")}
    settings.update(torchvision_eval_settings(train_args))
    if "img_size" not in overrides and isinstance(train_args.get("input_size"), (list, tuple)):
        settings["input_size"] = tuple(train_args["input_size"])  # timm's own checkpoints
    if isinstance(train_args.get("in_chans"), int) and not isinstance(train_args["in_chans"], bool):
        settings["in_chans"] = train_args["in_chans"]
    if "img_size" in overrides and "input_size" not in overrides:
        settings.pop("input_size", None)
    settings.update({k: v for k, v in overrides.items() if v not in (None, "")})
    return resolve_data_config(settings, model=model, use_test_size=use_test_size)


# =========================================================================== evaluation
@dataclass
class EvalSetup:
    """What every evaluation of a run shares: the dataset, this process and the runtime settings."""

    dataset: ImageListDataset
    description: str
    dist: DistInfo
    batch_size: int
    workers: int = 0
    amp: AmpSettings = field(default_factory=AmpSettings)
    channels_last: bool = False
    progress: bool = False
    data_overrides: dict[str, Any] = field(default_factory=dict)
    use_test_size: bool = True          # not --use-train-size
    crop_border_pixels: int | None = None
    prefetcher: bool = True             # the GPU input path on CUDA (not --no-prefetcher)
    pin_memory: bool = False
    model_dtype: torch.dtype | None = None
    reparam: bool = False
    test_pool: bool = False
    compile_backend: str | None = None
    compile_mode: str | None = None
    valid_labels: list[int] | None = None
    real_labels: str | None = None      # the real.json file
    metrics_avg: str | None = None
    log_freq: int = 0
    retry: bool = False


@dataclass
class ResultRecord:
    """One evaluated weight set (a row of the results file, the JSON result line)."""

    model: str
    checkpoint: str
    weights: str
    top1: float
    top5: float
    loss: float
    param_count: float
    img_size: int
    crop_pct: float
    interpolation: str
    samples: int
    epoch: int | None = None
    posthoc: dict[str, float] | None = None  # sigma_rel, posthoc_step, decay_equiv, half_life_equiv
    extra: dict[str, float] = field(default_factory=dict)  # --metrics-avg: <avg>_precision, _recall, _f1_score

    def as_dict(self) -> dict[str, Any]:
        """Plain dict in ``RESULT_FIELDS`` order, the ``--metrics-avg`` scores after ``top5_err``
        as timm places them (plus the post-hoc fields for a sweep row)."""
        values = {**vars(self), "top1_err": 100.0 - self.top1, "top5_err": 100.0 - self.top5}
        out: dict[str, Any] = {}
        for k in RESULT_FIELDS:
            out[k] = values[k]
            if k == "top5_err":
                out.update(self.extra)
        out.update(self.posthoc or {})
        return out


def evaluate_weights(model: nn.Module, setup: EvalSetup, train_args: Mapping[str, Any],
                     label: str) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, data config): ``model`` scored on ``setup.dataset`` with the eval transform
    resolved from ``train_args`` and the flags, by train.py's ``evaluate`` (exact under torchrun)."""
    metrics, data_config = evaluate_weight_sets([(model, label)], setup, train_args)
    return metrics[0], data_config


def evaluate_weight_sets(models: Sequence[tuple[nn.Module, str]], setup: EvalSetup, train_args: Mapping[str, Any],
                         ) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """(metrics per model, data config): every ``(model, label)`` of one architecture scored
    in one pass over ``setup.dataset`` (each image decoded once, ``evaluate_many``), with the
    eval transform resolved from ``train_args``, the flags and the first model.

    timm's validate.py steps in its order: ``--reparam`` (on a copy), the data config,
    ``--test-pool`` (crop 1.0 when applied), ``--model-dtype``, ``--torchcompile``; then the
    scores: ``--valid-labels`` keeps those outputs, ``--real-labels`` replaces top-1/top-5,
    ``--metrics-avg`` adds precision/recall/F1. ``--retry``: an out-of-memory error retries
    the pass with a smaller batch (timm's ``decay_batch_step``)."""
    prepared = [(_prepare_model(m, setup), label) for m, label in models]
    data_config = eval_data_config(prepared[0][0], train_args, setup.data_overrides,
                                   use_test_size=setup.use_test_size)
    if setup.test_pool:
        from timm.layers import apply_test_time_pool

        pooled = [apply_test_time_pool(m, data_config) for m, _ in prepared]
        if pooled[0][1]:
            prepared = [(m, label) for (m, _), (_, label) in zip(pooled, prepared)]
            data_config = {**data_config, "crop_pct": 1.0}
    prepared = [(_compile(m.to(dtype=setup.model_dtype) if setup.model_dtype else m, setup), label)
                for m, label in prepared]
    batch_size = setup.batch_size
    while True:
        try:
            return _score(prepared, setup, data_config, batch_size), data_config
        except (RuntimeError, torch.OutOfMemoryError) as e:
            smaller = _retry_batch_size(e, batch_size, setup)
            _log.warning("%s while evaluating with batch %d; retrying with batch %d", one_line(e)[:200], batch_size,
                         smaller)
            batch_size = smaller


def _retry_batch_size(error: BaseException, batch_size: int, setup: EvalSetup) -> int:
    """The next batch size of ``--retry`` after ``error``, or ``error`` raised again: only an
    out-of-memory error is retried (timm retries any RuntimeError its check lets through;
    a shape or code error would only fail again), one process only."""
    from timm.utils import check_batch_size_retry, decay_batch_step

    text = str(error)
    oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower()
    smaller = decay_batch_step(batch_size)
    if not (setup.retry and oom and check_batch_size_retry(text) and smaller > 0):
        raise error
    if setup.dist.distributed:
        raise UsageError("out of memory under torchrun; --retry works in one process: lower -b/--batch-size") \
            from None
    if setup.dist.device.type == "cuda":
        torch.cuda.empty_cache()
    return smaller


def _prepare_model(model: nn.Module, setup: EvalSetup) -> nn.Module:
    """``--reparam`` (timm's ``reparameterize_model``) on a copy; the model itself otherwise.
    A copy also when a later step changes the module (``--test-pool``, ``--model-dtype``):
    the loaded model is kept as it is for the next checkpoint."""
    if setup.reparam:
        from timm.utils import reparameterize_model

        return reparameterize_model(model, inplace=False)
    if setup.test_pool or setup.model_dtype is not None:
        return copy.deepcopy(model)
    return model


def _compile(model: nn.Module, setup: EvalSetup) -> nn.Module:
    if not setup.compile_backend:
        return model
    torch._dynamo.reset()
    return torch.compile(model, backend=setup.compile_backend, mode=setup.compile_mode)


class _Scored(nn.Module):
    """The model's output as validate.py scores it: its first element for a tuple output,
    only the ``--valid-labels`` columns, and each sample's top-5 classes recorded (in the
    order of the batches) for ``--real-labels`` / ``--metrics-avg``."""

    def __init__(self, model: nn.Module, valid: list[int] | None, record: bool) -> None:
        super().__init__()
        self.model = model
        self.valid = None if valid is None else torch.tensor(valid, dtype=torch.long)
        self.record = record
        self.top: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if self.valid is not None:
            out = out[:, self.valid.to(out.device)]
        if self.record:
            self.top.append(out.float().topk(min(5, out.shape[-1]), dim=-1).indices.cpu())
        return out


class _LoggedLoader:
    """timm's ``--log-freq``: a log line (batch, time per batch, images/s) every N batches."""

    def __init__(self, loader: Any, every: int) -> None:
        self.loader, self.every = loader, every

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # batch_size, sampler, dataset: the loader's
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Any:
        import time

        start = last = time.perf_counter()
        total = len(self.loader)
        for i, (inputs, target) in enumerate(self.loader):
            yield inputs, target
            now = time.perf_counter()
            if i % self.every == 0 or i == total - 1:
                _log.info("Test: [%4d/%d]  time %.3fs (%.3fs avg, %.1f/s)", i, total, now - last,
                          (now - start) / (i + 1), inputs.shape[0] / max(now - last, 1e-9))
            last = now


def _score(models: Sequence[tuple[nn.Module, str]], setup: EvalSetup, data_config: Mapping[str, Any],
           batch_size: int) -> list[dict[str, float]]:
    """One pass of every model over ``setup.dataset`` with ``batch_size``."""
    on_device = setup.dist.device.type == "cuda" and setup.prefetcher  # the GPU input path, as in train.py
    _, setup.dataset.transform = build_transforms(dict(data_config), AugmentConfig(), uint8=on_device,
                                                  crop_border_pixels=setup.crop_border_pixels)
    loader: Any = build_eval_loader(setup.dataset, batch_size, setup.dist, workers=setup.workers,
                                    pin_memory=on_device or setup.pin_memory)
    if on_device:
        loader = DeviceLoader(loader, setup.dist.device, data_config["mean"], data_config["std"],
                              dtype=setup.model_dtype or torch.float32)
    if setup.log_freq and setup.dist.is_main:
        loader = _LoggedLoader(loader, setup.log_freq)
    record = bool(setup.real_labels or setup.metrics_avg)
    scored = [_Scored(m, setup.valid_labels, record) for m, _ in models]
    targets = [EvalTarget(s, setup.dist.device, input_dtype=setup.model_dtype, label=f" ({label})")
               for s, (_, label) in zip(scored, models)]
    metrics = evaluate_many(targets, loader, nn.CrossEntropyLoss(), amp=setup.amp,
                            channels_last=setup.channels_last, dist=setup.dist, progress=setup.progress)
    if record:
        for s, m in zip(scored, metrics):
            top = _gather_in_order(s.top, setup.dist)
            if setup.real_labels:
                m["top1"], m["top5"] = real_label_accuracy(setup.real_labels, setup.dataset.items, top)
            if setup.metrics_avg:
                m.update(precision_recall_f1(setup.dataset.targets, top[:, 0], setup.metrics_avg))
    return metrics


def _gather_in_order(parts: Sequence[torch.Tensor], dist: DistInfo) -> torch.Tensor:
    """Every rank's recorded rows back in the dataset's order (rank r evaluated the samples
    ``r, r + world, ...``, :class:`~.data.ShardSampler`)."""
    mine = torch.cat(list(parts)) if parts else torch.zeros(0, 0, dtype=torch.long)
    if not dist.distributed:
        return mine
    import torch.distributed as tdist

    gathered: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(gathered, mine)
    total = sum(len(g) for g in gathered)
    out = torch.zeros(total, max(g.shape[1] for g in gathered), dtype=torch.long)
    for rank, g in enumerate(gathered):
        out[rank::dist.world_size] = g
    return out


def real_label_accuracy(real_json: str, items: Sequence[Any], top: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) against ImageNet's 'ReaL' labels by timm's ``RealLabelsImagenet``: the
    files' base names ``ILSVRC2012_val_<n>.JPEG`` pick each image's list of real labels in
    ``real_json``; images whose list is empty are left out. ``top``: each image's top-5
    classes, best first, in the dataset's order."""
    from timm.data import RealLabelsImagenet

    names = [os.path.basename(str(item)) for item in items]
    if top.shape[1] < 5:
        raise UsageError(f"--real-labels scores the top 5 of ImageNet's classes; this model has {top.shape[1]}")
    try:
        real = RealLabelsImagenet(names, real_json=real_json)
    except (OSError, ValueError) as e:
        raise UsageError(f"--real-labels {real_json}: {one_line(e)[:200]}; give timm's real.json") from None
    except AssertionError:
        raise UsageError(f"--real-labels {real_json}: it lists labels for {_json_len(real_json)} images but the "
                         f"split has {len(names)}; evaluate the whole ImageNet validation split") from None
    # timm takes the top classes from the logits; scores that rank them the same way give the same topk
    scores = torch.zeros(len(top), max(int(top.max()) + 1 if top.numel() else 1, top.shape[1]))
    scores.scatter_(1, top, torch.arange(top.shape[1], 0, -1, dtype=torch.float).expand_as(top).contiguous())
    try:
        real.add_result(scores)
    except KeyError as e:
        raise UsageError(f"--real-labels {real_json}: no labels for image {e}; the images must be named "
                         "ILSVRC2012_val_<n>.JPEG, as ImageNet's validation split") from None
    return real.get_accuracy(k=1), real.get_accuracy(k=5)


def _json_len(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return len(json.load(f))
    except (OSError, ValueError, TypeError):
        return "?"


def precision_recall_f1(targets: Sequence[int], predictions: torch.Tensor, average: str) -> dict[str, float]:
    """timm's ``--metrics-avg``: scikit-learn's precision, recall and F1 score of the top-1
    predictions (``average`` micro, macro or weighted; 0 where undefined), in percent,
    rounded to 4 decimals."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    y, p = list(targets), predictions.tolist()
    return {f"{average}_precision": round(100 * precision_score(y, p, average=average, zero_division=0), 4),
            f"{average}_recall": round(100 * recall_score(y, p, average=average, zero_division=0), 4),
            f"{average}_f1_score": round(100 * f1_score(y, p, average=average, zero_division=0), 4)}


def _make_record(model_name: str, source: str, label: str, model: nn.Module, metrics: Mapping[str, float],
                 data_config: Mapping[str, Any], epoch: Any = None) -> ResultRecord:
    params = sum(p.numel() for p in model.parameters())
    extra = {k: v for k, v in metrics.items() if k.endswith(("_precision", "_recall", "_f1_score"))}
    return ResultRecord(model=model_name, checkpoint=source, weights=label, top1=metrics["top1"],
                        top5=metrics["top5"], loss=metrics["loss"], param_count=round(params / 1e6, 2),
                        img_size=int(data_config["input_size"][-1]), crop_pct=float(data_config["crop_pct"]),
                        interpolation=str(data_config["interpolation"]), samples=int(metrics["samples"]),
                        epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
                        extra=extra)


def _check_labels(dataset: ImageListDataset, num_classes: int, source: str,
                  valid_labels: Sequence[int] | None = None) -> None:
    top = max(dataset.targets, default=-1)
    if valid_labels is not None:
        bad = [i for i in valid_labels if i >= num_classes]
        if bad:
            raise UsageError(f"--valid-labels lists class {bad[0]} but {source} has {num_classes} outputs")
        if top >= len(valid_labels):
            raise UsageError(f"the data has labels up to {top} but --valid-labels keeps {len(valid_labels)} "
                             "outputs; the data's labels index the --valid-labels list")
        return
    if top >= num_classes:
        raise UsageError(f"the data has labels up to {top} but {source} has {num_classes} outputs; "
                         "evaluate it on the data it was trained on (or pass --num-classes)")


# =========================================================================== outputs
def _table_text(rows: Sequence[Mapping[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(list(rows), indent=2) + "\n"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buf.getvalue()


def write_results(records: Sequence[ResultRecord], path: str, fmt: str) -> None:
    """All records as CSV (one row each, ``RESULT_FIELDS`` columns) or a JSON list, atomically;
    a failed write (a full disk) is a one-line ``UsageError`` (:func:`~.outputs.writing_output`)."""
    with writing_output(path):
        write_text_atomic(path, _table_text([r.as_dict() for r in records], fmt))


def export_weights(state_dict: Mapping[str, torch.Tensor], path: str, *, arch: str | None,
                   num_classes: int | None, weights: str, source: str,
                   train_args: Mapping[str, Any] | None = None) -> None:
    """Write one weight set alone, unprefixed, atomically: ``.safetensors`` (metadata arch,
    num_classes, weights, source, and ``args``: the eval-transform settings as JSON, so that
    validate.py scores the file as the checkpoint) or, for any other name, a bare state
    dict ``torch.save``. The labels must fit the weights (:func:`check_weights_fit`). A failed write
    (a full disk) is a one-line ``UsageError``."""
    tensors = dict(strip_prefixes(state_dict))
    if arch and num_classes:
        check_weights_fit(tensors, arch, num_classes, output=path, in_chans=_in_chans(train_args or {}))
    meta = {"format": "pt", "weights": weights, "source": os.path.basename(source),
            "args": _export_args(train_args or {}, arch, num_classes)}
    if arch:
        meta["arch"] = arch
    if num_classes:
        meta["num_classes"] = str(int(num_classes))
    with writing_output(path):
        if path.lower().endswith(".safetensors"):
            save_safetensors(tensors, path, metadata=meta)
        else:
            save_checkpoint(tensors, path)


def timm_load_hint(arch: str, path: str, num_classes: int) -> str:
    """The timm call that loads an exported file with every weight, classifier included.

    ``num_classes`` must also be in the overlay: timm drops the classifier weights when the
    model's ``num_classes`` differs from the pretrained cfg's (its default 1000)."""
    return (f"timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay=dict(file={path!r}, "
            f"num_classes={num_classes}), num_classes={num_classes})")


# =========================================================================== post-hoc
def resolve_posthoc_dir(flag: str | None, checkpoint: str | None) -> str:
    """``--posthoc-dir``, else ``posthoc/`` in the checkpoint's folder (or in the run folder
    given; a DCP checkpoint folder such as ``last.dcp`` is a checkpoint: its parent's)."""
    if flag:
        return flag
    run_folder = os.path.isdir(checkpoint) and resolve_dcp_folder(checkpoint) is None
    folder = checkpoint if run_folder else os.path.dirname(os.path.abspath(checkpoint))
    return os.path.join(folder, "posthoc")


def reconstruct_profiles(snapshot_dir: str, sigma_rels: Sequence[float],
                         step: int | None) -> tuple[list[dict[str, torch.Tensor]], int]:
    """(state dicts, step): ``reconstruct_many`` (one pass over the files) at ``step``
    (default: the last snapshot step); a bad folder or step is a ``UsageError``."""
    if not os.path.isdir(snapshot_dir):
        raise UsageError(f"post-hoc EMA: no snapshot folder {snapshot_dir}; train with --model-ema-posthoc "
                         "or pass --posthoc-dir")
    try:
        snaps = list_snapshots(snapshot_dir)
        if not snaps:
            raise ValueError(f"{snapshot_dir} holds no post-hoc snapshots (posthoc-<step>-s<sigma_rel>.pt); "
                             "train with --model-ema-posthoc or pass --posthoc-dir")
        used = step if step is not None else max(s.step for s in snaps)
        return reconstruct_many(snapshot_dir, sigma_rels, used), used
    except ValueError as e:
        raise UsageError(f"post-hoc EMA: {one_line(e)}") from None


def posthoc_equivalents(sigma_rel: float, step: int) -> dict[str, float]:
    """The classic EMA of the same width at ``step``: per-update decay and half-life (updates)."""
    return {"sigma_rel": sigma_rel, "posthoc_step": step, "decay_equiv": sigma_rel_to_decay(sigma_rel, step),
            "half_life_equiv": sigma_rel_to_half_life(sigma_rel, step)}


@dataclass
class SweepRow:
    """One reconstructed sigma_rel and its evaluation."""

    sigma_rel: float
    step: int
    decay: float
    half_life: float
    record: ResultRecord


def pick_best(rows: Sequence[SweepRow]) -> int:
    """Index of the highest top-1; ties go to the lower loss, then the shorter EMA."""
    return min(range(len(rows)), key=lambda i: (-rows[i].record.top1, rows[i].record.loss, rows[i].sigma_rel))


def save_posthoc_weights(path: str, state_dict: Mapping[str, torch.Tensor], *, sigma_rel: float, step: int,
                         arch: str | None, num_classes: int | None, snapshot_dir: str,
                         reference: Mapping[str, Any] | None = None, reference_path: str | None = None) -> None:
    """Save reconstructed weights: ``.safetensors`` alone (metadata says post-hoc, sigma_rel,
    step), or a checkpoint in our schema with them as ``state_dict_ema`` (timm's
    ``--use-ema`` key) plus the reference checkpoint's raw weights, epoch and args.

    Nothing is written unless the labels fit: the weights (and the reference's raw weights)
    have ``arch``'s parameter names and shapes with ``num_classes`` classes, and every tensor
    is finite; else a ``UsageError`` naming what differs and the fix. A failed write (a full disk) is a
    one-line ``UsageError``."""
    _check_posthoc_output(path, state_dict, arch=arch, num_classes=num_classes, snapshot_dir=snapshot_dir,
                          reference=reference or {}, reference_path=reference_path or "")
    info = {"sigma_rel": float(sigma_rel), "step": int(step), "snapshot_dir": os.path.abspath(snapshot_dir),
            **{k: v for k, v in posthoc_equivalents(sigma_rel, step).items() if k.endswith("_equiv")}}
    if path.lower().endswith(".safetensors"):
        meta = {"format": "pt", "weights": "ema", "posthoc": json.dumps(info),
                "args": _export_args(_train_args(reference or {}), arch, num_classes)}
        meta.update({k: str(v) for k, v in (("arch", arch), ("num_classes", num_classes)) if v})
        with writing_output(path):
            save_safetensors(strip_prefixes(state_dict), path, metadata=meta)
        return
    ref = reference or {}
    state: dict[str, Any] = {"arch": arch, "epoch": ref.get("epoch"), "version": ref.get("version"),
                             "state_dict_ema": dict(state_dict), "args": _train_args(ref), "posthoc": info}
    if ref.get("state_dict") is not None:
        state["state_dict"] = strip_prefixes(ref["state_dict"])
    with writing_output(path):
        save_checkpoint(state, path)


def _check_posthoc_output(path: str, state_dict: Mapping[str, torch.Tensor], *, arch: str | None,
                          num_classes: int | None, snapshot_dir: str, reference: Mapping[str, Any],
                          reference_path: str) -> None:
    """What :func:`save_posthoc_weights` refuses before writing (see there)."""
    problem = describe_nonfinite(state_dict)
    if problem:
        raise UsageError(f"refusing to write {path}: the post-hoc weights from {snapshot_dir} are not finite "
                         f"({problem}); move the snapshot that holds them out of the folder")
    raw = reference.get("state_dict")
    if isinstance(raw, Mapping):
        raw = strip_prefixes(raw)
        differ = set(raw) != set(state_dict) or any(
            isinstance(v, torch.Tensor) and isinstance(raw.get(k), torch.Tensor) and v.shape != raw[k].shape
            for k, v in state_dict.items())
        if differ:
            raise UsageError(f"refusing to write {path}: --checkpoint {reference_path} holds another model than "
                             f"the snapshots in {snapshot_dir} ({_shape_difference(state_dict, raw)}); pass the "
                             "checkpoint of the run that wrote the snapshots")
    if arch and num_classes:
        check_weights_fit(state_dict, arch, num_classes, output=path, in_chans=_in_chans(_train_args(reference)),
                          fix="pass --checkpoint of the run that wrote the snapshots, or --model NAME")


def _shape_difference(ours: Mapping[str, Any], theirs: Mapping[str, Any], limit: int = 2) -> str:
    """The first keys only in the snapshots, only in the checkpoint, and of other shapes."""
    only_ours = [k for k in ours if k not in theirs]
    only_theirs = [k for k in theirs if k not in ours]
    shapes = [f"{k} {list(v.shape)} vs {list(theirs[k].shape)}" for k, v in ours.items()
              if k in theirs and isinstance(v, torch.Tensor) and isinstance(theirs[k], torch.Tensor)
              and v.shape != theirs[k].shape]
    parts = [f"{label}: {', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''}" for label, keys in
             (("only in the snapshots", only_ours), ("only in the checkpoint", only_theirs),
              ("shapes differ", shapes)) if keys]
    return "; ".join(parts)


def new_sweep_id(now: datetime | None = None) -> tuple[str, str]:
    """(sweep id, UTC time) of a new sweep: ``20261122T063012Z-3fa9`` (time plus 4 random hex
    digits, so two sweeps in the same second differ) and ``2026-11-22T06:30:12Z``."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{os.urandom(2).hex()}", f"{now:%Y-%m-%dT%H:%M:%SZ}"


def read_sweep_table(path: str, fmt: str) -> list[dict[str, Any]]:
    """The rows of an existing ``posthoc_sweep.{csv,json}`` (empty if there is none), as
    strings for CSV. ``UsageError`` if the file cannot be read as that format, so an
    unreadable table is never replaced by one that lost its rows."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if fmt == "json":
                rows = json.load(f)
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise ValueError("expected a JSON list of objects")
                return rows
            return [dict(r) for r in csv.DictReader(f)]
    except (OSError, ValueError, csv.Error) as e:
        raise UsageError(f"cannot add this sweep to {path}: {one_line(e)}; move the file away "
                         "or pass --results-file elsewhere") from None


def _sweep_series(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[float], list[float], int | None]]:
    """Per sweep (oldest first): its label, sigma_rels, top-1 and best index, for the plot."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get("sweep_id") or "earlier sweep"), []).append(r)
    series = []
    for sweep_id, group in groups.items():
        try:
            sigmas = [float(r["sigma_rel"]) for r in group]
            top1 = [float(r["top1"]) for r in group]
        except (KeyError, TypeError, ValueError):
            continue  # a row without numbers cannot be plotted; the table keeps it
        best = next((i for i, r in enumerate(group) if str(r.get("best")).lower() == "true"), None)
        when = group[0].get("sweep_time") or sweep_id
        step = group[0].get("posthoc_step")
        series.append((f"{when}" + (f" (step {step})" if step not in (None, "") else ""), sigmas, top1, best))
    return series


def write_sweep_outputs(rows: Sequence[SweepRow], best: int, out_dir: str, fmt: str) -> list[str]:
    """Add this sweep to ``posthoc_sweep.{csv,json}`` in ``out_dir`` and redraw
    ``posthoc_sweep.png``; returns the paths written.

    The table accumulates: one row per sigma_rel per sweep, each tagged with the sweep's
    ``sweep_id`` and ``sweep_time`` (UTC) and ``best`` within its sweep; earlier sweeps'
    rows are kept as they were and the file is rewritten atomically. The PNG shows top-1
    against sigma_rel for every sweep in the table.
    """
    table = os.path.join(out_dir, f"posthoc_sweep.{fmt}")
    earlier = read_sweep_table(table, fmt)
    sweep_id, sweep_time = new_sweep_id()
    new = [{"sweep_id": sweep_id, "sweep_time": sweep_time, **r.record.as_dict(), "best": i == best}
           for i, r in enumerate(rows)]
    with writing_output(table):
        write_text_atomic(table, _table_text(earlier + new, fmt))
    written = [table]
    sweeps = _sweep_series(earlier + new)
    png_path = os.path.join(out_dir, "posthoc_sweep.png")
    with writing_output(png_path):
        png = plot_sweeps(sweeps, png_path, title=f"post-hoc EMA sweeps ({len(sweeps)}), top-1 vs EMA length")
    written.append(str(png))
    return written


# =========================================================================== run
@dataclass
class ValidationReport:
    """What a validate run produced; :func:`report_lines` renders it."""

    records: list[ResultRecord] = field(default_factory=list)
    sweep: list[SweepRow] = field(default_factory=list)
    best: int | None = None
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    description: str = ""


def read_valid_labels(path: str) -> list[int]:
    """timm's ``--valid-labels`` file: one class index per line (blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise UsageError(f"--valid-labels {path}: {e.strerror or e}") from None
    try:
        labels = [int(line) for line in lines if line]
    except ValueError:
        bad = next(line for line in lines if line and not line.lstrip("-").isdigit())
        raise UsageError(f"--valid-labels {path}: {bad[:40]!r} is not a class index; one integer a line") from None
    if not labels or min(labels) < 0 or len(set(labels)) != len(labels):
        raise UsageError(f"--valid-labels {path}: expected distinct class indices >= 0, one a line")
    return labels


def subsample(dataset: ImageListDataset, num_samples: int | None, seed: int) -> ImageListDataset:
    """``--num-samples N``: N samples of ``dataset`` drawn without replacement with ``seed``,
    in the dataset's order (all of them when N is None or not smaller)."""
    if num_samples is None or num_samples >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(dataset), generator=g)[:num_samples].tolist())
    return ImageListDataset([dataset.items[i] for i in keep], [dataset.targets[i] for i in keep])


def model_in_chans(settings: ValidateSettings, train_args: Mapping[str, Any]) -> int | None:
    """Input channels: ``--in-chans``, else ``--input-size``'s C, else the checkpoint's."""
    wanted = settings.weights
    if wanted.in_chans is not None:
        return wanted.in_chans
    if wanted.input_size is not None:
        return wanted.input_size[0]
    return _in_chans(train_args)


def model_kwargs(settings: ValidateSettings) -> dict[str, Any]:
    """``--model-kwargs`` with ``--gp`` as ``global_pool``."""
    kwargs = dict(settings.weights.model_kwargs)
    if settings.weights.gp is not None:
        kwargs["global_pool"] = settings.weights.gp
    return kwargs


def _make_setup(settings: ValidateSettings, dist: DistInfo, train_args: Mapping[str, Any]) -> EvalSetup:
    data, runtime, wanted = settings.data, settings.runtime, settings.weights
    if wants_sources(data.dataset, data.root, data.split):  # --dataset or <split>.tar: sources.py
        dataset, description = load_eval_split(
            data.dataset, data.root, data.split, num_samples=data.num_samples, input_key=data.input_key,
            target_key=data.target_key, class_map=data.class_map, download=data.dataset_download,
            trust_remote_code=data.trust_remote_code, train_args=train_args)
    else:
        dataset, description = load_eval_dataset(data.root, data.split, train_args)
        if data.num_samples is not None and data.num_samples < len(dataset):
            dataset = subsample(dataset, data.num_samples, data.seed)
            description += f", {len(dataset)} of them drawn with seed {data.seed} (--num-samples)"
        dataset.img_mode = image_mode(data.input_img_mode, model_in_chans(settings, train_args) or 3)
    if dist.is_main:
        _log.info("data: %s", description)
    overrides = dict(data.overrides)
    for key, value in (("input_size", wanted.input_size), ("in_chans", wanted.in_chans),
                       ("crop_mode", data.crop_mode)):
        if value is not None:
            overrides[key] = value
    return EvalSetup(dataset=dataset, description=description, dist=dist, batch_size=data.batch_size,
                     workers=data.workers, amp=AmpSettings(enabled=runtime.amp, dtype=runtime.amp_dtype),
                     channels_last=runtime.channels_last, progress=dist.is_main and runtime.progress,
                     data_overrides=overrides, use_test_size=not data.use_train_size,
                     crop_border_pixels=data.crop_border_pixels, prefetcher=data.prefetcher,
                     pin_memory=data.pin_memory,
                     model_dtype=getattr(torch, wanted.model_dtype) if wanted.model_dtype else None,
                     reparam=wanted.reparam, test_pool=wanted.test_pool, compile_backend=runtime.compile_backend,
                     compile_mode=runtime.compile_mode,
                     valid_labels=read_valid_labels(data.valid_labels) if data.valid_labels else None,
                     real_labels=data.real_labels or None, metrics_avg=settings.outputs.metrics_avg,
                     log_freq=data.log_freq, retry=runtime.retry)


class _ModelSlot:
    """Keeps one built model and rebuilds only when (arch, classes, channels) change."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.model: nn.Module | None = None

    def get(self, arch: str, num_classes: int, in_chans: int | None, setup: EvalSetup,
            kwargs: Mapping[str, Any] | None = None) -> nn.Module:
        """The model for (arch, num_classes, in_chans), built on ``setup``'s device if new."""
        key = (arch, num_classes, in_chans)
        if key != self.key or self.model is None:
            self.model = None  # free the old one first
            self.model = build_model(arch, num_classes, device=setup.dist.device,
                                     channels_last=setup.channels_last, in_chans=in_chans, model_kwargs=kwargs)
            self.key = key
        return self.model


def _in_chans(train_args: Mapping[str, Any]) -> int | None:
    value = train_args.get("in_chans")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _evaluate_checkpoint(path: str, settings: ValidateSettings, dist: DistInfo, slot: _ModelSlot,
                         setup: EvalSetup | None, report: ValidationReport) -> EvalSetup:
    """Evaluate the weight sets of one file (and export its EMA if asked); the eval setup is
    built from the first checkpoint's training args and reused."""
    wanted = settings.weights
    ckpt = read_checkpoint(path)
    # Every requested weight set is extracted before anything runs: a missing EMA fails fast.
    chosen = [select_weights(ckpt, w, path) for w in wanted.sets]
    arch = resolve_arch(ckpt, path, wanted.model)
    num_classes = resolve_num_classes(ckpt, chosen[0][0], arch, path, wanted.num_classes)
    train_args = _train_args(ckpt)
    setup = setup or _make_setup(settings, dist, train_args)
    model = slot.get(arch, num_classes, model_in_chans(settings, train_args), setup, model_kwargs(settings))
    # --weights both: the EMA goes into a copy of the model, so both score in one pass
    models = [model] + [copy.deepcopy(model) for _ in chosen[1:]]
    for m, (state_dict, label) in zip(models, chosen):
        load_weights(m, state_dict, path, label)
    _check_labels(setup.dataset, num_classes, path, setup.valid_labels)
    metrics, data_config = evaluate_weight_sets([(m, label) for m, (_, label) in zip(models, chosen)], setup,
                                                train_args)
    for m, (_, label), result in zip(models, chosen, metrics):
        report.records.append(_make_record(arch, path, label, m, result, data_config, ckpt.get("epoch")))
    if settings.outputs.export_ema:
        _export_ema(ckpt, path, wanted.weights, settings.outputs.export_ema, arch, num_classes, setup.dist, report)
    return setup


def _export_ema(ckpt: Mapping[str, Any], path: str, weights: str, out: str, arch: str, num_classes: int,
                dist: DistInfo, report: ValidationReport) -> None:
    """Write the EMA of ``ckpt`` (``weights`` when it names an extra EMA ``ema:N``) to ``out``."""
    which = weights if re.fullmatch(r"ema:[1-9]\d*", weights) else "ema"
    state_dict, label = select_weights(ckpt, which, path)
    if dist.is_main:
        export_weights(state_dict, out, arch=arch, num_classes=num_classes, weights=label, source=path,
                       train_args=_train_args(ckpt))
        report.written.append(out)
        report.notes.append(f"load it with: {timm_load_hint(arch, out, num_classes)}")


def run_checkpoints(settings: ValidateSettings, dist: DistInfo) -> ValidationReport:
    """Evaluate the weight sets of every checkpoint of ``settings.weights.checkpoint``."""
    checkpoint = settings.weights.checkpoint
    paths = find_checkpoints(checkpoint)
    if settings.outputs.export_ema and len(paths) != 1:
        raise UsageError(f"--export-ema needs one checkpoint file; {checkpoint} holds {len(paths)}")
    report, slot, setup = ValidationReport(), _ModelSlot(), None
    for path in paths:
        setup = _evaluate_checkpoint(path, settings, dist, slot, setup, report)
    report.description = setup.description if setup else ""
    return report


def _reference_checkpoint(checkpoint: str | None) -> tuple[str | None, dict[str, Any]]:
    """The checkpoint that describes a post-hoc run (model, args): the file given, or in a
    folder ``last.pth.tar``, else its last checkpoint in natural order."""
    if not checkpoint:
        return None, {}
    paths = find_checkpoints(checkpoint)
    last = [p for p in paths if os.path.basename(p) in ("last.pth.tar", "last.dcp")]
    path = (last or paths)[-1]
    return path, read_checkpoint(path)


def run_posthoc(settings: ValidateSettings, dist: DistInfo) -> ValidationReport:
    """Reconstruct every sigma_rel of ``settings.posthoc``, evaluate each, pick the best, write
    the sweep table and PNG and (``--posthoc-save``) the chosen weights."""
    wanted, posthoc, fmt = settings.weights, settings.posthoc, settings.outputs.results_format
    ref_path, ref = _reference_checkpoint(wanted.checkpoint)
    snapshot_dir = resolve_posthoc_dir(posthoc.snapshot_dir, wanted.checkpoint)
    results_file = settings.outputs.results_file
    out_dir = os.path.dirname(os.path.abspath(results_file)) if results_file \
        else os.path.dirname(os.path.abspath(snapshot_dir))
    # An unreadable sweep table stops the sweep before it runs, not after (on every rank alike).
    read_sweep_table(os.path.join(out_dir, f"posthoc_sweep.{fmt}"), fmt)
    source = ref_path or snapshot_dir
    arch = resolve_arch(ref, source, wanted.model)
    state_dicts, step = reconstruct_profiles(snapshot_dir, posthoc.sigma_rels, posthoc.step)
    num_classes = resolve_num_classes(ref, state_dicts[0], arch, source, wanted.num_classes)
    train_args = _train_args(ref)
    setup = _make_setup(settings, dist, train_args)
    model = build_model(arch, num_classes, device=dist.device, channels_last=settings.runtime.channels_last,
                        in_chans=model_in_chans(settings, train_args), model_kwargs=model_kwargs(settings))
    report = ValidationReport(description=setup.description)
    for sigma_rel, state_dict in zip(posthoc.sigma_rels, state_dicts):
        label = f"posthoc:{sigma_rel:g}"
        load_weights(model, state_dict, snapshot_dir, label)
        _check_labels(setup.dataset, num_classes, source, setup.valid_labels)
        metrics, data_config = evaluate_weights(model, setup, train_args, label)
        record = _make_record(arch, snapshot_dir, label, model, metrics, data_config, ref.get("epoch"))
        record.posthoc = posthoc_equivalents(sigma_rel, step)
        report.records.append(record)
        report.sweep.append(SweepRow(sigma_rel, step, record.posthoc["decay_equiv"],
                                     record.posthoc["half_life_equiv"], record))
    report.best = pick_best(report.sweep)
    if dist.is_main:
        report.written += write_sweep_outputs(report.sweep, report.best, out_dir, fmt)
        if posthoc.save:
            best = report.sweep[report.best]
            save_posthoc_weights(posthoc.save, state_dicts[report.best], sigma_rel=best.sigma_rel,
                                 step=step, arch=arch, num_classes=num_classes, snapshot_dir=snapshot_dir,
                                 reference=ref or None, reference_path=ref_path)
            report.written.append(posthoc.save)
    return report


def run_pretrained(settings: ValidateSettings, dist: DistInfo) -> ValidationReport:
    """timm's validate.py without ``--checkpoint``: the ``--model``'s pretrained weights (timm's
    hub download and cache), ``--num-classes`` or the model's own classes."""
    wanted = settings.weights
    setup = _make_setup(settings, dist, {})
    model = build_model(wanted.model, wanted.num_classes, device=dist.device,
                        channels_last=settings.runtime.channels_last, in_chans=model_in_chans(settings, {}),
                        model_kwargs=model_kwargs(settings), pretrained=True)
    num_classes = int(getattr(model, "num_classes", 0) or wanted.num_classes or 0)
    _check_labels(setup.dataset, num_classes, f"{wanted.model} (pretrained)", setup.valid_labels)
    metrics, data_config = evaluate_weight_sets([(model, "pretrained")], setup, {})
    report = ValidationReport(description=setup.description)
    report.records.append(_make_record(wanted.model, "", "pretrained", model, metrics[0], data_config))
    return report


def run(settings: ValidateSettings, dist: DistInfo) -> ValidationReport:
    """Run what ``settings`` asks (checkpoint evaluation, a post-hoc sweep, or a model's
    pretrained weights); rank 0 writes the results file and any exported weights. Raises
    ``UsageError`` / ``CheckpointError``."""
    from timm.layers import is_fast_norm, set_fast_norm

    from .build import check_compile_backend, seed_all

    check_compile_backend(settings.runtime.compile_backend)
    seed_all(settings.data.seed)  # timm's utils.random_seed(args.seed)
    fast_norm = is_fast_norm()
    set_fast_norm(settings.weights.fast_norm or fast_norm)  # a process-wide switch in timm: put back after
    try:
        if settings.posthoc.sigma_rels:
            report = run_posthoc(settings, dist)
        elif settings.weights.checkpoint:
            report = run_checkpoints(settings, dist)
        else:
            report = run_pretrained(settings, dist)
    finally:
        set_fast_norm(fast_norm)
    results_file = settings.outputs.results_file
    if results_file and dist.is_main:
        write_results(report.records, results_file, settings.outputs.results_format)
        report.written.insert(0, results_file)
    return report


# =========================================================================== rendering
def _fmt(value: float, spec: str) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def format_results_table(records: Sequence[ResultRecord]) -> str:
    """Per checkpoint, its weight sets side by side (top-1, top-5, loss, samples), with an
    ``ema-raw`` column when both were evaluated."""
    blocks: list[str] = []
    by_ckpt: dict[str, list[ResultRecord]] = {}
    for r in records:
        by_ckpt.setdefault(r.checkpoint, []).append(r)
    for path, recs in by_ckpt.items():
        epoch = f", epoch {recs[0].epoch}" if recs[0].epoch is not None else ""
        labels = [r.weights for r in recs]
        pair = ("raw" in labels and "ema" in labels)
        head = f"{'':<8}" + "".join(f"{w:>12}" for w in labels) + (f"{'ema-raw':>12}" if pair else "")
        lines = [f"{path} ({recs[0].model}{epoch}, {recs[0].samples} samples)", head]
        for name, spec in (("top1", "12.3f"), ("top5", "12.3f"), ("loss", "12.4f")):
            row = f"{name:<8}" + "".join(_fmt(getattr(r, name), spec) for r in recs)
            if pair:
                delta = getattr(recs[labels.index("ema")], name) - getattr(recs[labels.index("raw")], name)
                row += _fmt(delta, "+12.3f" if name != "loss" else "+12.4f")
            lines.append(row)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_sweep_table(rows: Sequence[SweepRow], best: int) -> str:
    """sigma_rel, the equivalent classic decay and half-life at the step, top-1/top-5/loss; best marked."""
    lines = [f"post-hoc EMA sweep at step {rows[0].step} (decay and half-life: the classic EMA of equal width)",
             f"{'sigma_rel':>10} {'~decay':>10} {'~half-life':>11} {'top1':>8} {'top5':>8} {'loss':>8}"]
    for i, r in enumerate(rows):
        mark = "  <- best" if i == best else ""
        lines.append(f"{r.sigma_rel:>10.4f} {r.decay:>10.6f} {r.half_life:>11.1f} {_fmt(r.record.top1, '8.3f')} "
                     f"{_fmt(r.record.top5, '8.3f')} {_fmt(r.record.loss, '8.4f')}{mark}")
    return "\n".join(lines)


def report_lines(report: ValidationReport) -> list[str]:
    """What the CLI prints: the tables, one JSON result line per weight set, files written."""
    lines = [format_sweep_table(report.sweep, report.best)] if report.sweep else \
        [format_results_table(report.records)]
    lines += [json.dumps(r.as_dict()) for r in report.records]
    lines += [f"wrote {p}" for p in report.written] + report.notes
    return lines
