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
from typing import Any, ClassVar

from emakit.posthoc import DTYPES

from . import UsageError
from .kinds import NON_NEGATIVE_INT, OutputFile, Parser, POSITIVE_INT, SEED, SEED_MAX, check_parsed, parse_sigma_rels
from .options import (AMP_DTYPE, BATCH_SIZE, CHANNELS_LAST, CLASS_MAP, CROP_PCT, DATASET, DATASET_DOWNLOAD, DEVICE,
                      INPUT_KEY, TARGET_KEY, TRUST_REMOTE_CODE, FAST_NORM, FUSER, GLOBAL_POOL, IMG_SIZE, IN_CHANS,
                      INPUT_SIZE, INTERPOLATION, MEAN_FLAG, MODEL, MODEL_DTYPE, MODEL_KWARGS, NO_PROGRESS, NUM_CLASSES,
                      STD_FLAG, TORCHCOMPILE_MODE, TORCHSCRIPT, WORKERS, Flag, add_flags, from_flags)
from .settings import data_root

__all__ = ["CHECKPOINT_EXTENSIONS", "EVAL_DATA_KEYS", "REFUSED", "EvalDataSettings", "WeightSettings", "RuntimeSettings",
           "OutputSettings", "PosthocSettings", "ValidateSettings", "build_parser", "parse_args"]

CHECKPOINT_EXTENSIONS = (".pth.tar", ".pth", ".pt", ".safetensors")
# The eval-transform flags; each left out (None) defaults to the checkpoint's training value.
EVAL_DATA_KEYS = ("img_size", "crop_pct", "mean", "std", "interpolation")
_WEIGHTS_RE = re.compile(r"^(raw|ema|both|ema:\d+)$")
# timm's validate.py flags that emakit parses with timm's default and refuses otherwise: (flag,
# dest, timm's default, why). docs/TIMM_DIFFERENCES.md lists the same rows.
REFUSED = (
    ("--tf-preprocessing", "tf_preprocessing", False,
     "it needs TensorFlow's image ops, which emakit does not install; drop it"),
    ("--torchscript", "torchscript", False,
     "TorchScript is deprecated in torch and timm; use --torchcompile"),
    ("--fuser", "fuser", "", "it picks a TorchScript fuser, and TorchScript is refused; use --torchcompile"),
    ("--aot-autograd", "aot_autograd", False,
     "functorch's memory_efficient_fusion is gone from torch; use --torchcompile"),
    ("--num-gpu", "num_gpu", 1,
     "it means torch.nn.DataParallel; run one process per GPU with torchrun --nproc_per_node=N validate.py ..."),
    ("--naflex-loader", "naflex_loader", False,
     "emakit has no NaFlex (variable-resolution patch) loader; evaluate at a fixed --img-size"),
)
_SAVE_SUFFIXES = (".safetensors",) + tuple(e for e in CHECKPOINT_EXTENSIONS if e != ".safetensors")


# =========================================================================== settings
def _flag_help(flag: str) -> str:
    return f"the checkpoint's training {flag}, else model default"


