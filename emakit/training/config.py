"""Command-line flags of ``train.py``: argparse groups, ``--config`` YAML presets, the dump.

Flag names and defaults follow timm's ``train.py`` where timm has the feature. With neither
a data path nor ``--config``, the embedded-dataset preset (``configs/digits.yaml``) supplies
the defaults, so ``python train.py`` with no argument is a short CPU run on scikit-learn's
digits. Precedence: parser default < ``--config`` YAML < command line. A YAML key
that is not a flag's dest, or a value of the wrong type, is an error naming the key.

Each flag's value has a kind (:mod:`.kinds`: a number > 0, a probability, an integer >= 1,
two numbers MIN <= MAX, a device, a timm policy, ...): one rule per kind, applied to the
command line, the YAML file and the final values alike, so every bad value is a one-line
error before anything is built or written. Rules that relate several flags are in
:func:`_check_args`.
"""
from __future__ import annotations

import argparse
import io
import math
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import yaml

from emakit.posthoc import DTYPES

from . import UsageError, one_line
from .data import AugmentConfig
from .kinds import Parser as _Parser
from .settings import (DataSettings, EmaSettings, LossSettings, ModelSettings, OptimSettings, ParallelSettings,
                       PosthocSettings, RunSettings, ScheduleSettings, TrainSettings)
from .kinds import (EVAL_INTERPOLATION, FRACTION, MEAN, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE,
                    POSITIVE_INT, PROBABILITY, RATE, SEED, SEED_MAX, STD, TRAIN_INTERPOLATION, UNIT_INTERVAL,
                    AutoAugment, Device, check_sigma_rels,
                    Items, Kind, KindError, Number, OneOf, check_parsed)

__all__ = ["build_parser", "parse_args", "parse_settings", "settings_from_args", "load_yaml_defaults",
           "args_to_yaml", "resolve_ema_decay", "CommaList"]

DEFAULT_EMA_DECAY = 0.9998  # timm's --model-ema-decay default
DEFAULT_POSTHOC_SIGMA_RELS = "0.05,0.10"  # EDM2's two tracked profiles
POSTHOC_DTYPES = tuple(DTYPES)  # float16, bfloat16, float32
# 16 snapshot steps reconstruct sigma_rel 0.02-0.20 within 0.3% relative L2 in float16
# (bench/posthoc_budget.py); one step of the two float16 profiles is the model's float32
# bytes plus torch.save headers, so 17x holds 16 steps.
DEFAULT_POSTHOC_BUDGET = "17x"
# The embedded dataset's preset, applied when train.py gets neither a data path nor --config.
DIGITS_PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "configs", "digits.yaml")
_NOT_YAML_KEYS = {"config", "help"}
# The kinds of train.py's multi-value flags (the scalar kinds live in .kinds).
SCALE = Items(FRACTION, "two numbers MIN MAX with 0 < MIN <= MAX <= 1", (2,), increasing=True)
RATIO = Items(POSITIVE, "two numbers MIN MAX with 0 < MIN <= MAX", (2,), increasing=True)
CUTMIX_MINMAX = Items(FRACTION, "two numbers MIN MAX with 0 < MIN <= MAX <= 1", (2,), increasing=True)
BETAS = Items(Number(0, 1, hi_open=True), "1 to 3 numbers in [0, 1)", (1, 2, 3))
MILESTONES = Items(NON_NEGATIVE_INT, "increasing epochs >= 0", increasing=True, strict=True)


