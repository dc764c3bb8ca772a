"""The ``emakit`` command: export weights, post-hoc EMA, plots.

    emakit export output/<run>/last.pth.tar --weights ema -o model_ema.safetensors
    emakit posthoc output/<run>/posthoc --sigma-rel 0.08 -o ema_s008.safetensors --checkpoint output/<run>/last.pth.tar
    emakit posthoc output/<run>/posthoc --sigma-rel 0.02,0.05,0.08,0.15 --checkpoint output/<run>/last.pth.tar \\
        [--data DIR] [-o best.pth.tar] [-- validate.py flags]        # sweep: evaluate each, keep the best
    emakit posthoc --equivalent --decay 0.9998 --step 20000          # -> sigma_rel and half-life
    emakit posthoc --equivalent --sigma-rel 0.05 --step 20000        # -> decay and half-life
    emakit plot output/<run>/summary.csv                            # -> output/<run>/summary.png

Also ``python -m emakit`` (``emakit/__main__.py``). Exit status: 0 done, 2 bad input (one
line on stderr). The parser turns the command line into a frozen :class:`ExportSettings`,
:class:`PosthocSettings` or :class:`PlotSettings`; the commands below it take those. The
heavy modules (timm, safetensors, Pillow, the validation work) are imported inside the
commands, so ``python -m emakit posthoc --equivalent ...`` needs torch alone.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NoReturn

from . import UsageError, print_error
from .kinds import POSITIVE_INT, Number, OutputFile, Parser, check_parsed, parse_sigma_rels
from .options import MODEL, NUM_CLASSES, Flag, add_flags, from_flags

# Post-hoc weights: safetensors, or a checkpoint with them as state_dict_ema (validate.py's --posthoc-save).
_POSTHOC_SUFFIXES = (".safetensors", ".pth.tar", ".pth", ".pt")

__all__ = ["main", "console_main", "build_parser", "parse_command", "run_command", "equivalent_ema", "ExportSettings",
           "PosthocSettings", "PlotSettings"]


@dataclass(frozen=True)
class ExportSettings:
    """``emakit export``: one weight set of ``checkpoint`` to ``output``."""

    HELP: ClassVar[str] = "write one weight set of a checkpoint alone (safetensors or .pth)"
    DESCRIPTION: ClassVar[str] = ("Write one weight set of a checkpoint, unprefixed and atomically. A .safetensors "
                                  "file loads with timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay="
                                  "dict(file=FILE, num_classes=N), num_classes=N).")
    checkpoint: str = Flag("checkpoint", metavar="CKPT", help="checkpoint file (ours, timm, SuperGradients, "
                           "torchvision) or a train.py --checkpoint-format dcp folder (last.dcp)")(None)
    output: str = Flag("-o", "--output", required=True, kind=OutputFile(), metavar="FILE",
                       help="output: .safetensors, or any other name for a torch.save'd bare state dict; never the "
                            "input checkpoint or another training checkpoint")(None)
    weights: str = Flag("--weights", metavar="SET", help="raw, ema or ema:N")("ema")
    model: str | None = MODEL(None, help="timm model name recorded in the metadata", note="= the checkpoint's")
    num_classes: int | None = NUM_CLASSES(None, help="class count recorded in the metadata", note="= the checkpoint's")


@dataclass(frozen=True)
class PosthocSettings:
    """``emakit posthoc``: reconstruct, sweep (``validate_argv``: the flags after ``--``) or convert."""

    HELP: ClassVar[str] = "post-hoc EMA: reconstruct, sweep, or convert sigma_rel/decay/half-life"
    DESCRIPTION: ClassVar[str] = ("Reconstruct the EMA of any length from post-hoc snapshots (EDM2). One --sigma-rel "
                                  "with -o: write those weights. Several (or --evaluate): run validate.py's sweep; "
                                  "validate.py flags go after --, e.g. -- -b 128 --img-size 64. --equivalent: "
                                  "convert between sigma_rel, decay and half-life at --step.")
    snapshot_dir: str | None = Flag("snapshot_dir", nargs="?", metavar="DIR", help="snapshot folder")(
        None, note="= <--checkpoint folder>/posthoc")
    sigma_rel: str | None = Flag("--sigma-rel", metavar="S[,S...]",
                                 help="relative EMA length(s), e.g. 0.05 or 0.02,0.05,0.1")(None)
    step: int | None = Flag("--step", kind=POSITIVE_INT, metavar="N",
                            help="reconstruct at this snapshot step; with --equivalent: the update count the "
                                 "conversion is for")(None, note="= the last snapshot step")
    output: str | None = Flag("-o", "--output", kind=OutputFile(_POSTHOC_SUFFIXES), metavar="FILE",
                              help="write the (best) weights: .safetensors, or .pth.tar/.pth/.pt checkpoint with them "
                                   "as state_dict_ema; never over a training checkpoint")(None)
    checkpoint: str | None = Flag("--checkpoint", metavar="CKPT",
                                  help="the run's checkpoint: model name, args and raw weights for the output")(None)
    model: str | None = MODEL(None, note="= the checkpoint's")
    num_classes: int | None = NUM_CLASSES(None, help="class count", note="= the checkpoint's or the classifier shape")
    data: str | None = Flag("--data", metavar="DIR", help="sweep data, validate.py's DIR")(
        None, note="= embedded digits")
    evaluate: bool = Flag("--evaluate", action="store_true", help="evaluate even a single --sigma-rel")(False)
    equivalent: bool = Flag("--equivalent", action="store_true",
                            help="only convert: give --step and one of --decay, --sigma-rel, --half-life")(False)
    decay: float | None = Flag("--decay", kind=Number(0, 1, lo_open=True, hi_open=True), metavar="D",
                               help="classic per-update decay in (0, 1)")(None)
    half_life: str | None = Flag("--half-life", metavar="H", help="half-life in updates, e.g. 3466 or 3466ba")(None)
    validate_argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlotSettings:
    """``emakit plot``: the PNG of ``summary_csv`` (``output``: None = summary.png beside it)."""

    HELP: ClassVar[str] = "PNG of raw vs EMA top-1 and loss per epoch from summary.csv"
    DESCRIPTION: ClassVar[str] = "Plot top-1 and loss per epoch of the raw weights and every EMA."
    summary_csv: str = Flag("summary_csv", metavar="CSV", help="output/<run>/summary.csv")(None)
    output: str | None = Flag("-o", "--output", kind=OutputFile((".png",)), metavar="FILE.png", help="image path")(
        None, note="= summary.png beside the CSV")


@dataclass(frozen=True)
class PackSettings:
    """``emakit pack``: an ImageFolder into WebDataset shards (emakit/training/sources.py)."""

    HELP: ClassVar[str] = "write an ImageFolder as WebDataset tar shards with an _info.json (wds/, wids/)"
    DESCRIPTION: ClassVar[str] = ("Write each split of an ImageFolder (train/, val/ or validation/) as WebDataset "
                                  "shards OUT/<split>-NNNNNN.tar (image bytes unchanged + .cls label) and "
                                  "OUT/_info.json, read by timm's wds reader and train.py --dataset wds/ or wids/.")
    src: str = Flag("src", metavar="IMAGEFOLDER", help="ImageFolder root")(None)
    out: str = Flag("out", metavar="OUT", help="new folder for the shards")(None)
    shard_size: str = Flag("--shard-size", metavar="SIZE", help="bytes per shard: 512MiB, 1GB, ...")("512MiB")


COMMANDS = {"export": ExportSettings, "posthoc": PosthocSettings, "plot": PlotSettings, "pack": PackSettings}


def build_parser() -> argparse.ArgumentParser:
    """The ``emakit`` parser with its ``export``, ``posthoc`` and ``plot`` subcommands."""
    parser = Parser(prog="emakit", description="emakit tools: export weights, post-hoc EMA, plots.", see_help=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=functools.partial(Parser, see_help=True))
    for name, settings in COMMANDS.items():
        add_flags(sub.add_parser(name, help=settings.HELP, description=settings.DESCRIPTION), settings,
                  title=f"{name} flags")
    return parser


# --------------------------------------------------------------------------- export
def _cmd_export(s: ExportSettings) -> list[str]:
    from .state import ARGS
    from .validation import (export_weights, read_checkpoint, resolve_arch, resolve_num_classes, select_weights,
                             timm_load_hint)

    if os.path.exists(s.output) and os.path.exists(s.checkpoint) and os.path.samefile(s.output, s.checkpoint):
        raise UsageError(f"-o {s.output} is the checkpoint being exported: an export never replaces its "
                         "source; give another file name")
    ckpt = read_checkpoint(s.checkpoint)
    state_dict, label = select_weights(ckpt, s.weights, s.checkpoint)
    arch = resolve_arch(ckpt, s.checkpoint, s.model)
    num_classes = resolve_num_classes(ckpt, state_dict, arch, s.checkpoint, s.num_classes)
    export_weights(state_dict, s.output, arch=arch, num_classes=num_classes, weights=label,
                   source=s.checkpoint, train_args=ckpt.get(ARGS) if isinstance(ckpt.get(ARGS), dict) else None)
    lines = [f"wrote {s.output}: {label} weights of {s.checkpoint} ({arch}, {num_classes} classes, "
             f"{len(state_dict)} tensors)"]
    if s.output.lower().endswith(".safetensors"):
        lines.append(f"load it with: {timm_load_hint(arch, s.output, num_classes)}")
    return lines


# --------------------------------------------------------------------------- posthoc
def _half_life_updates(text: str) -> float:
    """``3466`` or ``3466ba`` -> 3466.0 updates; epochs/images need the trainer's context."""
    with contextlib.suppress(ValueError):
        return float(text)
    from emakit.schedules import parse_half_life

    try:
        parsed = parse_half_life(text)
    except ValueError as e:
        raise UsageError(f"--half-life {text}: {e}") from None
    if parsed.unit != "ba":
        raise UsageError(f"--half-life {text}: give it in updates (e.g. 3466 or 3466ba); "
                         "epochs and images depend on the run's batch size")
    return parsed.value


