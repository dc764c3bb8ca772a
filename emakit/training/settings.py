"""What a training run was asked to do, as frozen dataclasses.

``config.parse_settings`` builds a :class:`TrainSettings` once from the command line and
the ``--config`` YAML; everything below the CLI layer (build, resume, outputs, the loops)
reads these objects and never an ``argparse.Namespace``. Values that depend on the data,
the model or the process count (the number of classes, the scaled learning rate, the run
folder) are resolved once during the build and kept in :class:`Resolved`, never written
back into the settings.

Field names follow the flags (``--model-ema-every`` -> ``ema.every``), so a timm user finds
each one; ``TrainSettings.flags`` keeps the parsed flags as a read-only mapping for
``args.yaml`` and the checkpoint's ``args`` entry (timm's layout).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .data import AugmentConfig

__all__ = ["DataSettings", "ModelSettings", "EmaSettings", "PosthocSettings", "OptimSettings", "ScheduleSettings",
           "LossSettings", "RunSettings", "ParallelSettings", "TrainSettings", "Resolved"]


@dataclass(frozen=True)
class DataSettings:
    """Dataset, loaders and transforms (``--data``, ``--train-split``, ``-b``, ``--workers``, ...)."""

    path: str | None = None                    # ImageFolder root; None: the embedded digits dataset
    train_split: str = "train"
    val_split: str | None = None
    skip_bad_images: bool = False
    label_noise: float = 0.0                   # fraction of training labels flipped (seeded)
    num_classes: int | None = None             # --num-classes; None: the classes found in the data
    batch_size: int = 128                      # per process
    eval_batch_size: int | None = None         # --validation-batch-size; None: batch_size
    workers: int = 4
    pin_memory: bool = False
    prefetcher: bool = True                    # the GPU input path (not --no-prefetcher)
    img_size: int | None = None
    crop_pct: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ModelSettings:
    """The timm model (``--model``, ``--drop``, ``--drop-path``, ``--pretrained-path``, ...)."""

    name: str = "resnet50"
    drop_rate: float = 0.0
    drop_path_rate: float | None = None
    pretrained_path: str | None = None          # set only with --pretrained
    channels_last: bool = False
    compile_backend: str | None = None          # --torchcompile


@dataclass(frozen=True)
class PosthocSettings:
    """The post-hoc EMA (``--model-ema-posthoc`` and ``--posthoc-*``)."""

    sigma_rels: tuple[float, ...] = (0.05, 0.10)
    every: int | None = None                    # snapshot interval; None: planned from the budget
    dtype: str = "float16"
    budget: str = "17x"
    max_snapshots: int | None = None


@dataclass(frozen=True)
class EmaSettings:
    """The EMA(s) (``--model-ema*``). Exactly one of ``decays`` / ``half_lives`` is set; one
    value is one EMA, several are one fused ``MultiEMA``."""

    enabled: bool = False
    decays: tuple[float, ...] | None = (0.9998,)
    half_lives: tuple[str, ...] | None = None
    schedule: str = "constant"
    every: int = 1
    after: int = 0
    force_cpu: bool = False
    dtype: str | None = None
    buffers: str = "average"
    bn_recal: int = 0                           # training batches for BatchNorm recalibration
    select: str = "first"                       # which EMA picks model_best: first | best
    posthoc: PosthocSettings | None = None      # --model-ema-posthoc

    @property
    def count(self) -> int:
        """How many EMAs the run keeps (0 without ``--model-ema``)."""
        return len(self.decays or self.half_lives or ()) if self.enabled else 0


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer and gradient handling (``--opt``, ``--lr``, ``--clip-grad``, ...)."""

    opt: str = "sgd"
    lr: float | None = None                     # None: lr_base scaled by the global batch
    lr_base: float = 0.1
    lr_base_size: int = 256
    lr_base_scale: str = ""
    momentum: float = 0.9
    weight_decay: float = 2e-5
    eps: float | None = None
    betas: tuple[float, ...] | None = None
    layer_decay: float | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"
    grad_accum_steps: int = 1
    fused: bool = True                          # torch's fused kernel for SGD/Adam/AdamW (not --no-opt-fused)


@dataclass(frozen=True)
class ScheduleSettings:
    """The LR schedule (``--sched``, ``--warmup-epochs``, ...), timm's ``create_scheduler_v2``."""

    name: str = "cosine"
    epochs: int = 300
    decay_epochs: float = 90
    decay_milestones: tuple[int, ...] = (90, 180, 270)
    cooldown_epochs: int = 0
    patience_epochs: int = 10
    decay_rate: float = 0.1
    min_lr: float = 0.0
    warmup_lr: float = 1e-5
    warmup_epochs: int = 5
    warmup_prefix: bool = False
    on_updates: bool = False                    # --sched-on-updates


@dataclass(frozen=True)
class LossSettings:
    """Loss, label smoothing and mixup/cutmix (timm's flags)."""

    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0

    @property
    def mixup_enabled(self) -> bool:
        """Whether timm's ``Mixup`` is built (mixup, cutmix or a cutmix range asked for)."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


@dataclass(frozen=True)
class RunSettings:
    """The run itself: device, precision, outputs, resume, logging, failure policy."""

    epochs: int = 300
    seed: int = 42
    device: str | None = None
    amp: bool = False
    amp_dtype: str = "float16"
    output: str = "./output"
    experiment: str = ""
    resume: str = ""
    restore_optimizer: bool = True              # not --no-resume-opt
    drop_ema: bool = False
    log_interval: int = 50
    progress: bool = True                       # not --no-progress
    checkpoint_hist: int = 10
    eval_metric: str = "top1"
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    dist_bn: str = "reduce"


@dataclass(frozen=True)
class ParallelSettings:
    """How several processes share the model (``--fsdp``, ``--fsdp-reshard-after-forward``)
    and how checkpoints are written (``--checkpoint-format``)."""

    fsdp: bool = False                          # FSDP2 fully_shard instead of DDP (needs torchrun)
    reshard_after_forward: bool = True          # free each block's gathered weights after its forward
    checkpoint_format: str = "file"             # file: one timm-compatible .pth.tar; dcp: a DCP folder


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``train.py`` was asked for; ``flags`` is the parsed flags (read-only)."""

    data: DataSettings
    model: ModelSettings
    ema: EmaSettings
    optim: OptimSettings
    schedule: ScheduleSettings
    loss: LossSettings
    run: RunSettings
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    flags: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Resolved:
    """Values that follow from the settings and what was found: the classes in the data, the
    learning rate after batch scaling, the optimizer steps of an epoch and of the run, the
    model's input size."""

    num_classes: int
    lr: float
    updates_per_epoch: int
    total_steps: int
    img_size: int
    global_batch_size: int
