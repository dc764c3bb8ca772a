"""What a training run was asked to do: every ``train.py`` option, declared once.

Each field below is one option: its :class:`~.options.Flag` gives the command-line flag
(timm's name, kind, help), its default is the field's default, its ``--config`` YAML key is
the flag's dest, and ``config.parse_settings`` builds these frozen dataclasses from the parsed
flags by the same declarations (:func:`~.options.from_flags`). Adding a flag that reaches the
training loop is its field here and its use there.

Everything below the CLI layer (build, resume, outputs, the loops) reads these objects and
never an ``argparse.Namespace``. Values that depend on the data, the model or the process
count (the number of classes, the scaled learning rate, the run folder) are resolved once
during the build and kept in :class:`Resolved`. ``TrainSettings.flags`` keeps the parsed
flags as a read-only mapping for ``args.yaml`` and the checkpoint's ``args`` entry (timm's
layout).
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from emakit.schedules import parse_half_life

from . import UsageError
from .kinds import (FINITE, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, PROBABILITY, RATE, SEED,
                    SEED_MAX, TRAIN_INTERPOLATION, UNIT_INTERVAL, AutoAugment, CommaList, Items, Kwargs, Number, OneOf)
from .options import (AMP_DTYPE, BATCH_SIZE, CHANNELS_LAST, CLASS_MAP, CROP_PCT, DATASET, DATASET_DOWNLOAD, DEVICE,
                      INPUT_KEY, TARGET_KEY, TRUST_REMOTE_CODE, FAST_NORM, FUSER, GLOBAL_POOL, IMG_SIZE,
                      IN_CHANS, INPUT_SIZE, INTERPOLATION, MEAN_FLAG, MODEL, MODEL_DTYPE, MODEL_KWARGS, NO_PROGRESS,
                      NUM_CLASSES, STD_FLAG, TORCHCOMPILE_MODE, TORCHSCRIPT, WORKERS, Flag)

__all__ = ["AugmentConfig", "DataSettings", "ModelSettings", "EmaSettings", "PosthocSettings", "OptimSettings",
           "ScheduleSettings", "LossSettings", "DistillSettings", "RunSettings", "ParallelSettings",
           "ScheduledLoaderSettings", "TrainSettings", "Resolved",
           "DEFAULT_EMA_DECAY", "DEFAULT_POSTHOC_BUDGET", "TrackerSettings"]

ON_OFF = argparse.BooleanOptionalAction
DEFAULT_EMA_DECAY = 0.9998  # timm's --model-ema-decay default
# 16 snapshot steps reconstruct sigma_rel 0.02-0.20 within 0.3% relative L2 in float16
# (bench/posthoc_budget.py); one step of the two float16 profiles is the model's float32
# bytes plus torch.save headers, so 17x holds 16 steps.
DEFAULT_POSTHOC_BUDGET = "17x"
# The kinds of train.py's multi-value flags (the scalar kinds live in .kinds).
SCALE = Items(FRACTION, "two numbers MIN MAX with 0 < MIN <= MAX <= 1", (2,), increasing=True)
RATIO = Items(POSITIVE, "two numbers MIN MAX with 0 < MIN <= MAX", (2,), increasing=True)
BETAS = Items(Number(0, 1, hi_open=True), "1 to 3 numbers in [0, 1)", (1, 2, 3))
MILESTONES = Items(NON_NEGATIVE_INT, "increasing epochs >= 0", increasing=True, strict=True)
NOISE_RANGE = Items(NON_NEGATIVE, "1 or 2 fractions of the epochs >= 0: START [END]", (1, 2), increasing=True)
POSITIVE_INTS = Items(POSITIVE_INT, "integers >= 1")
WEIGHTS = Items(NON_NEGATIVE, "numbers >= 0")


def data_root(positional: str | None, data_dir: str | None) -> str | None:
    """The data root from timm's two spellings, ``DIR`` and ``--data-dir DIR`` (``UsageError``
    when both are given and differ)."""
    if positional and data_dir and positional != data_dir:
        raise UsageError(f"two data roots: {positional} and --data-dir {data_dir}; give one of them")
    return positional or data_dir


def half_life_text(value: Any) -> str:
    """One ``--model-ema-half-life`` item, checked by its unit whether or not the EMA is on:
    ``2000ba``, ``0.5ep``, ``1.2Mimg`` (``ValueError`` otherwise: a bare ``0.5`` has no unit)."""
    text = str(value).strip()
    parse_half_life(text)
    return text


HALF_LIVES = CommaList(half_life_text, "half-life", hint=" with a unit: 2000ba, 0.5ep or 1.2Mimg")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (timm ``create_transform`` arguments)."""

    GROUP: ClassVar[str] = "Augmentation parameters"
    no_aug: bool = Flag("--no-aug", action="store_true", help="disable all training augmentation")(False)
    scale: tuple[float, float] = Flag("--scale", kind=SCALE, nargs="+", metavar="PCT",
                                      help="random-resized-crop area range MIN MAX, 0 < MIN <= MAX <= 1")(
        (0.08, 1.0), note="; digits preset: 0.5 1.0")
    ratio: tuple[float, float] = Flag("--ratio", kind=RATIO, nargs="+", metavar="RATIO",
                                      help="random-resized-crop aspect ratio range MIN MAX, 0 < MIN <= MAX")(
        (3.0 / 4.0, 4.0 / 3.0))
    hflip: float = Flag("--hflip", kind=PROBABILITY, help="horizontal flip probability in [0, 1]")(
        0.5, note="; digits preset: 0.0, digits are not mirror-symmetric")
    vflip: float = Flag("--vflip", kind=PROBABILITY, help="vertical flip probability in [0, 1]")(0.0)
    color_jitter: float = Flag("--color-jitter", kind=NON_NEGATIVE, metavar="PCT", help="color jitter >= 0")(0.4)
    auto_augment: str | None = Flag("--aa", kind=AutoAugment(), metavar="NAME",
                                    help="timm AutoAugment policy, e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, "
                                         "original, v0; checked by building it with timm")(None)
    interpolation: str = Flag("--train-interpolation", kind=TRAIN_INTERPOLATION,
                              help="training resize interpolation: random, nearest, bilinear, bicubic, box, "
                                   "hamming, lanczos, or '' = the validation one")("random")
    re_prob: float = Flag("--reprob", kind=PROBABILITY, metavar="PCT",
                          help="random erase probability in [0, 1]")(0.0)
    re_mode: str = Flag("--remode", kind=OneOf(("pixel", "rand", "const")),
                        help="random erase mode: pixel, rand or const (timm's)")("pixel")
    re_count: int = Flag("--recount", kind=POSITIVE_INT, help="random erase count >= 1")(1)
    decoder: str = Flag("--decoder", kind=OneOf(("pil", "pil-draft", "simplejpeg")),
                        help="image decoder: pil (timm's), pil-draft (JPEGs decoded at a 1/2-1/8 DCT scale where "
                             "the crop is shrunk at least that much anyway), simplejpeg (libjpeg-turbo, the same "
                             "DCT scaling; pip install simplejpeg); opt-in, changes pixels within decoder noise")("pil")
    train_crop_mode: str | None = Flag("--train-crop-mode", choices=("rrc", "rkrc", "rkrr"),
                                       help="training crop: rrc (random resized crop), rkrc / rkrr (resize keeping "
                                            "the ratio, then center / random crop or pad), timm's")(
        None, note="= rrc")
    color_jitter_prob: float | None = Flag("--color-jitter-prob", kind=PROBABILITY, metavar="PCT",
                                           help="probability of applying the color jitter, in [0, 1]")(
        None, note="= always")
    grayscale_prob: float | None = Flag("--grayscale-prob", kind=PROBABILITY, metavar="PCT",
                                        help="probability of a random grayscale conversion, in [0, 1]")(None, note="= 0")
    gaussian_blur_prob: float | None = Flag("--gaussian-blur-prob", kind=PROBABILITY, metavar="PCT",
                                            help="probability of a gaussian blur, in [0, 1]")(None, note="= 0")
    aug_repeats: float = Flag("--aug-repeats", kind=NON_NEGATIVE, metavar="N",
                              help="repeated augmentation (timm's RepeatAugSampler, DeiT): each epoch takes about "
                                   "1/N of the images, each N times with its own augmentation; with several "
                                   "processes the copies go to different ranks, in one process (beyond timm, which "
                                   "needs several) they are in the same batch. A fraction repeats some images "
                                   "more. Epoch length: the images, rounded down to a multiple of 256 (timm's "
                                   "rule; under 256 images: all), divided by the processes")(0.0, note="= off")
    aug_splits: int = Flag("--aug-splits", kind=NON_NEGATIVE_INT, metavar="N",
                           help="augmentation splits (timm's AugMixDataset): every image comes N times in the batch, "
                                "the first clean (no --aa / color jitter), the others augmented; batches hold N x -b "
                                "images; 0 or >= 2 (use with --jsd-loss, --split-bn)")(0, note="= off")
    split_bn: bool = Flag("--split-bn", action="store_true",
                          help="one BatchNorm per augmentation split while training (timm's convert_splitbn_model); "
                               "needs --aug-splits or --resplit")(False)
    resplit: bool = Flag("--resplit", action="store_true",
                         help="do not random-erase the first (clean) augmentation split")(False)
    input_img_mode: str | None = Flag("--input-img-mode", metavar="MODE",
                                      help="PIL mode the images are converted to, e.g. RGB, L")(
        None, note="= RGB, or L for 1 input channel")
    save_images: bool = Flag("--save-images", action="store_true",
                             help="save each logged training batch as train-batch-<step>.jpg in the run folder, "
                                  "as timm")(False)
    worker_seeding: str = Flag("--worker-seeding", choices=("all", "part"),
                               help="timm's loader-worker seeding; emakit seeds python, numpy and torch for every "
                                    "sample from (--seed, epoch, index) whatever the value")("all")
    use_multi_epochs_loader: bool = Flag("--use-multi-epochs-loader", action="store_true",
                                         help="keep the loader workers across epochs, as timm's MultiEpochsDataLoader; "
                                              "emakit's workers always persist")(False)
    tta: int = Flag("--tta", kind=NON_NEGATIVE_INT, metavar="N",
                    help="timm's eval reduction factor; refused above 1 (timm averages the outputs of N consecutive, "
                         "different validation images: no augmented copies are made)")(0)

    def __post_init__(self) -> None:
        if self.tta > 1:
            raise UsageError(f"--tta {self.tta} is not supported: timm's train.py averages the outputs of "
                             f"{self.tta} consecutive, different validation images (its loader makes no augmented "
                             "copies), which mis-scores the model; drop it")
        if 0 < self.aug_repeats < 1:
            raise UsageError(f"--aug-repeats {self.aug_repeats:g}: use 0 (off) or a number >= 1")
        if self.aug_splits == 1:
            raise UsageError("--aug-splits 1: a split of 1 makes no sense (timm); use 0 (off) or >= 2")
        if self.split_bn and self.aug_splits < 2 and not self.resplit:
            raise UsageError("--split-bn needs --aug-splits N (N >= 2) or --resplit")
        if self.aug_splits and self.no_aug:
            raise UsageError("--aug-splits needs augmentation: drop --no-aug or --aug-splits")
        if self.input_img_mode is not None:
            from PIL import Image

            if self.input_img_mode not in Image.MODES:
                raise UsageError(f"--input-img-mode {self.input_img_mode}: not a PIL image mode; use one of "
                                 f"{', '.join(Image.MODES)}")

    @property
    def re_num_splits(self) -> int:
        """timm's ``re_num_splits``: with ``--resplit`` the clean split is not erased."""
        return (self.aug_splits or 2) if self.resplit else 0


