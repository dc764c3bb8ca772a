"""One declaration per option: the flag, its help and default, the YAML key and its check,
and the frozen settings field all come from one :class:`Flag` on a dataclass field.

A settings dataclass (``settings.py``, ``validate_config.py``, ``cli.py``) declares each of
its options as a field::

    warmup_lr: float = Flag("--warmup-lr", kind=NON_NEGATIVE, metavar="LR", help="warmup start lr >= 0")(1e-5)

:func:`add_flags` turns the fields of a settings class into argparse flags (the help ends with
``(default: ...)`` made from the field's default), and :func:`from_flags` builds the frozen
settings from the parsed namespace by the same fields. A ``--config`` YAML key is the flag's
dest and is checked by the flag's kind (``config.load_yaml_defaults``). Flags that several
commands share (``--model``, ``--img-size``, ``--device``, ...) are :class:`Flag` constants in
this module; each command states only its own default.

Why argparse and not jsonargparse/tyro/simple-parsing: every flag must read exactly as timm's
``train.py`` (argparse) reads it: ``-b``/``-j`` aliases, ``nargs='+'`` lists, ``--no-x``
switches, ``nargs='?'`` with a const, prefix matching. The declarations generate argparse
directly, so nothing else needs to agree with timm.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from .kinds import (EVAL_INTERPOLATION, FRACTION, MEAN, NON_NEGATIVE_INT, POSITIVE_INT, STD, CommaList, Device,
                    Items, Kwargs)

__all__ = ["Flag", "add_flags", "from_flags", "flag_fields", "MODEL", "NUM_CLASSES", "IMG_SIZE", "CROP_PCT",
           "MEAN_FLAG", "STD_FLAG", "INTERPOLATION", "BATCH_SIZE", "WORKERS", "DEVICE", "AMP_DTYPE", "CHANNELS_LAST",
           "NO_PROGRESS", "GLOBAL_POOL", "IN_CHANS", "INPUT_SIZE", "MODEL_KWARGS", "FAST_NORM", "FUSER", "MODEL_DTYPE",
           "TORCHCOMPILE_MODE", "TORCHSCRIPT", "DATASET", "DATASET_DOWNLOAD",
           "INPUT_KEY", "TARGET_KEY", "CLASS_MAP", "TRUST_REMOTE_CODE"]

_META = "emakit.flag"


def _shown(value: Any, kind: Any = None) -> str:
    """A default as ``--help`` shows it: ``None``, ``''``, ``0.08 1.0``, ``0.05,0.1``, ``top1``."""
    if isinstance(value, (tuple, list)):
        return ("," if isinstance(kind, CommaList) else " ").join(map(str, value))
    if value == "":
        return "''"
    return str(value)


class Flag:
    """How one option reads on the command line. Calling it with the default gives the
    dataclass field: ``Flag("--lr", kind=POSITIVE, help="...")(None, note="= scaled")``.

    ``invert``: the flag says the opposite of the field (``--no-prefetcher`` sets
    ``prefetcher`` False). ``section``: a ``bool`` flag that switches a nested settings class
    on; the field is that class built from the same namespace, or None while the flag is off.
    ``note``: the words after the default in ``--help`` (``"= model default"``).
    """

    _OPTIONS = {"metavar": None, "choices": None, "nargs": None, "action": None, "const": None, "dest": None,
                "required": None, "invert": False, "section": None, "default": None, "note": ""}

    def __init__(self, *names: str, help: str = "", kind: Callable[[str], Any] | None = None, **options: Any) -> None:
        unknown = set(options) - set(self._OPTIONS)
        if unknown:
            raise TypeError(f"Flag{names}: unknown options {sorted(unknown)}")
        self.names, self.help, self.kind = names, help, kind
        for key, value in self._OPTIONS.items():
            setattr(self, key, options.get(key, value))

    def __call__(self, default: Any = None, **changes: Any) -> Any:
        """The dataclass field with this flag and ``default`` (as the settings hold it);
        ``changes`` override this command's ``help``, ``note``, ``choices``, ..."""
        flag = Flag(*self.names, **{"help": self.help, "kind": self.kind,
                                    **{k: getattr(self, k) for k in self._OPTIONS}, "note": "", **changes,
                                    "default": default})
        if isinstance(default, dict):  # a key=value flag (kinds.Kwargs): frozen, one fresh mapping per instance
            return dataclasses.field(default_factory=lambda: MappingProxyType(dict(default)), metadata={_META: flag})
        return dataclasses.field(default=default, metadata={_META: flag})

    @property
    def key(self) -> str:
        """The argparse dest, which is also the ``--config`` YAML key and the ``args.yaml`` key."""
        if self.dest:
            return self.dest
        longest = max(self.names, key=len)
        return longest.lstrip("-").replace("-", "_")

    def parsed_default(self) -> Any:
        """The default as the parser holds it (the opposite for an inverted switch)."""
        if self.section is not None:
            return False
        if isinstance(self.default, tuple):  # a list, as argparse gives a nargs flag from the command line
            return list(self.default)
        if isinstance(self.default, Mapping):  # a dict, as timm's key=value flags hold it
            return dict(self.default)
        return (not self.default) if self.invert else self.default

    def add_to(self, group: argparse._ActionsContainer) -> None:
        """Add this flag to an argparse parser or group, its help ending with the default."""
        default = self.parsed_default()
        space = " " if self.note and self.note[0] not in ";,:" else ""
        positional = not self.names[0].startswith("-")
        shown = f" (default: {_shown(default, self.kind)}{space}{self.note})"
        if self.required or (positional and self.nargs is None):
            shown = "" if positional else " (required)"
        text = f"{self.help}{shown}".replace("%", "%%")
        kwargs: dict[str, Any] = {"default": default, "help": text.lstrip()}
        for key in ("metavar", "choices", "nargs", "const", "required"):
            if getattr(self, key) is not None:
                kwargs[key] = list(self.choices) if key == "choices" else getattr(self, key)
        if self.action is not None:
            kwargs["action"] = self.action
        elif self.kind is not None:
            kwargs["type"] = self.kind
        if positional and self.nargs is None:
            del kwargs["default"]
        if not positional:
            kwargs["dest"] = self.key
        group.add_argument(*self.names, **kwargs)


