"""One rule per kind of flag value, shared by ``train.py``, ``validate.py`` and ``emakit``.

Every flag that takes a value names its kind as its argparse ``type=``: a finite number in
a range, an integer in a range, a name from a set (taken from timm where timm decides), a
device, a timm AutoAugment policy, an output file. A kind converts one command-line token
(an error there is argparse's one line, ``argument --lr: ...``), converts a ``--config``
YAML value by the same rule (:meth:`Kind.from_yaml`), and checks whole values after
parsing (:func:`check_parsed`): the number of items and their order for ``nargs`` flags,
and every item again, so a value is checked the same way wherever it came from.

Messages say the value, what is wrong and what to give instead; argparse (or
:func:`check_parsed`) puts the flag in front and the CLIs print the result as one line
with exit status 2. Nothing heavy is imported here: the timm-backed
kinds import timm only when they check a value.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

from . import UsageError, one_line

__all__ = [
    "Kind", "Number", "Items", "OneOf", "Device", "AutoAugment", "OutputFile", "SEED_MAX",
    "FINITE", "POSITIVE", "NON_NEGATIVE", "PROBABILITY", "UNIT_INTERVAL", "FRACTION", "RATE", "POSITIVE_INT",
    "NON_NEGATIVE_INT", "SEED", "EVAL_INTERPOLATION", "TRAIN_INTERPOLATION", "MEAN", "STD", "check_parsed",
    "flag_name", "is_training_checkpoint", "KindError", "Parser", "parse_sigma_rels", "check_sigma_rels", "CommaList",
    "Kwargs", "parse_kwargs",
]

# numpy's legacy seeding takes [0, 2**32 - 1]; torch.manual_seed takes more, so numpy bounds the seed.
SEED_MAX = 2**32 - 1


class KindError(ValueError):
    """A value that breaks its kind's rule; the message is the part after the flag name."""


class Kind:
    """A kind of flag value: ``parse`` one token, ``validate`` one converted item, and
    ``check`` a whole (possibly multi-item) value. ``expected`` says what to give."""

    expected = "a value"

    def parse(self, text: str) -> Any:
        """One command-line token -> a value; ``KindError(reason)`` if it has the wrong form."""
        return text

    def validate(self, value: Any) -> None:
        """Raise ``KindError(reason)`` if one converted item breaks the rule."""

    def check(self, value: Any) -> None:
        """The whole value after parsing (a list for ``nargs`` flags): every item again."""
        for item in value if isinstance(value, list) else [value]:
            try:
                self.validate(item)
            except KindError as e:
                raise KindError(_invalid(item, str(e), self.expected)) from None

    def __call__(self, text: str) -> Any:
        try:
            value = self.parse(str(text))
            self.validate(value)
        except KindError as e:
            raise argparse.ArgumentTypeError(_invalid(text, str(e), self.expected)) from None
        return value

    def from_yaml(self, value: Any) -> Any:
        """A ``--config`` YAML scalar, converted and checked as the command line would."""
        if isinstance(value, (bool, list, dict)) or value is None:
            raise KindError(_invalid(value, "wrong type", self.expected))
        try:
            return self(str(value))
        except argparse.ArgumentTypeError as e:
            raise KindError(str(e)) from None

    @property
    def __name__(self) -> str:  # argparse names the type in some of its messages
        return self.expected


