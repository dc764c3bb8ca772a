"""Command-line flags of ``validate.py``, resolved once into a frozen :class:`ValidateSettings`.

Flags are timm's ``validate.py`` flags where timm has the feature (``--checkpoint``,
``--use-ema``, ``-b``, ``--img-size``, ``--crop-pct``, ``--amp``, ``--results-file``, ...);
the rest (``--weights``, ``--export-ema``, ``--posthoc-*``) are described in
:mod:`emakit.training.validation`, which does the work. Every value is checked by its kind
(:mod:`.kinds`) and every rule relating several flags in :func:`parse_args`, so a bad
command line is a one-line ``UsageError`` before anything is loaded. Derived values (the
weight sets, the results format, the sigma_rel list, the autocast dtype) are computed here
once; nothing below this module sees the argparse namespace.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from emakit.posthoc import DTYPES

from . import UsageError
from .kinds import (EVAL_INTERPOLATION, FRACTION, MEAN, NON_NEGATIVE_INT, POSITIVE_INT, STD, Device, OutputFile,
                    Parser, check_parsed, parse_sigma_rels)

__all__ = ["CHECKPOINT_EXTENSIONS", "EVAL_DATA_KEYS", "EvalDataSettings", "WeightSettings", "RuntimeSettings",
           "OutputSettings", "PosthocSettings", "ValidateSettings", "build_parser", "parse_args"]

CHECKPOINT_EXTENSIONS = (".pth.tar", ".pth", ".pt", ".safetensors")
# The eval-transform flags; each left out (None) defaults to the checkpoint's training value.
EVAL_DATA_KEYS = ("img_size", "crop_pct", "mean", "std", "interpolation")
_WEIGHTS_RE = re.compile(r"^(raw|ema|both|ema:\d+)$")
_SAVE_SUFFIXES = (".safetensors",) + tuple(e for e in CHECKPOINT_EXTENSIONS if e != ".safetensors")


# =========================================================================== settings
@dataclass(frozen=True)
class EvalDataSettings:
    """What to evaluate on and how to load it."""

    root: str | None = None  # DIR; None: the embedded digits dataset
    split: str | None = None  # --split; None: the checkpoint's --val-split, else val/ or validation/
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # eval-transform flags given
    batch_size: int = 256
    workers: int = 0


@dataclass(frozen=True)
class WeightSettings:
    """Which checkpoint(s), model and weight sets."""

    checkpoint: str | None = None  # a file or a folder of checkpoints
    model: str | None = None  # None: the checkpoint's
    num_classes: int | None = None  # None: the checkpoint's
    weights: str = "raw"  # raw, ema, both or ema:N (--use-ema resolved)

    @property
    def sets(self) -> tuple[str, ...]:
        """The weight sets each checkpoint is scored with: ``both`` is ``("raw", "ema")``."""
        return ("raw", "ema") if self.weights == "both" else (self.weights,)


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the forward passes run."""

    device: str | None = None  # None: cuda if available (cuda:<local rank> under torchrun), else cpu
    amp: bool = False
    amp_dtype: torch.dtype = torch.float16
    channels_last: bool = False
    progress: bool = True  # a tqdm bar (rank 0 and a TTY only)


@dataclass(frozen=True)
class OutputSettings:
    """Files written besides stdout."""

    results_file: str | None = None
    results_format: str = "csv"  # csv or json (--results-format, else from the file name)
    export_ema: str | None = None


@dataclass(frozen=True)
class PosthocSettings:
    """The post-hoc EMA sweep; ``sigma_rels`` empty means no sweep."""

    sigma_rels: tuple[float, ...] = ()
    snapshot_dir: str | None = None  # --posthoc-dir; None: <checkpoint folder>/posthoc
    step: int | None = None  # None: the last snapshot step
    save: str | None = None