def flag_fields(cls: type) -> Iterable[tuple[dataclasses.Field, Flag | None]]:
    """Every field of a settings class with its :class:`Flag` (None: a nested class or a
    field the command line does not set)."""
    for f in dataclasses.fields(cls):
        yield f, f.metadata.get(_META)


def _nested(f: dataclasses.Field) -> type | None:
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def add_flags(parser: argparse.ArgumentParser, cls: type, *, title: str | None = None) -> None:
    """Add the flags declared on ``cls`` (and its nested settings classes) to ``parser``,
    in one argparse group titled by the class's ``GROUP`` (or ``title``)."""
    group = parser.add_argument_group(title or getattr(cls, "GROUP", None) or cls.__name__)
    for f, flag in flag_fields(cls):
        if flag is not None:
            flag.add_to(parser if not flag.names[0].startswith("-") else group)
            if flag.section is not None:
                add_flags(parser, flag.section)
        elif _nested(f) is not None:
            add_flags(parser, _nested(f))


def _value(f: dataclasses.Field, flag: Flag, flags: Mapping[str, Any]) -> Any:
    value = flags[flag.key]
    if isinstance(value, Mapping):
        return MappingProxyType(dict(value))
    if flag.invert:
        return not value
    if isinstance(value, list) or (value is not None and str(f.type).startswith("tuple")
                                   and not isinstance(value, tuple)):
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return value


def from_flags(cls: type, parsed: Mapping[str, Any] | argparse.Namespace, **extra: Any) -> Any:
    """The frozen ``cls`` of parsed flags (a Namespace or a mapping of dests): each declared
    field from its flag's dest, nested settings classes recursively, ``extra`` as given."""
    flags = vars(parsed) if isinstance(parsed, argparse.Namespace) else parsed
    values: dict[str, Any] = {}
    for f, flag in flag_fields(cls):
        if f.name in extra:
            continue
        if flag is not None and flag.section is not None:
            values[f.name] = from_flags(flag.section, flags) if flags.get(flag.key) else None
        elif flag is not None:
            if flag.key in flags:
                values[f.name] = _value(f, flag, flags)
        elif _nested(f) is not None:
            values[f.name] = from_flags(_nested(f), flags)
    return cls(**values, **extra)


# ------------------------------------------------------------------ flags shared by the commands
MODEL = Flag("--model", metavar="MODEL", help="timm model name")
NUM_CLASSES = Flag("--num-classes", kind=POSITIVE_INT, metavar="N", help="number of classes")
IMG_SIZE = Flag("--img-size", kind=POSITIVE_INT, metavar="N", help="image size")
CROP_PCT = Flag("--crop-pct", kind=FRACTION, metavar="PCT", help="validation center-crop fraction in (0, 1]")
MEAN_FLAG = Flag("--mean", kind=MEAN, nargs="+", metavar="MEAN",
                 help="normalisation mean: 3 numbers (R G B) or 1 for all")
