"""What a run leaves on disk and prints: the run folder (claimed by :mod:`.rundir`), ``args.yaml``,
``summary.csv`` (written and read back here only; :mod:`.plots` draws ``summary.png`` from it),
the post-hoc report and the result line.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from emakit.checkpoint import is_disk_full, write_text_atomic

from . import UsageError, one_line
from .averages import PosthocTracker, ema_label, ema_selector, posthoc_sweep_command
from .config import args_to_yaml
from .rundir import MARKER_NAME, RunLock, claim_run_folder, folder_write_error, write_marker

__all__ = ["SUMMARY_COLUMNS", "summary_columns", "read_summary", "write_summary", "choose_output_dir",
           "prepare_output_dir", "FitResult", "best_in_column", "best_of_emas", "fit_result", "describe_result",
           "writing_output", "console_logs_above_progress_bars", "report_posthoc", "log_posthoc_folder"]

_log = logging.getLogger(__name__)

# timm's columns first, with timm's meaning: eval_* are the weights that pick model_best (the
# EMA under --model-ema, as timm's train.py writes them); the raw weights' and each EMA's beside.
SUMMARY_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "raw_eval_loss", "raw_eval_top1",
                   "raw_eval_top5", "ema_eval_loss", "ema_eval_top1", "ema_eval_top5", "lr"]
_EVAL_KEYS = ("loss", "top1", "top5")


# --------------------------------------------------------------------------- output files
WRITE_FIX = "free space on that disk or write to another folder, then run the command again"


@contextlib.contextmanager
def writing_output(path: str) -> Iterator[None]:
    """Around the write of the output file ``path`` of a command (``emakit export -o``,
    ``validate.py --export-ema`` / ``--results-file``, ``emakit plot``, post-hoc weights): an
    ``OSError`` (a full disk, a read-only folder) becomes one :class:`UsageError` line naming
    the file, what happened and the fix (exit 2). The writes inside are atomic
    (``emakit.checkpoint.atomic_write``), so no partial or temporary file is left."""
    try:
        yield
    except OSError as e:
        why = "no space left on device" if is_disk_full(e) else (e.strerror or one_line(e))
        raise UsageError(f"could not write {path}: {why}; {WRITE_FIX}") from None


# --------------------------------------------------------------------------- run folder
def choose_output_dir(*, output: str, experiment: str, resume: str, model_name: str, img_size: int,
                      resumed_by_emakit: bool = False) -> tuple[str, RunLock]:
    """The run folder and its held lock, by the rules of :mod:`emakit.training.rundir`: the
    wanted folder is ``<output>/<experiment>``, else the resumed checkpoint's folder, else
    timm's ``<output>/YYYYMMDD-HHMMSS-<model>-<img size>`` (the only one not named by the user).
    A resume continues in its checkpoint's folder when that folder is ours; otherwise a folder
    that holds a run is never written and the first free ``-1``, ``-2``... suffix is used."""
    if experiment or resume:
        wanted = os.path.join(output, experiment) if experiment else os.path.dirname(os.path.abspath(resume))
    else:
        from timm.models import safe_model_name

        wanted = os.path.join(output, f"{datetime.now():%Y%m%d-%H%M%S}-{safe_model_name(model_name)}-{img_size}")
    return claim_run_folder(wanted, resume=resume or None, resumed_by_emakit=resumed_by_emakit,
                            named=bool(experiment or resume))


def prepare_output_dir(path: str, flags: Mapping[str, Any]) -> None:
    """Create the run folder, mark it as ours and write ``args.yaml`` (the flags with their
    resolved values); OSError (a full disk) -> UsageError, and a marker written by this call is
    removed again (a failed run leaves nothing)."""
    marked = False
    try:
        os.makedirs(path, exist_ok=True)
        marked = write_marker(path)
        write_text_atomic(os.path.join(path, "args.yaml"), args_to_yaml(flags))
    except OSError as e:
        if marked:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(path, MARKER_NAME))
        raise folder_write_error(path, e) from None


# --------------------------------------------------------------------------- summary.csv
def summary_columns(num_emas: int) -> list[str]:
    """``summary.csv`` columns: ``SUMMARY_COLUMNS`` for no or one EMA; with several, each
    extra EMA's ``ema<i>_eval_{loss,top1,top5}`` after the first's, then ``ema_best`` (the
    ``--weights`` selector of the epoch's best EMA by ``--eval-metric``) and ``lr``."""
    if num_emas <= 1:
        return list(SUMMARY_COLUMNS)
    extra = [f"{ema_label(i)}_eval_{k}" for i in range(1, num_emas) for k in _EVAL_KEYS]
    return SUMMARY_COLUMNS[:-1] + extra + ["ema_best", "lr"]


def read_summary(path: str | os.PathLike, before_epoch: int | None = None) -> list[dict[str, str]]:
    """The rows of a ``summary.csv`` (cells as text), those of epochs < ``before_epoch`` when
    given (a resumed run keeps the epochs it continues from); [] without the file."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if before_epoch is None:
        return rows
    return [row for row in rows if row.get("epoch", "").isdigit() and int(row["epoch"]) < before_epoch]


def write_summary(path: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Rewrite ``summary.csv`` (atomically) with ``columns`` (default ``SUMMARY_COLUMNS``);
    empty cells for a missing EMA."""
    columns = columns or SUMMARY_COLUMNS
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in columns} for row in rows)
    write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- result
