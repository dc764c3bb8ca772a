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
import os
import reprlib
from collections.abc import Collection, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import yaml

from . import UsageError, one_line
from .kinds import CommaList, Kind, KindError, Kwargs, check_parsed, check_sigma_rels, parse_kwargs
from .kinds import Parser as _Parser
from .options import add_flags, from_flags
from .settings import TrainSettings

__all__ = ["build_parser", "parse_args", "parse_settings", "settings_from_args", "load_yaml_defaults",
           "args_to_yaml"]

# The embedded dataset's preset, applied when train.py gets neither a data path nor --config.
DIGITS_PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "configs", "digits.yaml")
_NOT_YAML_KEYS = {"config", "help"}


def build_parser() -> argparse.ArgumentParser:
    """The full ``train.py`` parser: ``--config`` and every flag declared in :mod:`.settings`."""
    parser = _Parser(prog="train.py", description="Train a timm image classifier with an EMA of its weights.")
    parser.add_argument("-c", "--config", default="", metavar="FILE.yaml",
                        help="YAML file of flag dests (e.g. model_ema_decay: 0.9999) used as defaults; "
                             "the command line still wins (default: '')")
    add_flags(parser, TrainSettings)
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
        raise UsageError(f"config key {key!r}: expected an integer, got {reprlib.repr(value)}")
    if kind is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise UsageError(f"config key {key!r}: expected a number, got {reprlib.repr(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config key {key!r}: expected a number, got {reprlib.repr(value)}")
        value = float(value)
    if kind is str and not isinstance(value, str):
        raise UsageError(f"config key {key!r}: expected a string, got {reprlib.repr(value)}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise UsageError(f"config key {key!r}: {reprlib.repr(value)} is not one of {choices}")
    return value


def _check_value(key: str, action: argparse.Action, value: Any) -> Any:
    """The YAML value converted to what the command line would give, or ``UsageError``."""
    if value is None:
        if action.default is None or action.nargs == "?":
            return None
        raise UsageError(f"config key {key!r}: null is not allowed (default is {reprlib.repr(action.default)})")
    if isinstance(action, Kwargs):  # timm's args.yaml holds a mapping; KEY=VALUE items also read
        if not isinstance(value, (dict, list)):
            raise UsageError(f"config key {key!r}: expected a mapping (img_size: 240), got {reprlib.repr(value)}")
        return parse_kwargs(value, f"config key {key!r}")
    if _bool_action(action):
        if not isinstance(value, bool):
            raise UsageError(f"config key {key!r}: expected true or false, got {reprlib.repr(value)}")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1:
        if not isinstance(value, list):
            raise UsageError(f"config key {key!r}: expected a list, got {reprlib.repr(value)}")
        if action.nargs == "+" and not value:  # timm's args.yaml writes an unset list as []
            if action.default is None:
                return None
            raise UsageError(f"config key {key!r}: expected at least one item, got []")
        return [_check_scalar(key, action, v) for v in value]
    return _check_scalar(key, action, value)


# A --config file holds flag values: these bounds refuse YAML "billion laughs" (nested anchors
# and aliases) before anything expands or echoes it, and keep every message one short line.
CONFIG_MAX_BYTES = 1 << 20
CONFIG_MAX_ALIASES = 100
CONFIG_MAX_ITEMS = 10_000


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses more than ``CONFIG_MAX_ALIASES`` alias uses (``*name``)."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 (PyYAML's hook)
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > CONFIG_MAX_ALIASES:
                raise UsageError(f"uses more than {CONFIG_MAX_ALIASES} YAML aliases (*name); write the values out")
        return super().compose_node(parent, index)


def _count_items(value: Any, budget: int) -> int:
    """The budget left after counting the scalars in ``value`` (negative: over budget; stops early)."""
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if not isinstance(value, list):
        return budget - 1
    for item in value:
        budget = _count_items(item, budget)
        if budget < 0:
            break
    return budget


def _read_config(path: str) -> Any:
    """The YAML document of a ``--config`` file, or ``UsageError`` naming the problem."""
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    if os.path.getsize(path) > CONFIG_MAX_BYTES:
        raise UsageError(f"--config {path}: larger than {CONFIG_MAX_BYTES >> 20} MiB; a config holds flag values")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        loader = _ConfigLoader(text)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except UsageError as e:
        raise UsageError(f"--config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({one_line(e)[:300]})") from None
    if _count_items(data, CONFIG_MAX_ITEMS) < 0:
        raise UsageError(f"--config {path}: more than {CONFIG_MAX_ITEMS} values; a config holds flag values")
    return data


def load_yaml_defaults(path: str, parser: argparse.ArgumentParser, overridden: Collection[str] = ()
                       ) -> dict[str, Any]:
    """Read a ``--config`` file: a mapping of parser dests to values, each type-checked, except
    those of ``overridden`` dests (given on the command line, which wins: e.g. ``--device cpu``
    over the ``device: cuda`` of an args.yaml written on a GPU machine)."""
    data = _read_config(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_YAML_KEYS}
    checked = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise UsageError(f"--config {path}: unknown key {reprlib.repr(key)} (keys are flag names with _ "
                             f"for -, e.g. model_ema_decay; see train.py --help)")
        if dest not in overridden:
            checked[dest] = _check_value(str(key)[:100], actions[dest], value)
    return checked


class _OnlyGiven(argparse.Namespace):
    """A namespace that claims every attribute, so argparse fills in no default: what it holds
    after parsing is what the command line gave."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # argparse's own bookkeeping (_unrecognized_args)
            raise AttributeError(name)
        return None


def _given_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests the command line sets."""
    return set(vars(parser.parse_known_args(argv, _OnlyGiven())[0]))


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
    given = parser.parse_args(argv)
    if not config and given.data is None and given.data_dir is None and not given.dataset:  # --dataset: no preset
        config = DIGITS_PRESET
        if not os.path.isfile(config):
            raise UsageError(f"the embedded dataset's preset {config} is missing; pass --config FILE or a data path")
    if config:
        parser.set_defaults(**load_yaml_defaults(config, parser, _given_dests(parser, argv)))
    args = parser.parse_args(argv)
    args.config = config
    check_parsed(parser, args, parser.error)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    """Rules that relate several flags (each flag's own rule is its kind, see :mod:`.kinds`)."""
    mixup = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixup and args.batch_size % 2:
        raise UsageError(f"--mixup/--cutmix need an even --batch-size, got {args.batch_size}")
    if args.model_ema_warmup and args.model_ema_schedule not in ("constant", "warmup"):
        raise UsageError(f"--model-ema-warmup conflicts with --model-ema-schedule {args.model_ema_schedule}")
    if args.model_ema_bn_recal and not args.model_ema:
        raise UsageError("--model-ema-bn-recal recalibrates the EMA's BatchNorm statistics: add --model-ema")
    _check_posthoc_args(args)
    _check_parallel_args(args)
    _check_timm_args(args)
    if args.resume and os.path.isdir(args.resume):
        from .resume import check_resume_folder  # here, not at the top: --help stays free of the trainer

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


# timm train.py flags that emakit parses with timm's default and refuses otherwise: dest ->
# (default, why). The same table is docs/TIMM_DIFFERENCES.md and tests/test_timm_flags.py.
UNSUPPORTED = {
    "torchscript": (False, "torch.jit is deprecated (timm deprecates --torchscript too); use --torchcompile"),
    "model_dtype": (None, "only float32 weights: an EMA of float16/bfloat16 weights cannot move at decay 0.9998 "
                          "(each step is below their resolution); use --amp --amp-dtype bfloat16"),
    "epoch_repeats": (0.0, "timm applies it to iterable (tfds/wds) datasets only; emakit reads folders"),
    "recovery_interval": (0, "not supported; a stop signal (Ctrl-C, SIGTERM) writes a resumable mid-epoch checkpoint"),
    "train_img_sizes": (None, "timm's scheduled-resolution loader replaces the data loader that emakit's exact "
                              "mid-epoch resume relies on"),
    "train_batch_sizes": (None, "needs --train-img-sizes, which is not supported"),
    "train_size_probs": (None, "needs --train-img-sizes, which is not supported"),
    "train_size_schedule": ("constant", "needs --train-img-sizes, which is not supported"),
    "train_size_schedule_spread": (0.65, "needs --train-img-sizes, which is not supported"),
    "train_size_random_mix": (0.1, "needs --train-img-sizes, which is not supported"),
    "train_batches_per_epoch": (None, "timm's fixed-length loader replaces the data loader that emakit's exact "
                                      "mid-epoch resume relies on; an epoch is one pass over the data"),
    "variable_batch_loss_scale": ("none", "needs --train-img-sizes, which is not supported"),
    "naflex_loader": (False, "timm's NaFlex loader (variable patch sequences) replaces the data loader and the "
                             "input format that emakit's loop, evaluation and resume rely on"),
    "naflex_train_seq_lens": ([128, 256, 576, 784, 1024], "needs --naflex-loader, which is not supported"),
    "naflex_max_seq_len": (576, "needs --naflex-loader, which is not supported"),
    "naflex_patch_sizes": (None, "needs --naflex-loader, which is not supported"),
    "naflex_patch_size_probs": (None, "needs --naflex-loader, which is not supported"),
    "naflex_loss_scale": ("linear", "needs --naflex-loader, which is not supported"),
    "naflex_patchify_channels_first": (False, "needs --naflex-loader, which is not supported"),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_timm_args(args: argparse.Namespace) -> None:
    """timm's flags that emakit refuses away from their default, and their cross-flag rules."""
    for dest, (default, why) in UNSUPPORTED.items():
        if getattr(args, dest) not in (default, "float32" if dest == "model_dtype" else default):
            value = getattr(args, dest)
            raise UsageError(f"{_flag(dest)}{'' if value is True else ' ' + _shown(value)}: {why}")
    if args.torchscript and args.torchcompile:
        raise UsageError("--torchscript and --torchcompile exclude each other (as in timm): give one")
    channels = args.in_chans if args.in_chans is not None else (args.input_size[0] if args.input_size else 3)
    if channels != 3:
        raise UsageError(f"--in-chans/--input-size: {channels} input channels; emakit's loaders decode RGB images, "
                         "so only 3 channels are supported")
    if args.jsd_loss and getattr(args, "aug_splits", 0) < 2:
        raise UsageError("--jsd-loss needs --aug-splits 2 or more (timm's JsdCrossEntropy compares the splits)")
    _check_distill_args(args)


def _check_distill_args(args: argparse.Namespace) -> None:
    if args.kd_model_name is None:
        return
    if args.kd_distill_type == "feature":
        raise UsageError("--kd-distill-type feature is not supported: its projection layer is trained outside the "
                         "model, so the EMA, the checkpoints and --resume would miss it; use logit or token")
    if args.kd_model_name == "ema" and not args.model_ema:
        raise UsageError("--kd-model-name ema distills from this run's EMA: add --model-ema")
    if args.kd_model_name == "ema" and (args.model_ema_force_cpu or args.fsdp):
        raise UsageError("--kd-model-name ema needs the EMA next to the model: drop --model-ema-force-cpu / --fsdp")
    if args.fsdp:
        raise UsageError("--kd-model-name with --fsdp is not supported: the teacher would be a full copy on every "
                         "rank beside the sharded student; drop --fsdp")
    if args.kd_model_name == "ema" and args.kd_distill_type != "logit":
        raise UsageError("--kd-model-name ema works with --kd-distill-type logit (the EMA has the student's head)")


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


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


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The frozen :class:`~.settings.TrainSettings` of parsed (and checked) flags: built once
    here by the declarations in :mod:`.settings`, read by everything below the command line."""
    return from_flags(TrainSettings, args, flags=MappingProxyType(dict(vars(args))))


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