STD_FLAG = Flag("--std", kind=STD, nargs="+", metavar="STD",
                help="normalisation std: 3 numbers > 0 (R G B) or 1 for all")
INTERPOLATION = Flag("--interpolation", kind=EVAL_INTERPOLATION, metavar="NAME",
                     help="resize interpolation for validation: nearest, bilinear, bicubic, box, hamming, lanczos")
BATCH_SIZE = Flag("-b", "--batch-size", kind=POSITIVE_INT, metavar="N", help="batch size per process")
WORKERS = Flag("-j", "--workers", kind=NON_NEGATIVE_INT, metavar="N", help="data loader worker processes per rank")
DEVICE = Flag("--device", kind=Device(), metavar="DEV",
              help="device: cpu, cuda, cuda:N or mps, where available")
AMP_DTYPE = Flag("--amp-dtype", choices=("float16", "bfloat16"), help="autocast dtype")
CHANNELS_LAST = Flag("--channels-last", action=argparse.BooleanOptionalAction,
                     help="use the channels_last memory layout")
NO_PROGRESS = Flag("--no-progress", action="store_true", invert=True, dest="no_progress",
                   help="no tqdm progress bars (bars only on rank 0 and a TTY)")
# timm's model-factory flags, the same in train.py and validate.py (timm's spelling and defaults)
GLOBAL_POOL = Flag("--gp", metavar="POOL",
                   help="global pool type passed to timm.create_model (global_pool): avg, max, avgmax, catavgmax, "
                        "fast, ...")
IN_CHANS = Flag("--in-chans", kind=POSITIVE_INT, metavar="N", help="image input channels")
INPUT_SIZE = Flag("--input-size", kind=Items(POSITIVE_INT, "3 integers C H W >= 1", (3,)), nargs=3, metavar="N",
                  help="input dimensions C H W (e.g. 3 224 224); overrides --img-size, and C sets --in-chans")
MODEL_KWARGS = Flag("--model-kwargs", nargs="*", action=Kwargs, metavar="KEY=VALUE",
                    help="extra timm.create_model keyword arguments, each value a Python literal or text, e.g. "
                         "--model-kwargs img_size=240 (a ViT at another resolution)")
FAST_NORM = Flag("--fast-norm", action=argparse.BooleanOptionalAction,
                 help="timm's experimental fast normalization layers (timm.layers.set_fast_norm)")
FUSER = Flag("--fuser", metavar="NAME", help="TorchScript fuser for timm's scripted layers: te, old, nvfuser "
                                             "(timm.utils.set_jit_fuser)")
MODEL_DTYPE = Flag("--model-dtype", choices=("float32", "float16", "bfloat16"),
                   help="model weights dtype without AMP")
TORCHCOMPILE_MODE = Flag("--torchcompile-mode", metavar="MODE",
                         help="torch.compile mode with --torchcompile: default, reduce-overhead, max-autotune, ...")
TORCHSCRIPT = Flag("--torchscript", action=argparse.BooleanOptionalAction, help="torch.jit.script the model")


# timm's data-source flags, the same in train.py and validate.py (emakit/training/sources.py)
DATASET = Flag("--dataset", metavar="NAME",
               help="dataset type + name as timm's create_dataset: '' (ImageFolder, or <split>.tar files of class "
                    "folders), torch/NAME (torchvision: cifar10, mnist, image_folder, ...), hfds/NAME (Hugging Face "
                    "datasets: a save_to_disk folder or a hub name in its cache), wds/NAME (WebDataset shards "
                    "streamed: --data-dir with _info.json, or a split like name-{0000..0099}.tar), wids/NAME (the "
                    "same shards indexed: random access, exact resume), hfids/NAME (Hugging Face streaming); see "
                    "README 'Data sources'")
DATASET_DOWNLOAD = Flag("--dataset-download", action="store_true",
                        help="let torch/ datasets download themselves (torchvision's download)")
INPUT_KEY = Flag("--input-key", metavar="KEY",
                 help="image field of hfds/, hfids/ samples (image) or extension(s) of wds/, wids/ samples "
                      "(jpg;png;webp)")
TARGET_KEY = Flag("--target-key", metavar="KEY",
                  help="label field of hfds/, hfids/ samples (label); for wds/, wids/ a field of the json sidecar "
                       "instead of the .cls file")
CLASS_MAP = Flag("--class-map", metavar="FILENAME",
                 help="text file of class names, one a line (its line number is the label), as timm")
TRUST_REMOTE_CODE = Flag("--dataset-trust-remote-code", action="store_true",
                         help="let a Hugging Face dataset run its own loading code (datasets < 4)")