@dataclass(frozen=True)
class ValidateSettings:
    """Everything ``validate.py`` was asked to do, resolved once from the command line."""

    data: EvalDataSettings = field(default_factory=EvalDataSettings)
    weights: WeightSettings = field(default_factory=WeightSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    posthoc: PosthocSettings = field(default_factory=PosthocSettings)


# =========================================================================== flags
def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", default=None, metavar="DIR",
                        help="ImageFolder root with val/ or validation/ class folders, or a split folder "
                             "itself; omitted: the embedded digits val split train.py uses (default: None)")
    g = parser.add_argument_group("Dataset parameters")
    g.add_argument("--split", default=None, metavar="NAME",
                   help="split folder under DIR (default: None = the checkpoint's --val-split, else val/ or "
                        "validation/; for the embedded digits: val, or train)")
    g.add_argument("--img-size", type=POSITIVE_INT, default=None, metavar="N",
                   help="image size (default: None = the checkpoint's training --img-size, else model default)")
    g.add_argument("--crop-pct", type=FRACTION, default=None, metavar="PCT",
                   help="center-crop fraction in (0, 1] (default: None = the checkpoint's training --crop-pct, "
                        "else model default)")
    g.add_argument("--mean", type=MEAN, nargs="+", default=None, metavar="MEAN",
                   help="normalisation mean, 3 numbers (R G B) or 1 for all (default: None = the checkpoint's "
                        "training --mean, else model default)")
    g.add_argument("--std", type=STD, nargs="+", default=None, metavar="STD",
                   help="normalisation std, 3 numbers > 0 (R G B) or 1 for all (default: None = the checkpoint's "
                        "training --std, else model default)")
    g.add_argument("--interpolation", type=EVAL_INTERPOLATION, default=None, metavar="NAME",
                   help="resize interpolation: nearest, bilinear, bicubic, box, hamming, lanczos (default: None = "
                        "the checkpoint's training --interpolation (torchvision's for its checkpoints), else model "
                        "default)")
    g.add_argument("-b", "--batch-size", type=POSITIVE_INT, default=256, metavar="N",
                   help="batch size per process; does not change the results (default: 256)")
    g.add_argument("-j", "--workers", type=NON_NEGATIVE_INT, default=0, metavar="N",
                   help="data loader worker processes per rank (default: 0 = main process, as train.py; timm: 4)")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Model and weights")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint file, a train.py --checkpoint-format dcp folder (last.dcp), or a folder: "
                        "every *.pth.tar, *.pth, *.pt, *.safetensors file and *.dcp folder in it "
                        "(default: None; required unless --posthoc-dir and --model are given)")
    g.add_argument("--model", default=None, metavar="MODEL",
                   help="timm model name (default: None = the checkpoint's training --model / arch)")
    g.add_argument("--num-classes", type=POSITIVE_INT, default=None, metavar="N",
                   help="number of classes (default: None = the checkpoint's, from its args or classifier shape)")
    g.add_argument("--weights", default=None, metavar="SET",
                   help="weights to evaluate: raw, ema, both (raw and EMA side by side) or ema:N "
                        "(extra EMA N) (default: None = raw, or ema with --use-ema)")
    g.add_argument("--use-ema", action="store_true", default=False,
                   help="evaluate the EMA weights, as timm's flag: same as --weights ema; an error if the "
                        "file has none (default: False)")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Runtime")
    g.add_argument("--device", type=Device(), default=None, metavar="DEV",
                   help="device: cpu, cuda, cuda:N or mps, where available (default: None = cuda if available, "
                        "else cpu; cuda:<local rank> under torchrun)")
    g.add_argument("--amp", action="store_true", default=False,
                   help="evaluate under torch.autocast (default: False)")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"],
                   help="autocast dtype with --amp (default: float16)")
    g.add_argument("--channels-last", action="store_true", default=False,
                   help="use the channels_last memory layout (default: False)")
    g.add_argument("--no-progress", action="store_true", default=False,
                   help="no tqdm progress bar (default: False; bars only on rank 0 and a TTY)")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Outputs")
    g.add_argument("--results-file", type=OutputFile(), default=None, metavar="FILE",
                   help="write every result record to FILE; checked before anything is evaluated: not a folder, "
                        "in a writable folder, not a training checkpoint (default: None)")
    g.add_argument("--results-format", default=None, choices=["csv", "json"],
                   help="format of --results-file and of the post-hoc sweep table (default: None = json "
                        "if FILE ends in .json, else csv)")
    g.add_argument("--export-ema", type=OutputFile((".safetensors",)), default=None, metavar="FILE.safetensors",
                   help="write the checkpoint's EMA weights (the --weights ema:N one if given) alone, "
                        "unprefixed, atomically, loadable by timm's pretrained_cfg_overlay; checked before "
                        "anything is evaluated (default: None)")