def _clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (an echoed value never floods the one error line)."""
    return text if len(text) <= limit else text[:limit] + "..."


def _invalid(value: Any, reason: str, expected: str) -> str:
    shown = _clip(repr(value) if isinstance(value, str) else _show(value))
    return f"invalid value {shown} ({reason}); give {expected}"


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value) if value else "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def flag_name(action: argparse.Action) -> str:
    """How argparse names a flag in its errors: ``-vb/--validation-batch-size`` or ``data``."""
    return "/".join(action.option_strings) or action.metavar or action.dest


# --------------------------------------------------------------------------- numbers
class Number(Kind):
    """A finite float (``integer=False``) or an int, with optional bounds.

    ``lo``/``hi`` are inclusive unless ``lo_open``/``hi_open``. ``nan``, ``inf`` and numbers
    too large for a float are refused for every float flag.
    """

    def __init__(self, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False, what: str | None = None) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open, self.integer = lo, hi, lo_open, hi_open, integer
        noun = what or ("an integer" if integer else "a number")
        self.expected = f"{noun} {self.range_text()}".strip()

    def range_text(self) -> str:
        """``> 0``, ``>= 1``, ``in [0, 1)``, or '' without bounds."""
        lo, hi = (_show(v) if v is not None else None for v in (self.lo, self.hi))
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return ""

    def parse(self, text: str) -> Any:
        text = text.strip()
        if self.integer:
            try:
                return int(text, 10)
            except ValueError:
                raise KindError("not an integer") from None
        try:
            return float(text)
        except ValueError:
            raise KindError("not a number") from None

    def validate(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KindError("not a number")
        if self.integer and not isinstance(value, int):
            raise KindError("not an integer")
        if not self.integer and not math.isfinite(value):
            raise KindError("not finite")
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise KindError("too small")
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            raise KindError("too large")


FINITE = Number()
POSITIVE = Number(0, lo_open=True)
NON_NEGATIVE = Number(0)
PROBABILITY = Number(0, 1, what="a probability")
UNIT_INTERVAL = Number(0, 1)
RATE = Number(0, 1, hi_open=True, what="a rate")  # dropout, label smoothing: 1 would leave nothing to learn
FRACTION = Number(0, 1, lo_open=True, what="a fraction")
POSITIVE_INT = Number(1, integer=True)
NON_NEGATIVE_INT = Number(0, integer=True)
SEED = Number(0, SEED_MAX, integer=True, what="a seed")


class Items(Kind):
    """A ``nargs`` flag: each item is of kind ``item``; ``counts`` says how many items are
    allowed (empty: one or more), ``increasing`` asks for MIN <= MAX (``strict``: MIN < MAX)."""

    def __init__(self, item: Kind, expected: str, counts: Sequence[int] = (), *, increasing: bool = False,
                 strict: bool = False) -> None:
        self.item, self.counts, self.increasing, self.strict = item, tuple(counts), increasing, strict
        self.expected = expected

    def parse(self, text: str) -> Any:
        return self.item.parse(text)

    def validate(self, value: Any) -> None:
        self.item.validate(value)

    def check(self, value: Any) -> None:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for item in items:
            try:
                self.item.validate(item)
            except KindError as e:
                raise KindError(_invalid(items, f"{_show(item)}: {e}", self.expected)) from None
        if (self.counts and len(items) not in self.counts) or not items:
            count = {0: "none", 1: "one value"}.get(len(items), f"{len(items)} values")
            raise KindError(_invalid(items, count, self.expected))
        if self.increasing and any(a >= b if self.strict else a > b for a, b in zip(items, items[1:])):
            raise KindError(_invalid(items, "out of order", self.expected))


MEAN = Items(FINITE, "3 numbers (one per RGB channel) or 1 for all", (1, 3))
STD = Items(POSITIVE, "3 numbers > 0 (one per RGB channel) or 1 for all", (1, 3))


# --------------------------------------------------------------------------- names
class OneOf(Kind):
    """A name from a set; ``names`` is a list or a function giving it (called only when a
    value is checked or the message is written, so timm is imported only then). ``always``:
    names allowed without asking ``names`` (the defaults: argparse checks a string default
    at every parse, ``--help`` included, and that must not load timm)."""

    def __init__(self, names: Iterable[str] | Callable[[], Iterable[str]], always: Iterable[str] = ()) -> None:
        self._names, self.always = names, tuple(always)

    def names(self) -> list[str]:
        """The allowed names."""
        return list(self.always) + list(self._names() if callable(self._names) else self._names)

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(repr(n) if n == "" else n for n in self.names())

    @property
    def __name__(self) -> str:  # argparse asks every help line for it: not the names, which may load timm
        return "name"

    def validate(self, value: Any) -> None:
        if value not in self.always and value not in self.names():
            raise KindError("unknown")


def _interpolations() -> list[str]:
    from timm.data.transforms import _str_to_pil_interpolation

    return list(_str_to_pil_interpolation)


# '' = the model's default; 'random' = timm's random choice per image (training only).
EVAL_INTERPOLATION = OneOf(_interpolations, always=("",))
TRAIN_INTERPOLATION = OneOf(_interpolations, always=("", "random"))


class Device(Kind):
    """A torch device this process can compute on: ``cpu``, ``cuda``, ``cuda:N`` (N below the
    number of visible GPUs) or ``mps`` where available."""

    expected = "cpu, cuda, cuda:N or mps where available, or leave --device out (cuda if available, else cpu)"

    def parse(self, text: str) -> Any:
        import torch

        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise KindError("not a torch device") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise KindError(f"{device.type} devices cannot train or evaluate")
        return text

    def validate(self, value: Any) -> None:
        import torch

        device = torch.device(value)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise KindError("CUDA is not available here")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise KindError(f"{torch.cuda.device_count()} GPU(s) visible")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise KindError("MPS is not available here")


class AutoAugment(Kind):
    """A timm AutoAugment policy string, checked by letting timm build it."""

    expected = "a timm policy such as rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original or v0"

    def validate(self, value: Any) -> None:
        from timm.data import create_transform

        try:
            create_transform(32, is_training=True, auto_augment=value)
        except Exception as e:  # timm raises KeyError/AssertionError/ValueError for bad policies
            raise KindError(f"timm: {one_line(e) or type(e).__name__}") from None


# --------------------------------------------------------------------------- output files
class OutputFile(Kind):
    """A file this process will write: not a folder, in a folder where a file can be created
    (the nearest existing one, probed with a temporary file that is removed at once, so the
    check also holds for root and read-only mounts), with one of ``suffixes`` if given, and
    never an existing training checkpoint (an export or a post-hoc result must not replace
    the run it came from)."""

    def __init__(self, suffixes: Sequence[str] = (), *, what: str = "a file path") -> None:
        self.suffixes = tuple(suffixes)
        tail = f" ending in {', '.join(self.suffixes)}" if self.suffixes else ""
        self.expected = f"{what}{tail} in a writable folder, not a training checkpoint"

    def validate(self, value: Any) -> None:
        path = str(value)
        if not path:
            raise KindError("empty")
        if self.suffixes and not path.lower().endswith(self.suffixes):
            raise KindError("wrong file type")
        if os.path.isdir(path):
            raise KindError("a folder")
        if os.path.lexists(path) and not os.path.isfile(path):
            raise KindError("exists and is not a regular file")
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.lexists(folder):  # missing folders are created when the file is written
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise KindError(f"{folder} is not a folder")
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".emakit-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise KindError(f"cannot write in {folder}: {e.strerror or e}") from None
        if os.path.isfile(path) and is_training_checkpoint(path):
            raise KindError("an existing training checkpoint; write to another file")


def is_training_checkpoint(path: str) -> bool:
    """True for a torch file holding a training checkpoint: optimizer or scheduler state, or
    an epoch with weights and no ``posthoc`` entry (a post-hoc result may be replaced), or a
    pickle that asks to run code (another framework's full checkpoint). False for exports
    (bare state dicts, safetensors) and for other files (a results CSV, damaged bytes)."""
    if path.lower().endswith(".safetensors"):
        return False
    from emakit.checkpoint import UnsafeCheckpointError, load_checkpoint, safe_torch_load

    from .state import holds_training_state  # here: kinds stays light for --help (no torch)

    try:  # the keys only (memory-mapped, no checksum), so a damaged training checkpoint is still one
        ckpt = safe_torch_load(path, "cpu", mmap=True)
    except UnsafeCheckpointError:
        return True
    except Exception:
        try:  # not a zip-format torch file: read it whole, as before
            ckpt = load_checkpoint(path)
        except UnsafeCheckpointError:
            return True
        except Exception:
            return False
    return holds_training_state(ckpt)


# --------------------------------------------------------------------------- sigma_rel lists
def check_sigma_rels(values: Iterable[float], flag: str) -> list[float]:
    """``values`` as floats if each is a post-hoc EMA length: in (0, 1/sqrt(12)] (EDM2's range,
    ``emakit.posthoc.SIGMA_REL_MAX``) and no two equal in their first 6 decimals (snapshot file
    names keep 6); else ``UsageError`` naming ``flag``."""
    from emakit.posthoc import SIGMA_REL_MAX

    values = [float(v) for v in values]
    for value in values:
        if not (0.0 < value <= SIGMA_REL_MAX):
            raise UsageError(f"{flag} {value:g} is outside (0, {SIGMA_REL_MAX:.4f}]: "
                             "no power-function EMA has that length")
    if len({f"{v:.6f}" for v in values}) != len(values):
        raise UsageError(f"{flag} lists a value twice (values must differ in the first 6 decimals): "
                         f"{','.join(f'{v:g}' for v in values)}")
    return values


def parse_sigma_rels(text: str, flag: str) -> list[float]:
    """``"0.02,0.05"`` -> [0.02, 0.05], checked by :func:`check_sigma_rels`; a part that is not
    a number is a ``UsageError`` naming ``flag``."""
    values = []
    for part in str(text).split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise UsageError(f"{flag}: {part.strip()!r} is not a number (e.g. 0.02,0.05,0.1)") from None
    return check_sigma_rels(values, flag)


# --------------------------------------------------------------------------- the parser
class Parser(argparse.ArgumentParser):
    """argparse for emakit's CLIs: a bad command line raises ``UsageError`` (printed as one line,
    exit status 2) instead of printing the usage and calling ``sys.exit(2)``.

    ``see_help``: the message ends with ``(see PROG --help)`` (the ``emakit`` command's
    subcommands, whose usage is not obvious from one line)."""

    def __init__(self, *args: Any, see_help: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.see_help = see_help

    def error(self, message: str) -> NoReturn:
        """Raise ``UsageError(message)`` instead of exiting. argparse's line for a value given
        to an on/off flag (``--model-ema=1``: "ignored explicit argument '1'") is reworded to
        say what to give instead."""
        valued = re.fullmatch(r"argument (\S+): ignored explicit argument (.*)", message)
        if valued:
            flags = valued.group(1).split("/")
            message = (f"argument {valued.group(1)}: invalid value {valued.group(2)} (an on/off flag takes no "
                       f"value); give {' or '.join(flags)} alone")
        raise UsageError(f"{message} (see {self.prog} --help)" if self.see_help else message)


class CommaList:
    """argparse ``type`` for a comma-separated list, e.g. ``0.999,0.9998,0.9999``.

    Each item is converted with ``item`` and must be unique. With ``scalar_if_one`` a
    single item stays a scalar, so a one-value flag reads exactly as it did before lists
    (``args.model_ema_decay == 0.9998``). In a ``--config`` YAML file the value may be a
    scalar, a YAML list or the same comma-separated string (:meth:`from_yaml`).
    """

    def __init__(self, item: Callable[[Any], Any], what: str, *, scalar_if_one: bool = True,
                 hint: str = "") -> None:
        self.item = item
        self.what = what
        self.hint = hint  # what a valid item looks like, after "is not a <what>"
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
                raise argparse.ArgumentTypeError(f"{part!r} in {shown!r} is not a {self.what}{self.hint}") from None
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
                return self._convert(value, _clip(",".join(map(str, value))))
            if isinstance(value, str):
                return self(value)
            return self._convert([value], _clip(str(value)))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"config key {key!r}: {e}") from None


# --------------------------------------------------------------------------- key=value lists
def parse_kwargs(items: Iterable[Any] | Mapping[str, Any], flag: str) -> dict[str, Any]:
    """timm's ``--model-kwargs`` / ``--opt-kwargs`` value: ``key=value`` items (or a YAML
    mapping) -> a dict, each value read as a Python literal (``img_size=240``,
    ``betas=(0.9,0.99)``) and otherwise kept as text, as timm's ``utils.ParseKwargs`` reads
    it; ``UsageError`` for an item without ``=`` or a key that is not a name."""
    pairs = list(items.items()) if isinstance(items, Mapping) else []
    if not isinstance(items, Mapping):
        for item in items:
            if not item:
                continue
            key, sep, text = str(item).partition("=")
            if not sep:
                raise UsageError(f"{flag}: {_clip(str(item))!r} is not KEY=VALUE (e.g. {flag} img_size=240)")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = text
            pairs.append((key, value))
    for key, _ in pairs:
        if not str(key).isidentifier():
            raise UsageError(f"{flag}: key {_clip(str(key))!r} is not a keyword name (e.g. {flag} img_size=240)")
    return {str(k): v for k, v in pairs}


class Kwargs(argparse.Action):
    """argparse action of a ``key=value ...`` flag (:func:`parse_kwargs`); the dest holds a dict."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, parse_kwargs(values or [], option_string or self.dest))


# --------------------------------------------------------------------------- after parsing
def check_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 error: Callable[[str], Any]) -> None:
    """Check every kind-typed flag's final value (command line, ``--config`` or default):
    ``error("argument FLAG: invalid value ...")`` for the first one that breaks its rule."""
    for action in parser._actions:
        kind = action.type
        value = getattr(args, action.dest, None)
        if not isinstance(kind, Kind) or value is None:
            continue
        try:
            kind.check(value)
        except KindError as e:
            error(f"argument {flag_name(action)}: {e}")