@dataclass(frozen=True)
class EvalDataSettings:
    """What to evaluate on and how to load it; each eval-transform flag left out (None)
    defaults to the checkpoint's training value."""

    GROUP: ClassVar[str] = "Dataset parameters"
    root: str | None = Flag("data", nargs="?", metavar="DIR",
                            help="ImageFolder root with val/ or validation/ class folders, or a split folder itself, "
                                 "as --data-dir; omitted: the embedded digits val split train.py uses")(None)
    data_dir: str | None = Flag("--data-dir", metavar="DIR", help="the data root, timm's spelling of DIR")(None)
    split: str | None = Flag("--split", metavar="NAME", help="split folder under DIR")(
        None, note="= the checkpoint's --val-split, else val/ or validation/; for the embedded digits: val, or train")
    img_size: int | None = IMG_SIZE(None, note="= " + _flag_help("--img-size"))
    crop_pct: float | None = CROP_PCT(None, help="center-crop fraction in (0, 1]", note="= " + _flag_help("--crop-pct"))
    mean: tuple[float, ...] | None = MEAN_FLAG(None, note="= " + _flag_help("--mean"))
    std: tuple[float, ...] | None = STD_FLAG(None, note="= " + _flag_help("--std"))
    interpolation: str | None = INTERPOLATION(
        None, note="= the checkpoint's training --interpolation (torchvision's for its checkpoints), else model "
                   "default")
    batch_size: int = BATCH_SIZE(256, help="batch size per process; does not change the results")
    workers: int = WORKERS(0, note="= main process, as train.py; timm: 4")
    num_samples: int | None = Flag("--num-samples", kind=POSITIVE_INT, metavar="N",
                                   help="evaluate N samples of the split, drawn with --seed (kept in the split's "
                                        "order); timm reads it for its iterable datasets only")(None, note="= all")
    input_img_mode: str | None = Flag("--input-img-mode", metavar="MODE",
                                      help="PIL mode the images are converted to, e.g. RGB, L")(
        None, note="= RGB, or L for a 1-channel model")
    crop_mode: str | None = Flag("--crop-mode", choices=("center", "squash", "border"),
                                 help="eval crop: center (resize the short side, center crop), squash (resize to the "
                                      "size, no crop) or border (fit inside, pad)")(
        None, note="= the model's pretrained cfg, else center")
    crop_border_pixels: int | None = Flag("--crop-border-pixels", kind=NON_NEGATIVE_INT, metavar="N",
                                          help="crop N pixels from each image border first, as timm's "
                                               "transform")(None)
    use_train_size: bool = Flag("--use-train-size", action="store_true",
                                help="the model's train input size even where its pretrained cfg has a test size")(
        False, note="= the test size, as timm's validate.py")
    pin_memory: bool = Flag("--pin-mem", action="store_true", help="pin CPU memory in the data loader")(False)
    prefetcher: bool = Flag("--no-prefetcher", action="store_true", invert=True,
                            help="on CUDA, do not use the GPU input path (uint8 batches normalised on the GPU)")(True)
    real_labels: str | None = Flag("--real-labels", metavar="FILE",
                                   help="ImageNet 'ReaL' labels (real.json, one list of labels per validation "
                                        "image ILSVRC2012_val_<n>.JPEG): top-1/top-5 count a prediction right when "
                                        "it is among the image's real labels, images without any are left out, as "
                                        "timm's RealLabelsImagenet")(None)
    valid_labels: str | None = Flag("--valid-labels", metavar="FILE",
                                    help="text file of class indices, one a line: score only these outputs of the "
                                         "model (e.g. the 200 ImageNet-A/R classes); the data's labels index this "
                                         "list")(None)
    seed: int = Flag("--seed", kind=SEED, metavar="S", help=f"random seed in [0, {SEED_MAX}] (--num-samples)")(42)
    log_freq: int = Flag("--log-freq", kind=POSITIVE_INT, metavar="N",
                         help="log a line every N batches")(10)
    tf_preprocessing: bool = Flag("--tf-preprocessing", action="store_true",
                                  help="timm's TensorFlow preprocessing; refused: needs TensorFlow")(False)
    naflex_loader: bool = Flag("--naflex-loader", action="store_true",
                               help="timm's NaFlex loader; refused: emakit has none")(False)
    naflex_max_seq_len: int = Flag("--naflex-max-seq-len", kind=POSITIVE_INT, metavar="N",
                                   help="NaFlex sequence length (only with --naflex-loader, which is refused)")(576)
    # ---- data sources beyond a folder tree (timm's --dataset flags; emakit/training/sources.py)
    dataset: str = DATASET("")
    dataset_download: bool = DATASET_DOWNLOAD(False)
    class_map: str = CLASS_MAP("")
    input_key: str | None = INPUT_KEY(None, note="= the source's")
    target_key: str | None = TARGET_KEY(None, note="= the source's")
    trust_remote_code: bool = TRUST_REMOTE_CODE(False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", data_root(self.root, self.data_dir))
        if self.input_img_mode is not None:
            from PIL import Image

            if self.input_img_mode not in Image.MODES:
                raise UsageError(f"--input-img-mode {self.input_img_mode}: not a PIL image mode; use one of "
                                 f"{', '.join(Image.MODES)}")

    @property
    def overrides(self) -> Mapping[str, Any]:
        """The eval-transform flags given (``EVAL_DATA_KEYS`` that are not None)."""
        return MappingProxyType({k: getattr(self, k) for k in EVAL_DATA_KEYS if getattr(self, k) is not None})


@dataclass(frozen=True)
class WeightSettings:
    """Which checkpoint(s), model and weight sets; ``weights`` is resolved with ``--use-ema``."""

    GROUP: ClassVar[str] = "Model and weights"
    checkpoint: str | None = Flag("--checkpoint", metavar="PATH",
                                  help="checkpoint file, a train.py --checkpoint-format dcp folder (last.dcp), or a "
                                       "folder: every *.pth.tar, *.pth, *.pt, *.safetensors file and *.dcp folder in "
                                       "it")(None, note="; required unless --posthoc-dir and --model are given")
    model: str | None = Flag("--model", "-m", metavar="MODEL", help=MODEL.help)(
        None, note="= the checkpoint's training --model / arch")
    pretrained: bool = Flag("--pretrained", action="store_true",
                            help="evaluate the model's pretrained weights (timm's hub download and cache); without "
                                 "--checkpoint and with --model this is implied, as in timm")(False)
    num_classes: int | None = NUM_CLASSES(None, note="= the checkpoint's, from its args or classifier shape")
    weights: str | None = Flag("--weights", metavar="SET",
                               help="weights to evaluate: raw, ema, both (raw and EMA side by side) or ema:N (extra "
                                    "EMA N)")(None, note="= raw, or ema with --use-ema")
    use_ema: bool = Flag("--use-ema", action="store_true",
                         help="evaluate the EMA weights, as timm's flag: same as --weights ema; an error if the file "
                              "has none")(False)
    gp: str | None = GLOBAL_POOL(None, note="= model default")
    in_chans: int | None = IN_CHANS(None, note="= the checkpoint's training --in-chans, else --input-size's C, else 3")
    input_size: tuple[int, int, int] | None = INPUT_SIZE(None, note="= --img-size's")
    model_kwargs: Mapping[str, Any] = MODEL_KWARGS({}, note="= none")
    model_dtype: str | None = MODEL_DTYPE(None, note="= float32")
    fast_norm: bool = FAST_NORM(False)
    reparam: bool = Flag("--reparam", action="store_true",
                         help="reparameterize the model for inference (timm's reparameterize_model: RepVGG, "
                              "MobileOne, FastViT, ... fused branches)")(False)
    test_pool: bool = Flag("--test-pool", action="store_true",
                           help="test-time pooling (timm's apply_test_time_pool): the model sees the full image "
                                "at the size of the pretrained cfg's test size, crop 1.0")(False)

    def __post_init__(self) -> None:
        if self.use_ema and self.weights not in (None, "ema"):
            raise UsageError(f"--use-ema conflicts with --weights {self.weights}; give one of them")
        weights = self.weights or ("ema" if self.use_ema else "raw")
        if not _WEIGHTS_RE.match(weights):
            raise UsageError(f"--weights {weights!r}: use raw, ema, both or ema:N")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "model_kwargs", MappingProxyType(dict(self.model_kwargs or {})))
        if self.input_size is not None:
            object.__setattr__(self, "input_size", tuple(self.input_size))

    @property
    def sets(self) -> tuple[str, ...]:
        """The weight sets each checkpoint is scored with: ``both`` is ``("raw", "ema")``."""
        return ("raw", "ema") if self.weights == "both" else (self.weights,)


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the forward passes run; ``amp_dtype`` is a torch dtype once built."""

    GROUP: ClassVar[str] = "Runtime"
    device: str | None = DEVICE(None, note="= cuda if available, else cpu; cuda:<local rank> under torchrun")
    amp: bool = Flag("--amp", action="store_true", help="evaluate under torch.autocast")(False)
    amp_dtype: Any = AMP_DTYPE("float16", help="autocast dtype with --amp")
    channels_last: bool = CHANNELS_LAST(False)
    progress: bool = NO_PROGRESS(True, help="no tqdm progress bar (bars only on rank 0 and a TTY)")
    compile_backend: str | None = Flag("--torchcompile", nargs="?", const="inductor", metavar="BACKEND",
                                       help="torch.compile the model with BACKEND")(None, note="; bare flag: inductor")
    compile_mode: str | None = TORCHCOMPILE_MODE(None, note="= torch's default")
    torchscript: bool = TORCHSCRIPT(False)
    aot_autograd: bool = Flag("--aot-autograd", action="store_true",
                              help="functorch AOT autograd; refused: gone from torch, use --torchcompile")(False)
    fuser: str = FUSER("")
    num_gpu: int = Flag("--num-gpu", kind=POSITIVE_INT, metavar="N",
                        help="GPUs for torch.nn.DataParallel; only 1: use torchrun for more")(1)
    retry: bool = Flag("--retry", action="store_true",
                       help="on an out-of-memory error, retry with a smaller batch (timm's decay_batch_step) until "
                            "it fits")(False)

    def __post_init__(self) -> None:
        if isinstance(self.amp_dtype, str):
            object.__setattr__(self, "amp_dtype", DTYPES[self.amp_dtype])
        scripting = [f for f, on in (("--torchscript", self.torchscript), ("--torchcompile", self.compile_backend),
                                     ("--aot-autograd", self.aot_autograd)) if on]
        if len(scripting) > 1:
            raise UsageError(f"{scripting[0]} and {scripting[1]} exclude each other (as in timm); give one")
        if self.compile_mode and not self.compile_backend:
            raise UsageError("--torchcompile-mode needs --torchcompile")


@dataclass(frozen=True)
class OutputSettings:
    """Files written besides stdout; ``results_format`` follows the file name unless given."""

    GROUP: ClassVar[str] = "Outputs"
    results_file: str | None = Flag("--results-file", kind=OutputFile(), metavar="FILE",
                                    help="write every result record to FILE; checked before anything is evaluated: "
                                         "not a folder, in a writable folder, not a training checkpoint")(None)
    results_format: str | None = Flag("--results-format", choices=("csv", "json"),
                                      help="format of --results-file and of the post-hoc sweep table")(
        None, note="= json if FILE ends in .json, else csv")
    metrics_avg: str | None = Flag("--metrics-avg", choices=("micro", "macro", "weighted"),
                                   help="also compute precision, recall and F1 score (scikit-learn) with this "
                                        "averaging, as <avg>_precision, <avg>_recall, <avg>_f1_score (percent)")(None)
    export_ema: str | None = Flag("--export-ema", kind=OutputFile((".safetensors",)), metavar="FILE.safetensors",
                                  help="write the checkpoint's EMA weights (the --weights ema:N one if given) alone, "
                                       "unprefixed, atomically, loadable by timm's pretrained_cfg_overlay; checked "
                                       "before anything is evaluated")(None)

    def __post_init__(self) -> None:
        if self.results_format is None:
            fmt = "json" if (self.results_file or "").lower().endswith(".json") else "csv"
            object.__setattr__(self, "results_format", fmt)


@dataclass(frozen=True)
class PosthocSettings:
    """The post-hoc EMA sweep; ``sigma_rels`` empty means no sweep."""

    GROUP: ClassVar[str] = "Post-hoc EMA (EDM2): choose the EMA length after training"
    sigma_rels: Any = Flag("--posthoc-sigma-rel", metavar="S[,S...]",
                           help="reconstruct and evaluate these relative EMA lengths sigma_rel, e.g. "
                                "0.02,0.05,0.08,0.15, instead of the checkpoint's weights; each sweep appends its rows "
                                "(with its sweep_id and time) to posthoc_sweep.csv in the run folder (or beside "
                                "--results-file) and posthoc_sweep.png plots every sweep")(None, note="= no sweep")
    snapshot_dir: str | None = Flag("--posthoc-dir", metavar="DIR", help="snapshot folder")(
        None, note="= <checkpoint folder>/posthoc")
    step: int | None = Flag("--posthoc-step", kind=POSITIVE_INT, metavar="N",
                            help="reconstruct the EMA at this snapshot step")(None, note="= the last snapshot step")
    save: str | None = Flag("--posthoc-save", kind=OutputFile(_SAVE_SUFFIXES), metavar="PATH",
                            help="save the best sigma_rel's weights (the only one if one is given): .safetensors, or a "
                                 "checkpoint (.pth.tar/.pth/.pt) with them as state_dict_ema; never over a training "
                                 "checkpoint")(None)

    def __post_init__(self) -> None:
        text = self.sigma_rels
        if text is None or isinstance(text, str):
            values = tuple(parse_sigma_rels(text, "--posthoc-sigma-rel")) if text else ()
            object.__setattr__(self, "sigma_rels", values)


@dataclass(frozen=True)
class ValidateSettings:
    """Everything ``validate.py`` was asked to do, resolved once from the command line; the
    flags that need another, or conflict with it, are checked on construction."""

    data: EvalDataSettings = field(default_factory=EvalDataSettings)
    weights: WeightSettings = field(default_factory=WeightSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    posthoc: PosthocSettings = field(default_factory=PosthocSettings)

    def __post_init__(self) -> None:
        posthoc, checkpoint = self.posthoc, self.weights.checkpoint
        if self.runtime.amp and self.weights.model_dtype not in (None, "float32"):
            raise UsageError(f"--amp needs float32 weights; drop --model-dtype {self.weights.model_dtype} or --amp")
        if self.data.real_labels and self.data.valid_labels:
            raise UsageError("--real-labels and --valid-labels exclude each other: ReaL labels index all 1000 "
                             "ImageNet classes")
        if self.weights.pretrained and (checkpoint or posthoc.sigma_rels):
            raise UsageError("--pretrained evaluates the model's pretrained weights; drop it, or drop --checkpoint "
                             "/ --posthoc-sigma-rel")
        if not posthoc.sigma_rels and not checkpoint and self.weights.model:
            if self.outputs.export_ema:
                raise UsageError("--export-ema exports a checkpoint's EMA: add --checkpoint")
            return  # timm: no checkpoint -> the model's pretrained weights
        if self.weights.pretrained:
            raise UsageError("--pretrained needs --model NAME (the model whose pretrained weights to evaluate)")
        if not posthoc.sigma_rels:
            for flag, value in (("--posthoc-dir", posthoc.snapshot_dir), ("--posthoc-step", posthoc.step),
                                ("--posthoc-save", posthoc.save)):
                if value is not None:
                    raise UsageError(f"{flag} needs --posthoc-sigma-rel")
            if not checkpoint:
                raise UsageError("--checkpoint is required: a checkpoint file or a run folder")
        else:
            if self.outputs.export_ema:
                raise UsageError("--export-ema exports a checkpoint's EMA; with --posthoc-sigma-rel use --posthoc-save")
            if not checkpoint and not (posthoc.snapshot_dir and self.weights.model):
                raise UsageError("--posthoc-sigma-rel needs --checkpoint (the run's checkpoint), or --posthoc-dir and "
                                 "--model")


def build_parser(prog: str = "validate.py") -> argparse.ArgumentParser:
    """The ``validate.py`` parser: timm's flag names, grouped, every default in its help."""
    parser = Parser(prog=prog, description="Evaluate the raw and EMA weights of checkpoints "
                                           "(and post-hoc EMA reconstructions).")
    add_flags(parser, ValidateSettings)
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "validate.py") -> ValidateSettings:
    """Parse and check ``argv`` into :class:`ValidateSettings`; raises ``UsageError`` for bad
    flags or combinations."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_parsed(parser, args, parser.error)
    for flag, dest, default, why in REFUSED:
        if getattr(args, dest) != default:
            raise UsageError(f"{flag} is not supported: {why}")
    return from_flags(ValidateSettings, args)