def equivalent_ema(step: int, *, decay: float | None = None, sigma_rel: float | None = None,
                   half_life: float | None = None) -> dict[str, float]:
    """The same EMA length as decay, sigma_rel and half-life (updates) at update ``step``.

    sigma_rel = sqrt(decay) / ((1 - decay) * step) (equal standard deviation of the two
    averaging profiles, EDM2's definition of length); half_life = ln 0.5 / ln decay.
    Exactly one of ``decay``, ``sigma_rel``, ``half_life`` is given.
    """
    from emakit import posthoc

    if sum(v is not None for v in (decay, sigma_rel, half_life)) != 1:
        raise UsageError("--equivalent needs exactly one of --decay, --sigma-rel, --half-life")
    try:
        if half_life is not None:
            decay = posthoc.half_life_to_decay(half_life)
        if decay is not None:
            sigma_rel = posthoc.decay_to_sigma_rel(decay, step)
        else:
            decay = posthoc.sigma_rel_to_decay(sigma_rel, step)
        return {"step": step, "decay": decay, "sigma_rel": sigma_rel,
                "half_life": posthoc.decay_to_half_life(decay)}
    except ValueError as e:
        raise UsageError(f"--equivalent: {e}") from None


def _equivalent_lines(s: PosthocSettings) -> list[str]:
    from emakit.posthoc import SIGMA_REL_MAX

    if s.validate_argv:
        raise UsageError(f"emakit posthoc --equivalent: unrecognized arguments: {' '.join(s.validate_argv)}")
    if s.step is None:
        raise UsageError("--equivalent needs --step N: the number of EMA updates the conversion is for")
    sigma = None
    if s.sigma_rel is not None:
        try:
            sigma = float(s.sigma_rel)
        except ValueError:
            raise UsageError(f"--sigma-rel {s.sigma_rel}: give one number with --equivalent") from None
    half = _half_life_updates(s.half_life) if s.half_life is not None else None
    eq = equivalent_ema(s.step, decay=s.decay, sigma_rel=sigma, half_life=half)
    lines = [f"at step {eq['step']}: decay {eq['decay']:.8g} = sigma_rel {eq['sigma_rel']:.6g} "
             f"= half-life {eq['half_life']:.6g} updates"]
    if eq["sigma_rel"] > SIGMA_REL_MAX:
        lines.append(f"note: sigma_rel > {SIGMA_REL_MAX:.4f}: no power-function EMA is this long, "
                     "post-hoc reconstruction cannot produce it")
    if math.log10(max(eq["decay"], 1e-300)) * eq["step"] > -2:  # decay**step > 1%
        lines.append(f"note: decay**step = {eq['decay'] ** eq['step']:.3g}: the EMA still remembers its start "
                     "at this step, so its real length is shorter than sigma_rel says")
    lines.append(json.dumps(eq))
    return lines