class CommaList:
    """argparse ``type`` for a comma-separated list, e.g. ``0.999,0.9998,0.9999``.

    Each item is converted with ``item`` and must be unique. With ``scalar_if_one`` a
    single item stays a scalar, so a one-value flag reads exactly as it did before lists
    (``args.model_ema_decay == 0.9998``). In a ``--config`` YAML file the value may be a
    scalar, a YAML list or the same comma-separated string (:meth:`from_yaml`).
    """

    def __init__(self, item: type, what: str, *, scalar_if_one: bool = True) -> None:
        self.item = item
        self.what = what
        self.scalar_if_one = scalar_if_one
        self.__name__ = f"comma-separated {what}s"  # argparse names the type in some messages

    def __call__(self, text: str) -> Any:
        if not str(text).strip():
            raise argparse.ArgumentTypeError(f"invalid value {str(text)!r} (empty); give one or more "
                                             f"{self.what} values separated by commas, or leave the flag out")
        return self._convert([part.strip() for part in str(text).split(",")], str(text))

    def _convert(self, parts: list[Any], shown: str) -> Any:
        values = []
        for part in parts:
            if part == "" or part is None:
                raise argparse.ArgumentTypeError(f"empty item in {shown!r}; separate {self.what}s with commas")
            try:
                value = self.item(part)
            except (TypeError, ValueError):
                raise argparse.ArgumentTypeError(f"{part!r} in {shown!r} is not a {self.what}") from None
            if isinstance(part, bool) or (self.item is float and not math.isfinite(value)):
                raise argparse.ArgumentTypeError(f"{part!r} in {shown!r} is not a {self.what}")
            values.append(value)
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{shown!r} lists a {self.what} twice")
        return values[0] if self.scalar_if_one and len(values) == 1 else values

    def from_yaml(self, key: str, value: Any) -> Any:
        """A YAML scalar, list or comma-separated string -> what the command line gives."""
        try:
            if isinstance(value, list):
                if not value:
                    raise argparse.ArgumentTypeError(f"expected at least one {self.what}")
                return self._convert(value, ",".join(map(str, value)))
            if isinstance(value, str):
                return self(value)
            return self._convert([value], str(value))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"config key {key!r}: {e}") from None


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", default=None, metavar="DIR",
                        help="ImageFolder root with train/ and val/ (or validation/) class folders; "
                             "omitted: the embedded digits dataset (default: None)")
    g = parser.add_argument_group("Dataset parameters")
    g.add_argument("--train-split", default="train", metavar="NAME", help="train split folder (default: train)")
    g.add_argument("--val-split", default=None, metavar="NAME",
                   help="validation split folder (default: None = val/ or validation/, whichever exists)")
    g.add_argument("--label-noise", type=RATE, default=0.0, metavar="FRAC",
                   help="flip this fraction of the training labels to a random other class, chosen with "
                        "--seed (the same flips on resume); validation labels stay clean. Any dataset; "
                        "configs/digits-noisy.yaml uses 0.4 to show what the EMA length does (default: 0.0)")
    g.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction, default=False,
                   help="decode every image before training and skip unreadable ones with a warning, "
                        "instead of stopping with an error naming the file (default: False)")
    g.add_argument("--num-classes", type=POSITIVE_INT, default=None, metavar="N",
                   help="number of classes (default: None = number of class folders in the data)")
    g.add_argument("--img-size", type=POSITIVE_INT, default=None, metavar="N",
                   help="image size (default: None = model default; digits preset: 32)")
    g.add_argument("--crop-pct", type=FRACTION, default=None, metavar="PCT",
                   help="validation center-crop fraction in (0, 1] (default: None = model default; digits preset: 1.0)")
    g.add_argument("--mean", type=MEAN, nargs="+", default=None, metavar="MEAN",
                   help="normalisation mean: 3 numbers (R G B) or 1 for all (default: None = model default)")
    g.add_argument("--std", type=STD, nargs="+", default=None, metavar="STD",
                   help="normalisation std: 3 numbers > 0 (R G B) or 1 for all (default: None = model default)")
    g.add_argument("--interpolation", type=EVAL_INTERPOLATION, default="", metavar="NAME",
                   help="resize interpolation for validation: nearest, bilinear, bicubic, box, hamming, lanczos "
                        "(default: '' = model default)")
    g.add_argument("-b", "--batch-size", type=POSITIVE_INT, default=128, metavar="N",
                   help="batch size per process (default: 128; digits preset: 64)")
    g.add_argument("-vb", "--validation-batch-size", type=POSITIVE_INT, default=None, metavar="N",
                   help="validation batch size (default: None = --batch-size)")
    g.add_argument("-j", "--workers", type=NON_NEGATIVE_INT, default=4, metavar="N",
                   help="data loader worker processes per rank (default: 4; digits preset: 0 = load in "
                        "the main process, fastest for in-memory images)")
    g.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=False,
                   help="pin CPU memory in the data loaders (default: False)")
    g.add_argument("--no-prefetcher", action="store_true", default=False,
                   help="on CUDA, do not use the GPU input path (uint8 batches copied on a side stream, "
                        "normalised and randomly erased on the GPU); the CPU always normalises in the "
                        "loader workers (default: False)")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Model parameters")
    g.add_argument("--model", default="resnet50", metavar="MODEL",
                   help="timm model name (default: resnet50; digits preset: resnet18)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="start from pretrained weights in the local file --pretrained-path; "
                        "nothing is ever downloaded (default: False)")
    g.add_argument("--pretrained-path", default=None, metavar="FILE",
                   help="local weights file for --pretrained (.pth/.safetensors) (default: None)")
    g.add_argument("--drop", type=RATE, default=0.0, metavar="PCT", help="dropout rate in [0, 1) (default: 0.0)")
    g.add_argument("--drop-path", type=RATE, default=None, metavar="PCT",
                   help="drop-path rate in [0, 1) (default: None)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="use the channels_last memory layout (default: False)")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model with BACKEND (default: None; bare flag: inductor)")
    g.add_argument("--grad-accum-steps", type=POSITIVE_INT, default=1, metavar="N",
                   help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--resume", default="", metavar="PATH",
                   help="resume model, EMA, optimizer, scheduler and scaler from this checkpoint (default: '')")
    g.add_argument("--no-resume-opt", action="store_true", default=False,
                   help="on --resume, do not restore optimizer/scheduler/scaler state (default: False)")
    g.add_argument("--drop-ema", action="store_true", default=False,
                   help="on --resume without --model-ema, drop the checkpoint's EMA(s) instead of refusing to "
                        "resume (default: False)")


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Optimizer parameters")
    g.add_argument("--opt", default="sgd", metavar="OPTIMIZER", help="timm optimizer name (default: sgd)")
    g.add_argument("--opt-eps", type=POSITIVE, default=None, metavar="EPS",
                   help="optimizer epsilon > 0 (default: None = the optimizer's)")
    g.add_argument("--opt-betas", type=BETAS, nargs="+", default=None, metavar="BETA",
                   help="optimizer betas, 1 to 3 numbers in [0, 1) (default: None = the optimizer's)")
    g.add_argument("--no-opt-fused", action="store_true", default=False,
                   help="step SGD, Adam and AdamW with torch's loop over parameters instead of its fused "
                        "kernel (one pass over all parameters: resnet18's SGD step takes 10 ms instead of 48 ms "
                        "on a 2-core CPU; the results differ from the loop's in the last bits). Not fused under "
                        "--fsdp, where torch has no sharded SGD kernel (default: False = fused where torch has "
                        "it)")
    g.add_argument("--momentum", type=UNIT_INTERVAL, default=0.9, metavar="M",
                   help="SGD momentum in [0, 1] (default: 0.9)")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=2e-5, metavar="WD",
                   help="weight decay >= 0 (default: 2e-5; digits preset: 5e-5)")
    g.add_argument("--clip-grad", type=POSITIVE, default=None, metavar="NORM",
                   help="clip gradients at this norm/value > 0 (default: None = no clipping)")
    g.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"],
                   help="gradient clipping mode (default: norm)")
    g.add_argument("--layer-decay", type=POSITIVE, default=None, metavar="RATE",
                   help="layer-wise learning-rate decay > 0 (default: None = off)")
    g.add_argument("--on-nonfinite", default="stop", choices=["stop", "skip"],
                   help="a step whose loss or gradients are NaN/inf is never taken and never reaches the EMA; "
                        "stop: end the run (exit 3) naming the step and the last good checkpoint; skip: skip "
                        "the step, as the fp16 gradient scaler does, and stop after --max-nonfinite-skips such "
                        "steps in a row (default: stop)")
    g.add_argument("--max-nonfinite-skips", type=POSITIVE_INT, default=10, metavar="N",
                   help="with --on-nonfinite skip: stop (exit 3) after N non-finite steps in a row (default: 10)")


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Learning rate schedule parameters")
    g.add_argument("--sched", default="cosine", metavar="SCHEDULER",
                   help="timm LR scheduler: cosine, step, multistep, plateau, poly, tanh, or none (= constant: "
                        "the lr stays at --lr after --warmup-epochs) (default: cosine)")
    g.add_argument("--sched-on-updates", action=argparse.BooleanOptionalAction, default=False,
                   help="step the LR schedule every optimizer update instead of every epoch (default: False)")
    g.add_argument("--lr", type=POSITIVE, default=None, metavar="LR",
                   help="learning rate > 0 (default: None = lr-base * global batch / lr-base-size)")
    g.add_argument("--lr-base", type=POSITIVE, default=0.1, metavar="LR",
                   help="base learning rate (> 0) at --lr-base-size images per step (default: 0.1; digits preset: 0.8)")
    g.add_argument("--lr-base-size", type=POSITIVE_INT, default=256, metavar="N",
                   help="batch size of --lr-base (default: 256)")
    g.add_argument("--lr-base-scale", default="", choices=["", "linear", "sqrt"],
                   help="lr scaling with batch size (default: '' = sqrt for ada*/lamb, else linear)")
    g.add_argument("--warmup-lr", type=NON_NEGATIVE, default=1e-5, metavar="LR",
                   help="warmup start lr >= 0 (default: 1e-5)")
    g.add_argument("--min-lr", type=NON_NEGATIVE, default=0.0, metavar="LR", help="lr floor >= 0 (default: 0.0)")
    g.add_argument("--epochs", type=POSITIVE_INT, default=300, metavar="N",
                   help="epochs to train (default: 300; digits preset: 10)")
    g.add_argument("--warmup-epochs", type=NON_NEGATIVE_INT, default=5, metavar="N",
                   help="lr warmup epochs (default: 5; digits preset: 0)")
    g.add_argument("--warmup-prefix", action=argparse.BooleanOptionalAction, default=False,
                   help="exclude warmup from the decay schedule (default: False)")
    g.add_argument("--cooldown-epochs", type=NON_NEGATIVE_INT, default=0, metavar="N",
                   help="cooldown epochs (default: 0)")
    g.add_argument("--decay-epochs", type=POSITIVE, default=90, metavar="N",
                   help="step-decay interval > 0 (default: 90)")
    g.add_argument("--decay-milestones", type=MILESTONES, nargs="+", default=[90, 180, 270], metavar="EPOCH",
                   help="multistep decay epochs, increasing (default: 90 180 270)")
    g.add_argument("--decay-rate", type=POSITIVE, default=0.1, metavar="RATE", help="lr decay rate > 0 (default: 0.1)")
    g.add_argument("--patience-epochs", type=NON_NEGATIVE_INT, default=10, metavar="N",
                   help="plateau scheduler patience (default: 10)")