@dataclass(frozen=True)
class DataSettings:
    """Dataset, loaders and transforms."""

    GROUP: ClassVar[str] = "Dataset parameters"
    path: str | None = Flag("data", nargs="?", metavar="DIR",
                            help="ImageFolder root with train/ and val/ (or validation/) class folders, as --data-dir "
                                 "(timm calls this positional form deprecated; both work); omitted: the embedded "
                                 "digits dataset")(None)
    data_dir: str | None = Flag("--data-dir", metavar="DIR", help="the data root, timm's spelling of DIR")(None)
    train_split: str = Flag("--train-split", metavar="NAME", help="train split folder")("train")
    val_split: str | None = Flag("--val-split", metavar="NAME", help="validation split folder")(
        None, note="= val/ or validation/, whichever exists")
    label_noise: float = Flag("--label-noise", kind=RATE, metavar="FRAC",
                              help="flip this fraction of the training labels to a random other class, chosen with "
                                   "--seed (the same flips on resume); validation labels stay clean. Any dataset; "
                                   "configs/digits-noisy.yaml uses 0.4 to show what the EMA length does")(0.0)
    skip_bad_images: bool = Flag("--skip-bad-images", action=ON_OFF,
                                 help="decode every image before training and skip unreadable ones with a warning, "
                                      "instead of stopping with an error naming the file")(False)
    num_classes: int | None = NUM_CLASSES(None, note="= number of class folders in the data")
    batch_size: int = BATCH_SIZE(128, note="; digits preset: 64")
    eval_batch_size: int | None = Flag("-vb", "--validation-batch-size", kind=POSITIVE_INT, metavar="N",
                                       help="validation batch size")(None, note="= --batch-size")
    workers: int = WORKERS(4, note="; digits preset: 0 = load in the main process, fastest for in-memory images")
    pin_memory: bool = Flag("--pin-mem", action=ON_OFF, help="pin CPU memory in the data loaders")(False)
    prefetcher: bool = Flag("--no-prefetcher", action="store_true", invert=True,
                            help="on CUDA, do not use the GPU input path (uint8 batches copied on a side stream, "
                                 "normalised and randomly erased on the GPU); the CPU always normalises in the "
                                 "loader workers")(True)
    img_size: int | None = IMG_SIZE(None, note="= model default; digits preset: 32")
    crop_pct: float | None = CROP_PCT(None, note="= model default; digits preset: 1.0")
    mean: tuple[float, ...] | None = MEAN_FLAG(None, note="= model default")
    std: tuple[float, ...] | None = STD_FLAG(None, note="= model default")
    interpolation: str = INTERPOLATION("", note="= model default")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # ---- data sources beyond a folder tree (timm's --dataset flags; emakit/training/sources.py)
    dataset: str = DATASET("")
    dataset_download: bool = DATASET_DOWNLOAD(False)
    input_key: str | None = INPUT_KEY(None, note="= the source's")
    target_key: str | None = TARGET_KEY(None, note="= the source's")
    class_map: str = CLASS_MAP("")
    train_num_samples: int | None = Flag("--train-num-samples", kind=POSITIVE_INT, metavar="N",
                                         help="samples in the train split of a streamed source (wds/, hfids/)")(
        None, note="= from _info.json or the dataset's info")
    val_num_samples: int | None = Flag("--val-num-samples", kind=POSITIVE_INT, metavar="N",
                                       help="samples in the validation split of a streamed source")(
        None, note="= from _info.json or the dataset's info")
    trust_remote_code: bool = TRUST_REMOTE_CODE(False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", data_root(self.path, self.data_dir))


@dataclass(frozen=True)
class ModelSettings:
    """The timm model."""

    GROUP: ClassVar[str] = "Model parameters"
    name: str = MODEL("resnet50", note="; digits preset: resnet18")
    pretrained: bool = Flag("--pretrained", action=ON_OFF,
                            help="start from the model's pretrained weights, downloaded from the Hugging Face hub "
                                 "(or its cache) as timm does, or from --pretrained-path")(False)
    pretrained_path: str | None = Flag("--pretrained-path", metavar="FILE",
                                       help="with --pretrained: a local weights file (.pth/.safetensors) instead of "
                                            "the download")(None)
    drop_rate: float = Flag("--drop", kind=RATE, metavar="PCT", help="dropout rate in [0, 1)")(0.0)
    drop_path_rate: float | None = Flag("--drop-path", kind=RATE, metavar="PCT", help="drop-path rate in [0, 1)")(None)
    drop_connect: float | None = Flag("--drop-connect", kind=RATE, metavar="PCT",
                                      help="timm's deprecated name of --drop-path, used when --drop-path is not "
                                           "given")(None)
    drop_block_rate: float | None = Flag("--drop-block", kind=RATE, metavar="PCT",
                                         help="DropBlock rate in [0, 1) (timm.create_model drop_block_rate)")(None)
    initial_checkpoint: str = Flag("--initial-checkpoint", metavar="PATH",
                                   help="load these weights into the model once it is built (timm.create_model "
                                        "checkpoint_path: the file's model or EMA state dict); unlike --resume, "
                                        "nothing else is restored")("")
    global_pool: str | None = GLOBAL_POOL(None, note="= model default")
    in_chans: int | None = IN_CHANS(None, note="= 3, or C of --input-size")
    input_size: tuple[int, int, int] | None = INPUT_SIZE(None, note="= model default")
    bn_momentum: float | None = Flag("--bn-momentum", kind=UNIT_INTERVAL, metavar="M",
                                     help="BatchNorm momentum override, for the timm models that take it")(
        None, note="= model default")
    bn_eps: float | None = Flag("--bn-eps", kind=POSITIVE, metavar="EPS",
                                help="BatchNorm epsilon override, for the timm models that take it")(
        None, note="= model default")
    kwargs: Mapping[str, Any] = MODEL_KWARGS({}, note="= none")
    head_init_scale: float | None = Flag("--head-init-scale", kind=FINITE, metavar="SCALE",
                                         help="multiply the classifier's initial weight and bias by SCALE")(None)
    head_init_bias: float | None = Flag("--head-init-bias", kind=FINITE, metavar="BIAS",
                                        help="set the classifier's initial bias to BIAS")(None)
    grad_checkpointing: bool = Flag("--grad-checkpointing", action=ON_OFF,
                                    help="gradient checkpointing through the model's blocks/stages (less memory, "
                                         "one more forward)")(False)
    fast_norm: bool = FAST_NORM(False)
    fuser: str = FUSER("", note="= torch's")
    channels_last: bool = CHANNELS_LAST(False)
    compile_backend: str | None = Flag("--torchcompile", nargs="?", const="inductor", metavar="BACKEND",
                                       help="torch.compile the model with BACKEND")(None, note="; bare flag: inductor")
    compile_mode: str | None = TORCHCOMPILE_MODE(None, note="= torch's default")
    torchscript: bool = TORCHSCRIPT(False, note="; not supported: torch.jit is deprecated, use --torchcompile")

    @property
    def path_rate(self) -> float | None:
        """The drop-path rate: ``--drop-path``, else timm's deprecated ``--drop-connect``."""
        return self.drop_path_rate if self.drop_path_rate is not None else self.drop_connect

    @property
    def input_chans(self) -> int:
        """Input channels as timm's train.py picks them: --in-chans, else C of --input-size, else 3."""
        if self.in_chans is not None:
            return self.in_chans
        return self.input_size[0] if self.input_size else 3

    @property
    def weights_file(self) -> str | None:
        """The local weights file to start from (``--pretrained-path`` with ``--pretrained``)."""
        return self.pretrained_path if self.pretrained else None


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer, the learning rate and gradient handling."""

    GROUP: ClassVar[str] = "Optimizer parameters"
    opt: str = Flag("--opt", metavar="OPTIMIZER", help="timm optimizer name")("sgd")
    eps: float | None = Flag("--opt-eps", kind=POSITIVE, metavar="EPS", help="optimizer epsilon > 0")(
        None, note="= the optimizer's")
    betas: tuple[float, ...] | None = Flag("--opt-betas", kind=BETAS, nargs="+", metavar="BETA",
                                           help="optimizer betas, 1 to 3 numbers in [0, 1)")(
        None, note="= the optimizer's")
    fused: bool = Flag("--no-opt-fused", action="store_true", invert=True,
                       help="step SGD, Adam and AdamW with torch's loop over parameters instead of its fused kernel "
                            "(one pass over all parameters: resnet18's SGD step takes 10 ms instead of 48 ms on a "
                            "2-core CPU; the results differ from the loop's in the last bits). Not fused under "
                            "--fsdp, where torch has no sharded SGD kernel")(True, note="= fused where torch has it")
    momentum: float = Flag("--momentum", kind=UNIT_INTERVAL, metavar="M", help="SGD momentum in [0, 1]")(0.9)
    weight_decay: float = Flag("--weight-decay", kind=NON_NEGATIVE, metavar="WD", help="weight decay >= 0")(
        2e-5, note="; digits preset: 5e-5")
    clip_grad: float | None = Flag("--clip-grad", kind=POSITIVE, metavar="NORM",
                                   help="clip gradients at this norm/value > 0")(None, note="= no clipping")
    clip_mode: str = Flag("--clip-mode", choices=("norm", "value", "agc"), help="gradient clipping mode")("norm")
    layer_decay: float | None = Flag("--layer-decay", kind=POSITIVE, metavar="RATE",
                                     help="layer-wise learning-rate decay > 0")(None, note="= off")
    layer_decay_min_scale: float = Flag("--layer-decay-min-scale", kind=NON_NEGATIVE, metavar="SCALE",
                                        help="with --layer-decay: the smallest lr scale of a layer")(0)
    layer_decay_no_opt_scale: float | None = Flag("--layer-decay-no-opt-scale", kind=NON_NEGATIVE, metavar="SCALE",
                                                  help="with --layer-decay: layers whose lr scale falls below this "
                                                       "are not optimized (frozen)")(None)
    kwargs: Mapping[str, Any] = Flag("--opt-kwargs", nargs="*", action=Kwargs, metavar="KEY=VALUE",
                                     help="extra keyword arguments of timm's create_optimizer_v2 (the optimizer's "
                                          "own, e.g. --opt-kwargs nesterov=False), values as Python literals")(
        {}, note="= none")
    grad_accum_steps: int = Flag("--grad-accum-steps", kind=POSITIVE_INT, metavar="N",
                                 help="micro-batches per optimizer step")(1)
    lr: float | None = Flag("--lr", kind=POSITIVE, metavar="LR", help="learning rate > 0")(
        None, note="= lr-base * global batch / lr-base-size")
    lr_base: float = Flag("--lr-base", kind=POSITIVE, metavar="LR",
                          help="base learning rate (> 0) at --lr-base-size images per step")(
        0.1, note="; digits preset: 0.8")
    lr_base_size: int = Flag("--lr-base-size", kind=POSITIVE_INT, metavar="N", help="batch size of --lr-base")(256)
    lr_base_scale: str = Flag("--lr-base-scale", choices=("", "linear", "sqrt"),
                              help="lr scaling with batch size")("", note="= sqrt for ada*/lamb, else linear")


@dataclass(frozen=True)
class ScheduleSettings:
    """The LR schedule, timm's ``create_scheduler_v2``."""

    GROUP: ClassVar[str] = "Learning rate schedule parameters"
    name: str = Flag("--sched", metavar="SCHEDULER",
                     help="timm LR scheduler: cosine, step, multistep, plateau, poly, tanh, or none (= constant: the "
                          "lr stays at --lr after --warmup-epochs)")("cosine")
    on_updates: bool = Flag("--sched-on-updates", action=ON_OFF,
                            help="step the LR schedule every optimizer update instead of every epoch")(False)
    warmup_lr: float = Flag("--warmup-lr", kind=NON_NEGATIVE, metavar="LR", help="warmup start lr >= 0")(1e-5)
    min_lr: float = Flag("--min-lr", kind=NON_NEGATIVE, metavar="LR", help="lr floor >= 0")(0.0)
    epochs: int = Flag("--epochs", kind=POSITIVE_INT, metavar="N", help="epochs to train")(
        300, note="; digits preset: 10")
    warmup_epochs: int = Flag("--warmup-epochs", kind=NON_NEGATIVE_INT, metavar="N", help="lr warmup epochs")(
        5, note="; digits preset: 0")
    warmup_prefix: bool = Flag("--warmup-prefix", action=ON_OFF, help="exclude warmup from the decay schedule")(False)
    cooldown_epochs: int = Flag("--cooldown-epochs", kind=NON_NEGATIVE_INT, metavar="N", help="cooldown epochs")(0)
    decay_epochs: float = Flag("--decay-epochs", kind=POSITIVE, metavar="N", help="step-decay interval > 0")(90)
    decay_milestones: tuple[int, ...] = Flag("--decay-milestones", kind=MILESTONES, nargs="+", metavar="EPOCH",
                                             help="multistep decay epochs, increasing")((90, 180, 270))
    decay_rate: float = Flag("--decay-rate", "--dr", kind=POSITIVE, metavar="RATE", help="lr decay rate > 0")(0.1)
    patience_epochs: int = Flag("--patience-epochs", kind=NON_NEGATIVE_INT, metavar="N",
                                help="plateau scheduler patience")(10)
    noise: tuple[float, ...] | None = Flag("--lr-noise", kind=NOISE_RANGE, nargs="+", metavar="PCT",
                                           help="add lr noise from START (and until END) as fractions of the epochs, "
                                                "seeded by --seed, as timm")(None, note="= off")
    noise_pct: float = Flag("--lr-noise-pct", kind=NON_NEGATIVE, metavar="PERCENT",
                            help="lr noise limit (relative)")(0.67)
    noise_std: float = Flag("--lr-noise-std", kind=NON_NEGATIVE, metavar="STDDEV", help="lr noise std-dev")(1.0)
    cycle_mul: float = Flag("--lr-cycle-mul", kind=POSITIVE, metavar="MULT", help="lr cycle length multiplier")(1.0)
    cycle_decay: float = Flag("--lr-cycle-decay", kind=POSITIVE, metavar="MULT",
                              help="lr multiplier of each new cycle")(0.5)
    cycle_limit: int = Flag("--lr-cycle-limit", kind=POSITIVE_INT, metavar="N",
                            help="number of lr cycles; the run trains all of them (timm's scheduled epochs)")(1)
    k_decay: float = Flag("--lr-k-decay", kind=POSITIVE, metavar="K", help="k-decay of the cosine/poly schedules")(
        1.0)
    start_epoch: int | None = Flag("--start-epoch", kind=NON_NEGATIVE_INT, metavar="N",
                                   help="first epoch to train (the lr schedule starts there too); overrides the "
                                        "--resume checkpoint's epoch")(None, note="= 0, or the resumed epoch")
    epoch_repeats: float = Flag("--epoch-repeats", kind=NON_NEGATIVE, metavar="N",
                                help="timm: dataset repeats per epoch of iterable (tfds/wds) datasets; not "
                                     "supported, emakit reads folders")(0.0)


@dataclass(frozen=True)
class DistillSettings:
    """Knowledge distillation (timm's ``--kd-*`` flags and ``timm.task`` classes)."""

    GROUP: ClassVar[str] = "Knowledge distillation parameters"
    model_name: str | None = Flag("--kd-model-name", metavar="MODEL",
                                  help="teacher for knowledge distillation: a timm model name (its pretrained "
                                       "weights, as timm), or 'ema' for self-distillation from this run's own EMA "
                                       "(a mean teacher; needs --model-ema)")(None, note="= no distillation")
    distill_type: str = Flag("--kd-distill-type", choices=("logit", "feature", "token"),
                             help="logit: match output logits; token: the student's distillation head "
                                  "(DeiT-style); feature: not supported")("logit")
    loss_type: str = Flag("--kd-loss-type", choices=("kl",), help="logit distillation loss")("kl")
    distill_weight: float | None = Flag("--distill-loss-weight", kind=NON_NEGATIVE, metavar="W",
                                        help="weight of the distillation loss; with only --task-loss-weight it is "
                                             "1 - that weight")(None, note="= 1.0")
    task_weight: float | None = Flag("--task-loss-weight", kind=NON_NEGATIVE, metavar="W",
                                     help="weight of the classification loss")(None, note="= 1.0")
    temperature: float = Flag("--kd-temperature", kind=POSITIVE, metavar="T",
                              help="softmax temperature of the distillation")(4.0)
    student_feature_dim: int | None = Flag("--kd-student-feature-dim", kind=POSITIVE_INT, metavar="N",
                                           help="feature distillation: student feature size")(None)
    teacher_feature_dim: int | None = Flag("--kd-teacher-feature-dim", kind=POSITIVE_INT, metavar="N",
                                           help="feature distillation: teacher feature size")(None)
    token_type: str = Flag("--kd-token-distill-type", choices=("soft", "hard"),
                           help="token distillation: soft (KL with temperature) or hard (CE on the teacher's "
                                "argmax)")("soft")


@dataclass(frozen=True)
class LossSettings:
    """Loss, label smoothing and mixup/cutmix (timm's flags)."""

    GROUP: ClassVar[str] = "Loss, label smoothing and mixup parameters"
    smoothing: float = Flag("--smoothing", kind=RATE, help="label smoothing in [0, 1)")(0.1)
    mixup: float = Flag("--mixup", kind=NON_NEGATIVE, help="mixup alpha >= 0, on if > 0")(0.0)
    cutmix: float = Flag("--cutmix", kind=NON_NEGATIVE, help="cutmix alpha >= 0, on if > 0")(0.0)
    cutmix_minmax: tuple[float, float] | None = Flag(
        "--cutmix-minmax", kind=SCALE, nargs="+",
        help="cutmix box area range MIN MAX, 0 < MIN <= MAX <= 1; replaces --cutmix alpha")(None)
    mixup_prob: float = Flag("--mixup-prob", kind=PROBABILITY,
                             help="probability of mixup/cutmix per batch, in [0, 1]")(1.0)
    mixup_switch_prob: float = Flag("--mixup-switch-prob", kind=PROBABILITY,
                                    help="probability of cutmix instead of mixup when both are on, in [0, 1]")(0.5)
    mixup_mode: str = Flag("--mixup-mode", choices=("batch", "pair", "elem"), help="mixup/cutmix granularity")("batch")
    mixup_off_epoch: int = Flag("--mixup-off-epoch", kind=NON_NEGATIVE_INT, metavar="N",
                                help="turn mixup off from this epoch, 0 = never")(0)
    jsd: bool = Flag("--jsd-loss", action=ON_OFF,
                     help="timm's JsdCrossEntropy (Jensen-Shannon divergence + CE) over the --aug-splits "
                          "splits; needs --aug-splits >= 2")(False)
    bce: bool = Flag("--bce-loss", action=ON_OFF,
                     help="timm's BinaryCrossEntropy instead of cross-entropy (with mixup/cutmix or smoothing)")(False)
    bce_sum: bool = Flag("--bce-sum", action=ON_OFF, help="with --bce-loss: sum over classes")(False)
    bce_target_thresh: float | None = Flag("--bce-target-thresh", kind=UNIT_INTERVAL, metavar="T",
                                           help="with --bce-loss: binarize soft targets at this threshold")(
        None, note="= off")
    bce_pos_weight: float | None = Flag("--bce-pos-weight", kind=POSITIVE, metavar="W",
                                        help="with --bce-loss: weight of the positive class")(None)
    distill: DistillSettings = field(default_factory=DistillSettings)

    @property
    def mixup_enabled(self) -> bool:
        """Whether timm's ``Mixup`` is built (mixup, cutmix or a cutmix range asked for)."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


@dataclass(frozen=True)
class PosthocSettings:
    """The post-hoc EMA (``--model-ema-posthoc`` and ``--posthoc-*``)."""

    GROUP: ClassVar[str] = "Post-hoc EMA (EDM2): snapshots to choose the EMA length after training"
    sigma_rels: tuple[float, ...] = Flag("--posthoc-sigma-rels", metavar="S[,S...]",
                                         kind=CommaList(float, "sigma_rel", scalar_if_one=False),
                                         help="relative widths of the tracked profiles, each in (0, 0.2887]")(
        (0.05, 0.10))
    budget: str = Flag("--posthoc-budget", metavar="SIZE",
                       help="disk budget of the snapshot folder: a multiple of the model's float32 bytes (8x), a size "
                            "(512MiB, 2GiB, 500MB) or none. The snapshot interval is chosen from the planned steps so "
                            "the run fits; a run extended with --resume thins older snapshots (every other one) to "
                            "stay inside it. One snapshot step of the default two float16 profiles takes about 1x")(
        DEFAULT_POSTHOC_BUDGET, note="= 16 snapshot steps, enough for < 0.3% reconstruction error over sigma_rel "
                                     "0.02-0.20, see BENCHMARKS.md")
    every: int | None = Flag("--posthoc-every", kind=POSITIVE_INT, metavar="N",
                             help="optimizer steps between snapshots, plus one at the last step; widened (doubled) "
                                  "when the run would not fit --posthoc-budget")(
        None, note="= ceil(total steps / the snapshot steps the budget holds), or ceil(total steps / 50) with "
                   "--posthoc-budget none; a resumed run keeps its interval")
    dtype: str = Flag("--posthoc-dtype", choices=("float16", "bfloat16", "float32"),
                      help="dtype of the stored snapshots; the profiles are accumulated in float32")(
        "float16", note=", as EDM2")
    max_snapshots: int | None = Flag("--posthoc-max-snapshots", kind=Number(2, integer=True), metavar="N",
                                     help="also bound the folder to N snapshot steps: when full, every other one is "
                                          "deleted and the interval doubles")(
        None, note="= only --posthoc-budget bounds it")


@dataclass(frozen=True)
class EmaSettings:
    """The EMA(s). After construction exactly one of ``decays`` / ``half_lives`` is set (an
    explicit decay wins; neither given: timm's default decay); one value is one EMA, several
    are one fused ``MultiEMA``. ``--model-ema-warmup`` is the ``warmup`` schedule."""

    GROUP: ClassVar[str] = "Model exponential moving average parameters"
    enabled: bool = Flag("--model-ema", action=ON_OFF, help="track an EMA of the weights and validate it every epoch")(
        False, note="as in timm; digits preset: True")
    decays: tuple[float, ...] | None = Flag(
        "--model-ema-decay", kind=CommaList(float, "decay"), metavar="DECAY[,DECAY...]",
        help="per-step EMA decay; a comma list (0.999,0.9998,0.9999) tracks one EMA per value in one fused update")(
        None, note=f"= {DEFAULT_EMA_DECAY} unless --model-ema-half-life is given")
    warmup: bool = Flag("--model-ema-warmup", action=ON_OFF,
                        help="timm's EMA warmup: same as --model-ema-schedule warmup")(False)
    force_cpu: bool = Flag("--model-ema-force-cpu", action=ON_OFF,
                           help="keep the EMA on the CPU; unlike timm it is still validated")(False)
    half_lives: tuple[str, ...] | None = Flag(
        "--model-ema-half-life", kind=HALF_LIVES, metavar="TIME[,TIME...]",
        help="EMA half-life instead of a decay: '2000ba' (steps), '0.5ep' (epochs), '1.2Mimg' (images); a comma list "
             "tracks one EMA per value; ignored when --model-ema-decay is given")(None, note="; digits preset: 0.5ep")
    schedule: str = Flag("--model-ema-schedule", metavar="NAME",
                         help="decay schedule: constant, warmup, threshold, exp")("constant")
    every: int = Flag("--model-ema-every", kind=int, metavar="K",
                      help="average every K optimizer steps with decay**K")(1)
    after: int = Flag("--model-ema-after", kind=NON_NEGATIVE_INT, metavar="N",
                      help="copy the model instead of averaging for the first N optimizer steps and the first "
                           "averaging one after them, as timm's ModelEmaV3(update_after_step=N)")(
        0, note=": the first step copies")
    dtype: str | None = Flag("--model-ema-dtype", metavar="DTYPE",
                             help="EMA dtype, e.g. float32 master weights under bf16 AMP")(None, note="= model's")
    buffers: str = Flag("--model-ema-buffers", choices=("average", "copy"),
                        help="average float buffers (BatchNorm statistics) or copy them")("average")
    select: str = Flag("--model-ema-select", choices=("first", "best"),
                       help="with several EMAs, the one whose --eval-metric picks model_best: first (the first "
                            "decay/half-life, stored as state_dict_ema) or best (the best EMA of each epoch)")("first")
    bn_recal: int = Flag("--model-ema-bn-recal", kind=NON_NEGATIVE_INT, metavar="N",
                         help="before evaluating each EMA, recompute its BatchNorm statistics over N training batches "
                              "per process; the EMA's averaged statistics are restored after the evaluation, so "
                              "averaging goes on unchanged")(0, note="= off")
    posthoc: PosthocSettings | None = Flag(
        "--model-ema-posthoc", action=ON_OFF, section=PosthocSettings,
        help="track power-function EMAs (Karras et al. 2024) and save their snapshots under <run>/posthoc/, so "
             "validate.py --posthoc-sigma-rel can rebuild any EMA length afterwards; with --fsdp each rank tracks its "
             "shards and every snapshot is gathered to rank 0, which writes the same files")(None)

    def __post_init__(self) -> None:
        if self.decays is not None:
            object.__setattr__(self, "half_lives", None)
        elif not self.half_lives:
            object.__setattr__(self, "decays", (DEFAULT_EMA_DECAY,))
            object.__setattr__(self, "half_lives", None)
        if self.warmup:
            object.__setattr__(self, "schedule", "warmup")

    @property
    def count(self) -> int:
        """How many EMAs the run keeps (0 without ``--model-ema``)."""
        return len(self.decays or self.half_lives or ()) if self.enabled else 0


@dataclass(frozen=True)
class RunSettings:
    """The run itself: device, precision, outputs, resume, logging, failure policy."""

    GROUP: ClassVar[str] = "Miscellaneous parameters"
    seed: int = Flag("--seed", kind=SEED, metavar="S", help=f"random seed in [0, {SEED_MAX}] (numpy's range)")(42)
    log_interval: int = Flag("--log-interval", kind=POSITIVE_INT, metavar="N",
                             help="optimizer steps between training log lines")(50)
    checkpoint_hist: int = Flag("--checkpoint-hist", kind=NON_NEGATIVE_INT, metavar="N",
                                help="number of best epoch checkpoints to keep")(10)
    amp: bool = Flag("--amp", action=ON_OFF, help="mixed precision with torch.autocast")(False)
    amp_dtype: str = AMP_DTYPE("float16", help="autocast dtype; float16 on CUDA uses a gradient scaler, as timm")
    device: str | None = DEVICE(None, note="= cuda if available, else cpu; cuda:<local rank> under torchrun")
    output: str = Flag("--output", metavar="PATH", help="parent folder of the run folder")("./output")
    experiment: str = Flag("--experiment", metavar="NAME", help="run folder name")(
        "", note="= YYYYMMDD-HHMMSS-<model>-<img size>, or the resumed checkpoint's folder with --resume")
    eval_metric: str = Flag("--eval-metric", choices=("top1", "top5", "loss"),
                            help="metric that picks model_best, on the EMA when it is on (see --model-ema-select)")(
        "top1")
    progress: bool = NO_PROGRESS(True)
    resume: str = Flag("--resume", metavar="PATH",
                       help="resume model, EMA, optimizer, scheduler and scaler from this checkpoint")("")
    restore_optimizer: bool = Flag("--no-resume-opt", action="store_true", invert=True,
                                   help="on --resume, do not restore optimizer/scheduler/scaler state")(True)
    drop_ema: bool = Flag("--drop-ema", action="store_true",
                          help="on --resume without --model-ema, drop the checkpoint's EMA(s) instead of refusing to "
                               "resume")(False)
    on_nonfinite: str = Flag("--on-nonfinite", choices=("stop", "skip"),
                             help="a step whose loss or gradients are NaN/inf is never taken and never reaches the "
                                  "EMA; stop: end the run (exit 3) naming the step and the last good checkpoint; "
                                  "skip: skip the step, as the fp16 gradient scaler does, and stop after "
                                  "--max-nonfinite-skips such steps in a row")("stop")
    max_nonfinite_skips: int = Flag("--max-nonfinite-skips", kind=POSITIVE_INT, metavar="N",
                                    help="with --on-nonfinite skip: stop (exit 3) after N non-finite steps in a "
                                         "row")(10)
    dist_bn: str = Flag("--dist-bn", choices=("reduce", "broadcast", ""),
                        help="sync BatchNorm buffers across ranks before each evaluation, raw and EMA")(
        "reduce", note="; '' = off")
    val_interval: int = Flag("--val-interval", kind=POSITIVE_INT, metavar="N",
                             help="epochs between validation and checkpointing, and the last epoch, as timm; a "
                                  "stop or --resume goes back to the last checkpointed epoch")(1)
    recovery_interval: int = Flag("--recovery-interval", kind=NON_NEGATIVE_INT, metavar="N",
                                  help="timm: optimizer steps between recovery checkpoints; not supported (a stop "
                                       "signal writes a resumable mid-epoch checkpoint instead)")(0)
    synchronize_step: bool = Flag("--synchronize-step", action=ON_OFF,
                                  help="synchronize the device after each optimizer step (timing, debugging)")(False)
    model_dtype: str | None = MODEL_DTYPE(None, note="= float32; only float32 is supported")
    device_modules: tuple[str, ...] | None = Flag("--device-modules", nargs="+", metavar="MODULE",
                                                  help="Python modules to import first, for device backends")(None)
    local_rank: int = Flag("--local_rank", kind=int, metavar="N",
                           help="accepted for old launchers; the rank comes from torchrun's environment")(0)


@dataclass(frozen=True)
class ParallelSettings:
    """How several processes share the model and how checkpoints are written."""

    GROUP: ClassVar[str] = "Scaling out (torchrun)"
    fsdp: bool = Flag("--fsdp", action=ON_OFF,
                      help="shard the model, its gradients, the optimizer state and the EMA(s) over the processes "
                           "with FSDP2 (torch fully_shard) instead of replicating them with DDP; needs torchrun "
                           "(--nproc_per_node=1 is fine); --amp-dtype float16 uses torch's ShardedGradScaler; not with "
                           "--torchcompile. With --model-ema-posthoc every rank tracks its shards of the profiles and "
                           "the snapshots are gathered: on a snapshot step each profile is gathered to rank 0, which "
                           "writes the same files as without --fsdp")(False, note="= DDP")
    sync_bn: bool = Flag("--sync-bn", action=ON_OFF,
                         help="synchronized BatchNorm across the processes (torch SyncBatchNorm, as timm's "
                              "convert_sync_batchnorm); --dist-bn is then not needed and is off")(False)
    ddp_broadcast_buffers: bool = Flag("--no-ddp-bb", action="store_true", invert=True, dest="no_ddp_bb",
                                       help="DDP does not broadcast rank 0's buffers (BatchNorm statistics) before "
                                            "each forward")(True)
    reshard_after_forward: bool = Flag(
        "--fsdp-reshard-after-forward", action=ON_OFF,
        help="with --fsdp, free each block's gathered weights after its forward (least memory, one more all-gather "
             "per block in backward); --no-fsdp-reshard-after-forward keeps them until the backward")(True)
    checkpoint_format: str = Flag(
        "--checkpoint-format", choices=("file", "dcp"),
        help="file: last.pth.tar / model_best.pth.tar / checkpoint-<epoch>.pth.tar, one timm-compatible file gathered "
             "on rank 0; dcp: last.dcp and model_best.dcp, torch.distributed.checkpoint folders every rank writes its "
             "shards into (no gather; --checkpoint-hist does not apply). Both resume on any process count, with or "
             "without --fsdp")("file")


@dataclass(frozen=True)
class ScheduledLoaderSettings:
    """timm's scheduled-resolution and NaFlex loaders: parsed with timm's defaults; any other
    value is refused (they replace the data loader that emakit's exact mid-epoch resume
    relies on; see docs/TIMM_DIFFERENCES.md)."""

    GROUP: ClassVar[str] = "Scheduled resolution and NaFlex loaders (timm; not supported)"
    train_img_sizes: tuple[int, ...] | None = Flag("--train-img-sizes", kind=POSITIVE_INTS, nargs="+", metavar="N",
                                                   help="per-batch square image sizes")(None)
    train_batch_sizes: tuple[int, ...] | None = Flag("--train-batch-sizes", kind=POSITIVE_INTS, nargs="+",
                                                     metavar="N", help="batch size of each --train-img-sizes")(None)
    train_size_probs: tuple[float, ...] | None = Flag("--train-size-probs", kind=WEIGHTS, nargs="+", metavar="P",
                                                      help="sampling weights of --train-img-sizes")(None)
    train_size_schedule: str = Flag("--train-size-schedule", choices=("constant", "progressive"),
                                    help="resolution choice schedule")("constant")
    train_size_schedule_spread: float = Flag("--train-size-schedule-spread", kind=NON_NEGATIVE, metavar="S",
                                             help="progressive schedule spread")(0.65)
    train_size_random_mix: float = Flag("--train-size-random-mix", kind=UNIT_INTERVAL, metavar="F",
                                        help="uniform random choices mixed into a progressive schedule")(0.1)
    train_batches_per_epoch: int | None = Flag("--train-batches-per-epoch", "--train-steps-per-epoch",
                                               kind=POSITIVE_INT, metavar="N",
                                               help="fixed loader batches per epoch")(None, note="= inferred")
    variable_batch_loss_scale: str = Flag("--variable-batch-loss-scale", choices=("none", "sqrt", "linear"),
                                          help="scale gradients by the scheduled batch size")("none")
    naflex_loader: bool = Flag("--naflex-loader", action=ON_OFF, help="timm's NaFlex loader")(False)
    naflex_train_seq_lens: tuple[int, ...] = Flag("--naflex-train-seq-lens", kind=POSITIVE_INTS, nargs="+",
                                                  metavar="N", help="NaFlex training sequence lengths")(
        (128, 256, 576, 784, 1024))
    naflex_max_seq_len: int = Flag("--naflex-max-seq-len", kind=POSITIVE_INT, metavar="N",
                                   help="NaFlex validation sequence length")(576)
    naflex_patch_sizes: tuple[int, ...] | None = Flag("--naflex-patch-sizes", kind=POSITIVE_INTS, nargs="+",
                                                      metavar="N", help="NaFlex patch sizes")(None)
    naflex_patch_size_probs: tuple[float, ...] | None = Flag("--naflex-patch-size-probs", kind=WEIGHTS, nargs="+",
                                                             metavar="P", help="NaFlex patch size weights")(None)
    naflex_loss_scale: str = Flag("--naflex-loss-scale", choices=("none", "sqrt", "linear"),
                                  help="NaFlex loss scale by batch size")("linear")
    naflex_patchify_channels_first: bool = Flag("--naflex-patchify-channels-first", action=ON_OFF,
                                                help="NaFlex patches in C-P-P layout")(False)


@dataclass(frozen=True)
class TrackerSettings:
    """Where else a run's metrics go: wandb and TensorBoard (emakit/training/trackers.py), rank 0 only."""

    GROUP: ClassVar[str] = "Trackers (wandb, TensorBoard)"
    log_wandb: bool = Flag("--log-wandb", action="store_true",
                           help="log training and validation metrics to wandb (pip install wandb; WANDB_MODE=offline "
                                "works without an account); a tracker that fails to start is a warning")(False)
    wandb_project: str | None = Flag("--wandb-project", metavar="NAME", help="wandb project name")(
        None, note="= wandb's default project")
    wandb_tags: tuple[str, ...] | None = Flag("--wandb-tags", nargs="+", metavar="TAG", help="wandb tags")(
        None, note="= none")
    wandb_resume_id: str = Flag("--wandb-resume-id", metavar="ID", help="the wandb run id to continue")("")
    log_tensorboard: str | None = Flag("--log-tensorboard", nargs="?", const="", metavar="DIR",
                                       help="write TensorBoard event files (pip install tensorboard): raw and every "
                                            "EMA's loss/top1/top5 per epoch, train loss and lr per --log-interval")(
        None, note="= off; bare flag: <run folder>/tensorboard")


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``train.py`` was asked for; ``flags`` is the parsed flags (read-only)."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    ema: EmaSettings = field(default_factory=EmaSettings)
    run: RunSettings = field(default_factory=RunSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    loaders: ScheduledLoaderSettings = field(default_factory=ScheduledLoaderSettings)
    trackers: TrackerSettings = field(default_factory=TrackerSettings)
    flags: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Resolved:
    """Values that follow from the settings and what was found: the classes in the data, the
    learning rate after batch scaling, the optimizer steps of an epoch and of the run, the
    model's input size, the epochs the schedule trains."""

    num_classes: int
    lr: float
    updates_per_epoch: int
    total_steps: int
    img_size: int
    global_batch_size: int
    epochs: int  # the epochs trained: timm's scheduled epochs (--epochs with lr cycles, cooldown, warmup prefix)