def _add_posthoc_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Post-hoc EMA (EDM2): choose the EMA length after training")
    g.add_argument("--posthoc-sigma-rel", default=None, metavar="S[,S...]",
                   help="reconstruct and evaluate these relative EMA lengths sigma_rel, e.g. 0.02,0.05,0.08,0.15, "
                        "instead of the checkpoint's weights; each sweep appends its rows (with its sweep_id "
                        "and time) to posthoc_sweep.csv in the run folder (or beside --results-file) and "
                        "posthoc_sweep.png plots every sweep (default: None = no sweep)")
    g.add_argument("--posthoc-dir", default=None, metavar="DIR",
                   help="snapshot folder (default: None = <checkpoint folder>/posthoc)")
    g.add_argument("--posthoc-step", type=POSITIVE_INT, default=None, metavar="N",
                   help="reconstruct the EMA at this snapshot step (default: None = the last snapshot step)")
    g.add_argument("--posthoc-save", type=OutputFile(_SAVE_SUFFIXES), default=None, metavar="PATH",
                   help="save the best sigma_rel's weights (the only one if one is given): .safetensors, or a "
                        "checkpoint (.pth.tar/.pth/.pt) with them as state_dict_ema; never over a training "
                        "checkpoint (default: None)")


def build_parser(prog: str = "validate.py") -> argparse.ArgumentParser:
    """The ``validate.py`` parser: timm's flag names, grouped, every default in its help."""
    parser = Parser(prog=prog, description="Evaluate the raw and EMA weights of checkpoints "
                                           "(and post-hoc EMA reconstructions).")
    for add in (_add_data_args, _add_model_args, _add_run_args, _add_output_args, _add_posthoc_args):
        add(parser)
    return parser


def _weights(use_ema: bool, weights: str | None) -> str:
    if use_ema and weights not in (None, "ema"):
        raise UsageError(f"--use-ema conflicts with --weights {weights}; give one of them")
    weights = weights or ("ema" if use_ema else "raw")
    if not _WEIGHTS_RE.match(weights):
        raise UsageError(f"--weights {weights!r}: use raw, ema, both or ema:N")
    return weights


def _posthoc(args: argparse.Namespace) -> PosthocSettings:
    """The sweep's settings; the flags that need ``--posthoc-sigma-rel``, and the one that
    conflicts with it, are checked here."""
    sigma_rels = tuple(parse_sigma_rels(args.posthoc_sigma_rel, "--posthoc-sigma-rel")) \
        if args.posthoc_sigma_rel else ()
    if not sigma_rels:
        for flag in ("posthoc_dir", "posthoc_step", "posthoc_save"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} needs --posthoc-sigma-rel")
        if not args.checkpoint:
            raise UsageError("--checkpoint is required: a checkpoint file or a run folder")
    else:
        if args.export_ema:
            raise UsageError("--export-ema exports a checkpoint's EMA; with --posthoc-sigma-rel use --posthoc-save")
        if not args.checkpoint and not (args.posthoc_dir and args.model):
            raise UsageError("--posthoc-sigma-rel needs --checkpoint (the run's checkpoint), or --posthoc-dir and "
                             "--model")
    return PosthocSettings(sigma_rels=sigma_rels, snapshot_dir=args.posthoc_dir, step=args.posthoc_step,
                           save=args.posthoc_save)


def settings_from_args(args: argparse.Namespace) -> ValidateSettings:
    """The frozen settings of a parsed (kind-checked) command line; ``UsageError`` for flags
    that conflict or need another."""
    weights = _weights(args.use_ema, args.weights)
    results_format = args.results_format or ("json" if (args.results_file or "").lower().endswith(".json")
                                             else "csv")
    posthoc = _posthoc(args)
    overrides = {k: getattr(args, k) for k in EVAL_DATA_KEYS if getattr(args, k) is not None}
    return ValidateSettings(
        data=EvalDataSettings(root=args.data, split=args.split, overrides=MappingProxyType(overrides),
                              batch_size=args.batch_size, workers=args.workers),
        weights=WeightSettings(checkpoint=args.checkpoint, model=args.model, num_classes=args.num_classes,
                               weights=weights),
        runtime=RuntimeSettings(device=args.device, amp=args.amp, amp_dtype=DTYPES[args.amp_dtype],
                                channels_last=args.channels_last, progress=not args.no_progress),
        outputs=OutputSettings(results_file=args.results_file, results_format=results_format,
                               export_ema=args.export_ema),
        posthoc=posthoc)


def parse_args(argv: Sequence[str] | None = None, prog: str = "validate.py") -> ValidateSettings:
    """Parse and check ``argv`` into :class:`ValidateSettings`; raises ``UsageError`` for bad
    flags or combinations."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_parsed(parser, args, parser.error)
    return settings_from_args(args)
