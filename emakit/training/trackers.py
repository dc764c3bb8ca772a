"""Where else a run's metrics go: wandb (``--log-wandb``, timm's flags) and TensorBoard
(``--log-tensorboard [DIR]``), on rank 0 only.

The trackers listen to the two lines the training loop already logs, as a
:class:`logging.Handler` on the ``emakit`` logger: the log-interval line of
:func:`.engine.train_one_epoch` (``extra={"track": "train_step"}``: train loss and lr at
the global optimizer step) and the epoch line of :func:`.evaluation.log_epoch`
(``extra={"track": "epoch", "metrics": row}``: the ``summary.csv`` row, raw and every EMA's
loss/top-1/top-5). Nothing else in the loop knows about them.

TensorBoard tags: ``train/loss`` and ``train/lr`` per step; ``top1/raw``, ``top1/ema``,
``top1/<name>`` (and ``top5/``, ``loss/``) per epoch, plus a Custom Scalars layout that draws
raw and every EMA on one chart per metric. A tracker whose package is missing stops the run
before anything is written (one line naming the ``pip install``); one that fails to start
or to write later is a one-line warning and the run goes on without it.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from . import one_line

__all__ = ["Trackers", "check_trackers", "start_trackers", "epoch_scalars"]

_log = logging.getLogger(__name__)
_METRIC = re.compile(r"^(?:(?P<name>\w+?)_)?eval_(?P<metric>top1|top5|loss)$")


def check_trackers(trackers: Any) -> None:
    """``UsageError`` (before anything is written) when a tracker flag needs a package that is missing."""
    from .sources import require

    if trackers.log_wandb:
        require("wandb", "--log-wandb")
    if trackers.log_tensorboard is not None:
        require("tensorboard", "--log-tensorboard")


def epoch_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """``{"top1/raw": .., "top1/ema": .., "loss/ema_2": ..}`` of a summary row: raw is
    ``raw_eval_*``, the first EMA ``ema_eval_*``, the others ``<name>_eval_*``; timm's
    ``eval_*`` (the weights that pick model_best, one of those) is left out."""
    out = {}
    for key, value in row.items():
        m = _METRIC.match(key)
        if m and m["name"] and value is not None:
            out[f"{m['metric']}/{m['name']}"] = float(value)
    return out


class Trackers(logging.Handler):
    """The started trackers (TensorBoard writer, wandb run) fed by the loop's log records."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.writer: Any = None
        self.wandb: Any = None
        self._layout_done = False

    # ------------------------------------------------------------ starting
    def start_tensorboard(self, folder: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=folder)
            _log.info("TensorBoard: tensorboard --logdir %s", folder)
        except Exception as e:  # any failure of an optional tracker is a warning, never a lost run
            _log.warning("TensorBoard did not start (%s); the run goes on without it", one_line(e)[:200])

    def start_wandb(self, settings: Any, output_dir: str, name: str) -> None:
        t = settings.trackers
        try:
            import wandb

            # as timm's train.py: its project (None: wandb's default), the run folder's name, the flags
            self.wandb = wandb.init(project=t.wandb_project, name=name, config=dict(settings.flags),
                                    tags=list(t.wandb_tags or ()) or None, dir=output_dir,
                                    id=t.wandb_resume_id or None, resume="must" if t.wandb_resume_id else None)
            _log.info("wandb: run %s in %s", getattr(self.wandb, "id", "?"), getattr(self.wandb, "dir", output_dir))
        except Exception as e:  # noqa: BLE001 (wandb raises its own errors, network and auth ones among them)
            _log.warning("wandb did not start (%s); the run goes on without it", one_line(e)[:200])
            self.wandb = None

    # ------------------------------------------------------------ records
    def emit(self, record: logging.LogRecord) -> None:
        kind = getattr(record, "track", None)
        if kind is None:
            return
        try:
            if kind == "train_step":
                epoch, done, per_epoch, loss, lr = record.args  # type: ignore[misc]
                self.train_step(epoch * per_epoch + done, float(loss), float(lr))
            elif kind == "epoch":
                self.epoch(int(record.metrics["epoch"]), record.metrics)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001
            _log.removeHandler(self)  # never recurse into ourselves
            logging.getLogger("emakit").removeHandler(self)
            _log.warning("a tracker failed (%s); the run goes on without trackers", one_line(e)[:200])

    def train_step(self, step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
        if self.wandb is not None:
            self.wandb.log({"train/loss": loss, "train/lr": lr, "train/step": step})

    def epoch(self, epoch: int, row: Mapping[str, Any]) -> None:
        scalars = epoch_scalars(row)
        if self.writer is not None:
            if not self._layout_done:
                self._layout(scalars)
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, epoch)
            self.writer.add_scalar("train/epoch_loss", float(row["train_loss"]), epoch)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({"epoch": epoch, **{k: v for k, v in row.items() if isinstance(v, (int, float))},
                            **scalars})

    def _layout(self, scalars: Mapping[str, float]) -> None:
        """One chart per metric with raw and every EMA (TensorBoard's Custom Scalars tab)."""
        charts = {metric: ["Multiline", [rf"{metric}/.*"]] for metric in ("top1", "top5", "loss")}
        self.writer.add_custom_scalars({"raw vs EMA": charts})
        self._layout_done = True

    def close(self) -> None:
        """Detach and close every tracker (errors are warnings)."""
        logging.getLogger("emakit").removeHandler(self)
        for name, closer in (("TensorBoard", lambda: self.writer and self.writer.close()),
                             ("wandb", lambda: self.wandb and self.wandb.finish())):
            try:
                closer()
            except Exception as e:  # noqa: BLE001
                _log.warning("closing %s failed: %s", name, one_line(e)[:200])
        super().close()


def start_trackers(settings: Any, output_dir: str | None, is_main: bool) -> Trackers | None:
    """Rank 0's trackers for this run (None when none is asked for, or on another rank);
    attached to the ``emakit`` logger until :meth:`Trackers.close`."""
    t = settings.trackers
    if not is_main or not output_dir or (not t.log_wandb and t.log_tensorboard is None):
        return None
    trackers = Trackers()
    if t.log_tensorboard is not None:
        trackers.start_tensorboard(t.log_tensorboard or os.path.join(output_dir, "tensorboard"))
    if t.log_wandb:
        trackers.start_wandb(settings, output_dir, os.path.basename(os.path.normpath(output_dir)))
    logging.getLogger("emakit").addHandler(trackers)
    return trackers