def _posthoc_single(s: PosthocSettings, sigma_rel: float) -> list[str]:
    from emakit.checkpoint import load_checkpoint

    from .validation import (reconstruct_profiles, resolve_arch, resolve_num_classes, resolve_posthoc_dir,
                             save_posthoc_weights)

    snapshot_dir = resolve_posthoc_dir(s.snapshot_dir, s.checkpoint)
    reference = load_checkpoint(s.checkpoint) if s.checkpoint else {}
    (state_dict,), step = reconstruct_profiles(snapshot_dir, [sigma_rel], s.step)
    arch = num_classes = None
    if reference or s.model:
        arch = resolve_arch(reference, s.checkpoint or snapshot_dir, s.model)
        num_classes = resolve_num_classes(reference, state_dict, arch, s.checkpoint or snapshot_dir, s.num_classes)
    save_posthoc_weights(s.output, state_dict, sigma_rel=sigma_rel, step=step, arch=arch, num_classes=num_classes,
                         snapshot_dir=snapshot_dir, reference=reference or None, reference_path=s.checkpoint)
    eq = equivalent_ema(step, sigma_rel=sigma_rel)
    return [f"wrote {s.output}: post-hoc EMA sigma_rel {sigma_rel:g} at step {step} "
            f"(~ decay {eq['decay']:.6g}, half-life {eq['half_life']:.1f} updates)"]