@dataclass
class FitResult:
    """What a finished run reports: its folder and the best raw / (first) EMA epochs, and
    with several EMAs the best of all of them with its ``--weights`` selector."""

    output_dir: str | None
    epochs_run: int
    best_raw: tuple[float, int] | None
    best_ema: tuple[float, int] | None
    eval_metric: str
    best_any_ema: tuple[float, int, str] | None = None


def best_in_column(rows: list[dict[str, Any]], column: str, lower_is_better: bool) -> tuple[float, int] | None:
    """(best value, its epoch) of ``column`` over summary rows; ties go to the earlier epoch.
    Non-finite values (a diverged evaluation) never count."""
    scored = [(float(r[column]), int(r["epoch"])) for r in rows if r.get(column) not in (None, "")]
    sign = 1.0 if lower_is_better else -1.0
    return min((s for s in scored if math.isfinite(s[0])), key=lambda s: (sign * s[0], s[1]), default=None)


def best_of_emas(rows: list[dict[str, Any]], num_emas: int, eval_metric: str) -> tuple[float, int, str] | None:
    """(value, epoch, ``--weights`` selector) of the best EMA over all epochs; None for < 2 EMAs."""
    if num_emas < 2:
        return None
    lower = eval_metric == "loss"
    found = [(*best, ema_selector(i)) for i in range(num_emas)
             if (best := best_in_column(rows, f"{ema_label(i)}_eval_{eval_metric}", lower)) is not None]
    sign = 1.0 if lower else -1.0
    return min(found, key=lambda b: (sign * b[0], b[1]), default=None)


def fit_result(output_dir: str | None, epochs_run: int, rows: list[dict[str, Any]], num_emas: int,
               eval_metric: str) -> FitResult:
    """The :class:`FitResult` of a run's summary rows."""
    lower = eval_metric == "loss"
    raw = f"raw_eval_{eval_metric}" if rows and f"raw_eval_{eval_metric}" in rows[0] else f"eval_{eval_metric}"
    return FitResult(output_dir, epochs_run, best_in_column(rows, raw, lower),
                     best_in_column(rows, f"ema_eval_{eval_metric}", lower), eval_metric,
                     best_of_emas(rows, num_emas, eval_metric))


def describe_result(result: FitResult) -> str:
    """One line: best raw and EMA metric with their epochs, and the output folder."""
    def fmt(best: tuple[float, int] | None) -> str:
        return "n/a" if best is None else f"{best[0]:.2f} (epoch {best[1]})"

    best_any = "" if result.best_any_ema is None else (
        f"; best of all EMAs: {result.best_any_ema[2]} {result.best_any_ema[0]:.2f} (epoch {result.best_any_ema[1]}, "
        f"validate.py --weights {result.best_any_ema[2]})")
    return (f"best raw {result.eval_metric} {fmt(result.best_raw)}; best EMA {result.eval_metric} "
            f"{fmt(result.best_ema)}{best_any}; outputs in {result.output_dir}")


# --------------------------------------------------------------------------- console
def console_logs_above_progress_bars(enabled: bool):
    """Route console log lines through tqdm.write while bars may be shown, so they do not
    land in the middle of a bar (a context manager; a no-op when off or not a terminal)."""
    if not enabled or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[logging.getLogger("emakit")])


# --------------------------------------------------------------------------- post-hoc EMA
def log_posthoc_folder(posthoc: PosthocTracker, folder: str) -> None:
    """Bind the snapshot folder (pruning snapshots newer than a resumed step) and log the
    projected disk footprint."""
    try:
        posthoc.open_folder(folder)
    except OSError as e:
        raise UsageError(f"cannot write post-hoc snapshots to {folder}: {e.strerror or e}") from None
    sigmas = ", ".join(f"{s:g}" for s in posthoc.power.sigma_rels)
    _log.info("post-hoc EMA: sigma_rel %s, accumulated in float32 (%.1f MiB in memory%s); a snapshot every %d "
              "optimizer step(s) in %s into %s; projected footprint %s; %s", sigmas, posthoc.memory_bytes() / 2**20,
              " per process, its shards; snapshots gathered to rank 0" if posthoc.sharded else "",
              posthoc.writer.every, posthoc.snapshot_dtype, folder, posthoc.projected_footprint(),
              posthoc.describe_budget())


def report_posthoc(posthoc: PosthocTracker, data: str | None, last_checkpoint: str) -> None:
    """Final snapshot, the footprint on disk, and the command that sweeps EMA lengths."""
    posthoc.finish()
    steps, used = posthoc.stored_steps(), posthoc.disk_usage()
    _log.info("post-hoc EMA: %d snapshot steps x %d profiles in %s: %.1f MiB on disk (%d bytes, %.2fx the "
              "model's float32 bytes; projected %s; %s)", len(steps), len(posthoc.power.sigma_rels),
              posthoc.writer.folder, used / 2**20, used, used / posthoc.model_bytes, posthoc.projected_footprint(),
              posthoc.describe_budget())
    if posthoc.budget_bytes is not None and used > posthoc.budget_bytes:
        _log.warning("post-hoc EMA: the snapshots take %d bytes, more than the budget of %d bytes",
                     used, posthoc.budget_bytes)
    _log.info("choose the EMA length now: %s", posthoc_sweep_command(data, last_checkpoint))