def _add_augment_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Augmentation and regularization parameters")
    g.add_argument("--no-aug", action="store_true", default=False,
                   help="disable all training augmentation (default: False)")
    g.add_argument("--scale", type=SCALE, nargs="+", default=[0.08, 1.0], metavar="PCT",
                   help="random-resized-crop area range MIN MAX, 0 < MIN <= MAX <= 1 (default: 0.08 1.0; "
                        "digits preset: 0.5 1.0)")
    g.add_argument("--ratio", type=RATIO, nargs="+", default=[3.0 / 4.0, 4.0 / 3.0], metavar="RATIO",
                   help="random-resized-crop aspect ratio range MIN MAX, 0 < MIN <= MAX (default: 0.75 1.33)")
    g.add_argument("--hflip", type=PROBABILITY, default=0.5,
                   help="horizontal flip probability in [0, 1] (default: 0.5; digits preset: 0.0, digits are not "
                        "mirror-symmetric)")
    g.add_argument("--vflip", type=PROBABILITY, default=0.0,
                   help="vertical flip probability in [0, 1] (default: 0.0)")
    g.add_argument("--color-jitter", type=NON_NEGATIVE, default=0.4, metavar="PCT",
                   help="color jitter >= 0 (default: 0.4)")
    g.add_argument("--aa", type=AutoAugment(), default=None, metavar="NAME",
                   help="timm AutoAugment policy, e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0; "
                        "checked by building it with timm (default: None)")
    g.add_argument("--reprob", type=PROBABILITY, default=0.0, metavar="PCT",
                   help="random erase probability in [0, 1] (default: 0.0)")
    g.add_argument("--remode", type=OneOf(("pixel", "rand", "const")), default="pixel",
                   help="random erase mode: pixel, rand or const (timm's) (default: pixel)")
    g.add_argument("--recount", type=POSITIVE_INT, default=1, help="random erase count >= 1 (default: 1)")
    g.add_argument("--mixup", type=NON_NEGATIVE, default=0.0, help="mixup alpha >= 0, on if > 0 (default: 0.0)")
    g.add_argument("--cutmix", type=NON_NEGATIVE, default=0.0, help="cutmix alpha >= 0, on if > 0 (default: 0.0)")
    g.add_argument("--cutmix-minmax", type=CUTMIX_MINMAX, nargs="+", default=None,
                   help="cutmix box area range MIN MAX, 0 < MIN <= MAX <= 1; replaces --cutmix alpha (default: None)")
    g.add_argument("--mixup-prob", type=PROBABILITY, default=1.0,
                   help="probability of mixup/cutmix per batch, in [0, 1] (default: 1.0)")
    g.add_argument("--mixup-switch-prob", type=PROBABILITY, default=0.5,
                   help="probability of cutmix instead of mixup when both are on, in [0, 1] (default: 0.5)")
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"],
                   help="mixup/cutmix granularity (default: batch)")
    g.add_argument("--mixup-off-epoch", type=NON_NEGATIVE_INT, default=0, metavar="N",
                   help="turn mixup off from this epoch, 0 = never (default: 0)")
    g.add_argument("--smoothing", type=RATE, default=0.1, help="label smoothing in [0, 1) (default: 0.1)")
    g.add_argument("--train-interpolation", type=TRAIN_INTERPOLATION, default="random",
                   help="training resize interpolation: random, nearest, bilinear, bicubic, box, hamming, lanczos, "
                        "or '' = the validation one (default: random)")
    g.add_argument("--dist-bn", default="reduce", choices=["reduce", "broadcast", ""],
                   help="sync BatchNorm buffers across ranks before each evaluation, raw and EMA "
                        "(default: reduce; '' = off)")