def _posthoc_sweep_argv(s: PosthocSettings) -> list[str]:
    """validate.py's command line for this sweep: our flags in its names, then the ones after ``--``."""
    argv = ([s.data] if s.data else []) + ["--posthoc-sigma-rel", str(s.sigma_rel)]
    for flag, value in (("--posthoc-dir", s.snapshot_dir), ("--posthoc-step", s.step),
                        ("--posthoc-save", s.output), ("--checkpoint", s.checkpoint),
                        ("--model", s.model), ("--num-classes", s.num_classes)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(s.validate_argv)


def _cmd_posthoc(s: PosthocSettings) -> list[str]:
    if s.equivalent:
        return _equivalent_lines(s)
    if s.decay is not None or s.half_life is not None:
        raise UsageError("--decay and --half-life are conversions: add --equivalent")
    if not s.sigma_rel:
        raise UsageError("emakit posthoc needs --sigma-rel (or --equivalent)")
    sigma_rels = parse_sigma_rels(s.sigma_rel, "--sigma-rel")
    if len(sigma_rels) > 1 or s.evaluate or s.validate_argv:
        return _run_validate(_posthoc_sweep_argv(s))
    if not s.output:
        raise UsageError("one --sigma-rel without --evaluate writes weights: add -o FILE (or --evaluate)")
    if not s.snapshot_dir and not s.checkpoint:
        raise UsageError("give the snapshot folder DIR (or --checkpoint, whose folder holds posthoc/)")
    return _posthoc_single(s, sigma_rels[0])


def _run_validate(argv: list[str]) -> list[str]:
    from .distributed import init_distributed, shutdown_distributed
    from .validate_config import parse_args
    from .validation import report_lines, run

    settings = parse_args(argv, prog="emakit posthoc")
    dist = init_distributed(settings.runtime.device)
    try:
        report = run(settings, dist)
    finally:
        shutdown_distributed(dist)
    return report_lines(report) if dist.is_main else []


# --------------------------------------------------------------------------- plot
def _cmd_plot(s: PlotSettings) -> list[str]:
    from .outputs import writing_output
    from .plots import plot_summary

    if not os.path.isfile(s.summary_csv):
        raise UsageError(f"{s.summary_csv}: no such file (give output/<run>/summary.csv)")
    try:
        with writing_output(s.output or os.path.join(os.path.dirname(s.summary_csv), "summary.png")):
            out = plot_summary(s.summary_csv, s.output)
    except (ValueError, KeyError) as e:
        raise UsageError(f"{s.summary_csv}: not a training summary ({e})") from None
    return [f"wrote {out}"]


# --------------------------------------------------------------------------- main
def parse_command(argv: Sequence[str]) -> ExportSettings | PosthocSettings | PlotSettings:
    """The settings of one ``emakit`` command line; ``UsageError`` for a bad one.

    Everything after ``--`` goes to validate.py (posthoc sweeps); it is split off before
    parsing, so a value such as ``-b 128`` is never taken for the snapshot folder."""
    argv = list(argv)
    extra = tuple(argv[argv.index("--") + 1:]) if "--" in argv else ()
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        raise UsageError("give a command: export, posthoc, plot or pack (see emakit --help)")
    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    check_parsed(sub, args, sub.error)
    if args.command == "posthoc":
        return from_flags(PosthocSettings, args, validate_argv=extra)
    if extra:
        raise UsageError(f"emakit {args.command} takes no arguments after --: {' '.join(extra)}")
    return from_flags(COMMANDS[args.command], args)


def run_command(settings: ExportSettings | PosthocSettings | PlotSettings | PackSettings) -> list[str]:
    """Run one parsed command; returns the lines to print."""
    command = {ExportSettings: _cmd_export, PosthocSettings: _cmd_posthoc, PlotSettings: _cmd_plot,
               PackSettings: _cmd_pack}[type(settings)]
    return command(settings)


def _cmd_pack(settings: PackSettings) -> list[str]:
    from .sources import pack_image_folder, shard_bytes

    try:
        size = shard_bytes(settings.shard_size)
    except ValueError as e:
        raise UsageError(f"--shard-size: {e}") from None
    return pack_image_folder(settings.src, settings.out, size)


def console_main() -> NoReturn:
    """The ``emakit`` console script and ``python -m emakit``: exits with :func:`main`'s status
    (:func:`~.lifecycle.end_process`)."""
    from .lifecycle import end_process

    end_process(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``emakit`` command; returns the exit status (2 with one line on stderr on bad input)."""
    from emakit.checkpoint import CheckpointError

    from .logs import configure_logging

    logs = configure_logging()
    try:
        for line in run_command(parse_command(sys.argv[1:] if argv is None else argv)):
            print(line)
        return 0
    except (UsageError, CheckpointError) as e:
        print_error("emakit", e)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    finally:
        logs.close()