def _add_ema_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Model exponential moving average parameters")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=False,
                   help="track an EMA of the weights and validate it every epoch "
                        "(default: False as in timm; digits preset: True)")
    g.add_argument("--model-ema-decay", type=CommaList(float, "decay"), default=None, metavar="DECAY[,DECAY...]",
                   help=f"per-step EMA decay; a comma list (0.999,0.9998,0.9999) tracks one EMA per value in "
                        f"one fused update (default: None = {DEFAULT_EMA_DECAY} unless --model-ema-half-life "
                        "is given)")
    g.add_argument("--model-ema-warmup", action=argparse.BooleanOptionalAction, default=False,
                   help="timm's EMA warmup: same as --model-ema-schedule warmup (default: False)")
    g.add_argument("--model-ema-force-cpu", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the EMA on the CPU; unlike timm it is still validated (default: False)")
    g.add_argument("--model-ema-half-life", type=CommaList(str, "half-life"), default=None,
                   metavar="TIME[,TIME...]",
                   help="EMA half-life instead of a decay: '2000ba' (steps), '0.5ep' (epochs), "
                        "'1.2Mimg' (images); a comma list tracks one EMA per value; ignored when "
                        "--model-ema-decay is given (default: None; digits preset: 0.5ep)")
    g.add_argument("--model-ema-schedule", default="constant", metavar="NAME",
                   help="decay schedule: constant, warmup, threshold, exp (default: constant)")
    g.add_argument("--model-ema-every", type=int, default=1, metavar="K",
                   help="average every K optimizer steps with decay**K (default: 1)")
    g.add_argument("--model-ema-after", type=NON_NEGATIVE_INT, default=0, metavar="N",
                   help="copy the model instead of averaging for the first N optimizer steps and the first "
                        "averaging one after them, as timm's ModelEmaV3(update_after_step=N) (default: 0: the "
                        "first step copies)")
    g.add_argument("--model-ema-dtype", default=None, metavar="DTYPE",
                   help="EMA dtype, e.g. float32 master weights under bf16 AMP (default: None = model's)")
    g.add_argument("--model-ema-buffers", default="average", choices=["average", "copy"],
                   help="average float buffers (BatchNorm statistics) or copy them (default: average)")
    g.add_argument("--model-ema-select", default="first", choices=["first", "best"],
                   help="with several EMAs, the one whose --eval-metric picks model_best: first (the first "
                        "decay/half-life, stored as state_dict_ema) or best (the best EMA of each epoch) "
                        "(default: first)")
    g.add_argument("--model-ema-bn-recal", type=NON_NEGATIVE_INT, default=0, metavar="N",
                   help="before evaluating each EMA, recompute its BatchNorm statistics over N training "
                        "batches per process; the EMA's averaged statistics are restored after the "
                        "evaluation, so averaging goes on unchanged (default: 0 = off)")


def _add_posthoc_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Post-hoc EMA (EDM2): snapshots to choose the EMA length after training")
    g.add_argument("--model-ema-posthoc", action=argparse.BooleanOptionalAction, default=False,
                   help="track power-function EMAs (Karras et al. 2024) and save their snapshots under "
                        "<run>/posthoc/, so validate.py --posthoc-sigma-rel can rebuild any EMA length "
                        "afterwards; with --fsdp each rank tracks its shards and every snapshot is gathered to "
                        "rank 0, which writes the same files (default: False)")
    g.add_argument("--posthoc-sigma-rels", type=CommaList(float, "sigma_rel", scalar_if_one=False),
                   default=DEFAULT_POSTHOC_SIGMA_RELS, metavar="S[,S...]",
                   help=f"relative widths of the tracked profiles, each in (0, 0.2887] "
                        f"(default: {DEFAULT_POSTHOC_SIGMA_RELS})")
    g.add_argument("--posthoc-budget", default=DEFAULT_POSTHOC_BUDGET, metavar="SIZE",
                   help="disk budget of the snapshot folder: a multiple of the model's float32 bytes (8x), a "
                        "size (512MiB, 2GiB, 500MB) or none. The snapshot interval is chosen from the planned "
                        "steps so the run fits; a run extended with --resume thins older snapshots (every "
                        "other one) to stay inside it. One snapshot step of the default two float16 profiles "
                        f"takes about 1x (default: {DEFAULT_POSTHOC_BUDGET} = 16 snapshot steps, enough for "
                        "< 0.3%% reconstruction error over sigma_rel 0.02-0.20, see BENCHMARKS.md)")
    g.add_argument("--posthoc-every", type=POSITIVE_INT, default=None, metavar="N",
                   help="optimizer steps between snapshots, plus one at the last step; widened (doubled) "
                        "when the run would not fit --posthoc-budget (default: None = ceil(total steps / the "
                        "snapshot steps the budget holds), or ceil(total steps / 50) with --posthoc-budget "
                        "none; a resumed run keeps its interval)")
    g.add_argument("--posthoc-dtype", default="float16", choices=list(POSTHOC_DTYPES),
                   help="dtype of the stored snapshots; the profiles are accumulated in float32 "
                        "(default: float16, as EDM2)")
    g.add_argument("--posthoc-max-snapshots", type=Number(2, integer=True), default=None, metavar="N",
                   help="also bound the folder to N snapshot steps: when full, every other one is deleted and "
                        "the interval doubles (default: None = only --posthoc-budget bounds it)")


def _add_misc_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Miscellaneous parameters")
    g.add_argument("--seed", type=SEED, default=42, metavar="S",
                   help=f"random seed in [0, {SEED_MAX}] (numpy's range) (default: 42)")
    g.add_argument("--log-interval", type=POSITIVE_INT, default=50, metavar="N",
                   help="optimizer steps between training log lines (default: 50)")
    g.add_argument("--checkpoint-hist", type=NON_NEGATIVE_INT, default=10, metavar="N",
                   help="number of best epoch checkpoints to keep (default: 10)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="mixed precision with torch.autocast (default: False)")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"],
                   help="autocast dtype; float16 uses a gradient scaler (default: float16)")
    g.add_argument("--device", type=Device(), default=None, metavar="DEV",
                   help="device: cpu, cuda, cuda:N or mps, where available (default: None = cuda if available, "
                        "else cpu; cuda:<local rank> under torchrun)")
    g.add_argument("--output", default="./output", metavar="PATH",
                   help="parent folder of the run folder (default: ./output)")
    g.add_argument("--experiment", default="", metavar="NAME",
                   help="run folder name (default: '' = YYYYMMDD-HHMMSS-<model>-<img size>, or the "
                        "resumed checkpoint's folder with --resume)")
    g.add_argument("--eval-metric", default="top1", choices=["top1", "top5", "loss"],
                   help="metric that picks model_best, on the EMA when it is on (see --model-ema-select) "
                        "(default: top1)")
    g.add_argument("--no-progress", action="store_true", default=False,
                   help="no tqdm progress bars (default: False; bars only on rank 0 and a TTY)")


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Scaling out (torchrun)")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False,
                   help="shard the model, its gradients, the optimizer state and the EMA(s) over the processes "
                        "with FSDP2 (torch fully_shard) instead of replicating them with DDP; needs torchrun "
                        "(--nproc_per_node=1 is fine); --amp-dtype float16 uses torch's ShardedGradScaler; not with "
                        "--torchcompile. "
                        "With --model-ema-posthoc every rank tracks its shards of the profiles and the snapshots "
                        "are gathered: on a snapshot step each profile is gathered to rank 0, which writes the "
                        "same files as without --fsdp (default: False = DDP)")
    g.add_argument("--fsdp-reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="with --fsdp, free each block's gathered weights after its forward (least memory, one "
                        "more all-gather per block in backward); --no-fsdp-reshard-after-forward keeps them "
                        "until the backward (default: True)")
    g.add_argument("--checkpoint-format", default="file", choices=["file", "dcp"],
                   help="file: last.pth.tar / model_best.pth.tar / checkpoint-<epoch>.pth.tar, one timm-compatible "
                        "file gathered on rank 0; dcp: last.dcp and model_best.dcp, torch.distributed.checkpoint "
                        "folders every rank writes its shards into (no gather; --checkpoint-hist does not apply). "
                        "Both resume on any process count, with or without --fsdp (default: file)")


def build_parser() -> argparse.ArgumentParser:
    """The full ``train.py`` parser (no ``--config``; see :func:`parse_args`)."""
    parser = _Parser(prog="train.py", description="Train a timm image classifier with an EMA of its weights.")
    parser.add_argument("-c", "--config", default="", metavar="FILE.yaml",
                        help="YAML file of flag dests (e.g. model_ema_decay: 0.9999) used as defaults; "
                             "the command line still wins (default: '')")
    for add in (_add_data_args, _add_model_args, _add_optimizer_args, _add_schedule_args,
                _add_augment_args, _add_ema_args, _add_posthoc_args, _add_misc_args, _add_parallel_args):
        add(parser)
    return parser


def _bool_action(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                               argparse.BooleanOptionalAction))


def _check_scalar(key: str, action: argparse.Action, value: Any) -> Any:
    kind = action.type or str
    if isinstance(kind, CommaList):
        return kind.from_yaml(key, value)
    if isinstance(kind, Kind):  # the command line's rule, also for YAML values
        try:
            return kind.from_yaml(value)
        except KindError as e:
            raise UsageError(f"config key {key!r}: {e}") from None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f"config key {key!r}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise UsageError(f"config key {key!r}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config key {key!r}: expected a number, got {value!r}")
        value = float(value)
    if kind is str and not isinstance(value, str):
        raise UsageError(f"config key {key!r}: expected a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise UsageError(f"config key {key!r}: {value!r} is not one of {choices}")
    return value


def _check_value(key: str, action: argparse.Action, value: Any) -> Any:
    """The YAML value converted to what the command line would give, or ``UsageError``."""
    if value is None:
        if action.default is None or action.nargs == "?":
            return None
        raise UsageError(f"config key {key!r}: null is not allowed (default is {action.default!r})")
    if _bool_action(action):
        if not isinstance(value, bool):
            raise UsageError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1:
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            raise UsageError(f"config key {key!r}: expected a list, got {value!r}")
        return [_check_scalar(key, action, v) for v in value]
    return _check_scalar(key, action, value)


def load_yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a ``--config`` file: a mapping of parser dests to values, each type-checked."""
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({one_line(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_YAML_KEYS}
    checked = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise UsageError(f"--config {path}: unknown key {key!r} (keys are flag names with _ "
                             f"for -, e.g. model_ema_decay; see train.py --help)")
        checked[dest] = _check_value(str(key), actions[dest], value)
    return checked


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the defaults of an optional ``--config`` YAML file.

    The parser's defaults are timm's. With no data path and no ``--config``, the embedded
    dataset's preset ``configs/digits.yaml`` supplies the defaults instead, so a bare
    ``python train.py`` is a sensible short run while ``train.py DATA ...`` behaves like timm.
    Raises ``UsageError`` for unknown flags, bad values, unknown YAML keys and wrong types.
    """
    parser = build_parser()
    pre = _Parser(add_help=False)
    pre.add_argument("-c", "--config", default="")
    known, _ = pre.parse_known_args(argv)
    config = known.config
    if not config and parser.parse_args(argv).data is None:
        config = DIGITS_PRESET
        if not os.path.isfile(config):
            raise UsageError(f"the embedded dataset's preset {config} is missing; pass --config FILE or a data path")
    if config:
        parser.set_defaults(**load_yaml_defaults(config, parser))
    args = parser.parse_args(argv)
    args.config = config
    check_parsed(parser, args, parser.error)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    """Rules that relate several flags (each flag's own rule is its kind, see :mod:`.kinds`)."""
    if args.pretrained and not args.pretrained_path:
        raise UsageError("--pretrained needs --pretrained-path FILE: emakit never downloads weights")
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup and args.batch_size % 2:
        raise UsageError(f"--mixup/--cutmix need an even --batch-size, got {args.batch_size}")
    if args.model_ema_warmup and args.model_ema_schedule not in ("constant", "warmup"):
        raise UsageError(f"--model-ema-warmup conflicts with --model-ema-schedule {args.model_ema_schedule}")
    if args.model_ema_bn_recal and not args.model_ema:
        raise UsageError("--model-ema-bn-recal recalibrates the EMA's BatchNorm statistics: add --model-ema")
    _check_posthoc_args(args)
    _check_parallel_args(args)
    if args.resume and os.path.isdir(args.resume):
        from .resume import check_resume_folder

        check_resume_folder(args.resume)


def _check_parallel_args(args: argparse.Namespace) -> None:
    """``--fsdp`` needs torchrun's process group and refuses what it does not support
    (``--amp-dtype float16``)."""
    if not args.fsdp:
        if not args.fsdp_reshard_after_forward:
            raise UsageError("--no-fsdp-reshard-after-forward applies to --fsdp: add --fsdp or drop it")
        return
    if args.torchcompile:
        raise UsageError("--torchcompile with --fsdp is not supported (torch.compile of the sharded model fails in "
                         "inductor while compiling the backward): drop --torchcompile")
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise UsageError("--fsdp needs a process group: launch with torchrun, e.g. torchrun --nproc_per_node=2 "
                         "train.py --fsdp ... (--nproc_per_node=1 is fine)")


def _check_posthoc_args(args: argparse.Namespace) -> None:
    from emakit.posthoc import parse_budget

    if not args.model_ema_posthoc:
        for name in ("posthoc_every", "posthoc_max_snapshots"):
            if getattr(args, name) is not None:
                raise UsageError(f"--{name.replace('_', '-')} needs --model-ema-posthoc")
        return
    try:
        parse_budget(args.posthoc_budget)
    except ValueError as e:
        raise UsageError(f"--posthoc-{one_line(e)}") from None
    check_sigma_rels(args.posthoc_sigma_rels, "--posthoc-sigma-rels")


def resolve_ema_decay(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(decay, half_life, schedule) for the EMA(s): exactly one of decay / half-life is set.

    Each is a scalar for one EMA or a list for several (see :class:`CommaList`). An explicit
    ``--model-ema-decay`` wins over the preset's default half-life.
    """
    schedule = "warmup" if args.model_ema_warmup else args.model_ema_schedule
    if args.model_ema_decay is not None:
        return args.model_ema_decay, None, schedule
    if args.model_ema_half_life:
        return None, args.model_ema_half_life, schedule
    return DEFAULT_EMA_DECAY, None, schedule


def _tuple(value: Any) -> tuple | None:
    """A list flag's value as a tuple (None stays None; a scalar is a tuple of one)."""
    if value is None:
        return None
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The frozen :class:`~.settings.TrainSettings` of parsed (and checked) flags: built once
    here, read by everything below the command line."""
    decay, half_life, schedule = resolve_ema_decay(args)
    posthoc = PosthocSettings(sigma_rels=_tuple(args.posthoc_sigma_rels), every=args.posthoc_every,
                              dtype=args.posthoc_dtype, budget=args.posthoc_budget,
                              max_snapshots=args.posthoc_max_snapshots) if args.model_ema_posthoc else None
    augment = AugmentConfig(no_aug=args.no_aug, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                            vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
                            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
                            re_count=args.recount)
    return TrainSettings(
        data=DataSettings(path=args.data, train_split=args.train_split, val_split=args.val_split,
                          skip_bad_images=args.skip_bad_images, label_noise=args.label_noise,
                          num_classes=args.num_classes, batch_size=args.batch_size,
                          eval_batch_size=args.validation_batch_size, workers=args.workers, pin_memory=args.pin_mem,
                          prefetcher=not args.no_prefetcher, img_size=args.img_size, crop_pct=args.crop_pct,
                          mean=_tuple(args.mean), std=_tuple(args.std), interpolation=args.interpolation,
                          augment=augment),
        model=ModelSettings(name=args.model, drop_rate=args.drop, drop_path_rate=args.drop_path,
                            pretrained_path=args.pretrained_path if args.pretrained else None,
                            channels_last=args.channels_last, compile_backend=args.torchcompile or None),
        ema=EmaSettings(enabled=args.model_ema, decays=_tuple(decay), half_lives=_tuple(half_life),
                        schedule=schedule, every=args.model_ema_every, after=args.model_ema_after,
                        force_cpu=args.model_ema_force_cpu, dtype=args.model_ema_dtype,
                        buffers=args.model_ema_buffers, bn_recal=args.model_ema_bn_recal,
                        select=args.model_ema_select, posthoc=posthoc),
        optim=OptimSettings(opt=args.opt, lr=args.lr, lr_base=args.lr_base, lr_base_size=args.lr_base_size,
                            lr_base_scale=args.lr_base_scale, momentum=args.momentum,
                            weight_decay=args.weight_decay, eps=args.opt_eps, betas=_tuple(args.opt_betas),
                            layer_decay=args.layer_decay, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            grad_accum_steps=args.grad_accum_steps, fused=not args.no_opt_fused),
        schedule=ScheduleSettings(name=args.sched, epochs=args.epochs, decay_epochs=args.decay_epochs,
                                  decay_milestones=_tuple(args.decay_milestones),
                                  cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs,
                                  decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
                                  warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix,
                                  on_updates=args.sched_on_updates),
        loss=LossSettings(smoothing=args.smoothing, mixup=args.mixup, cutmix=args.cutmix,
                          cutmix_minmax=_tuple(args.cutmix_minmax), mixup_prob=args.mixup_prob,
                          mixup_switch_prob=args.mixup_switch_prob, mixup_mode=args.mixup_mode,
                          mixup_off_epoch=args.mixup_off_epoch),
        run=RunSettings(epochs=args.epochs, seed=args.seed, device=args.device, amp=args.amp,
                        amp_dtype=args.amp_dtype, output=args.output, experiment=args.experiment,
                        resume=args.resume, restore_optimizer=not args.no_resume_opt,
                        drop_ema=bool(getattr(args, "drop_ema", False)), log_interval=args.log_interval,
                        progress=not args.no_progress, checkpoint_hist=args.checkpoint_hist,
                        eval_metric=args.eval_metric, on_nonfinite=args.on_nonfinite,
                        max_nonfinite_skips=int(args.max_nonfinite_skips), dist_bn=args.dist_bn),
        parallel=ParallelSettings(fsdp=args.fsdp, reshard_after_forward=args.fsdp_reshard_after_forward,
                                  checkpoint_format=args.checkpoint_format),
        flags=MappingProxyType(dict(vars(args))),
    )


def parse_settings(argv: Sequence[str] | None = None) -> TrainSettings:
    """:func:`parse_args` then :func:`settings_from_args`: what ``train.py`` builds a run from."""
    return settings_from_args(parse_args(argv))


def args_to_yaml(flags: Mapping[str, Any] | argparse.Namespace) -> str:
    """Parsed flags (a mapping, e.g. ``TrainSettings.flags`` with the resolved values, or a
    Namespace) as YAML that ``--config`` accepts back."""
    items = vars(flags).items() if isinstance(flags, argparse.Namespace) else flags.items()
    plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in items if k not in _NOT_YAML_KEYS}
    buf = io.StringIO()
    yaml.safe_dump(plain, buf, default_flow_style=False, sort_keys=True)
    return buf.getvalue()
