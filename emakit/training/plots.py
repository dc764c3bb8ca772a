"""PNG plots of a run: raw vs EMA top-1 and loss per epoch, and post-hoc EMA sweeps.

Drawn with matplotlib's Agg canvas on a bare :class:`~matplotlib.figure.Figure` (no pyplot,
so no global figure state and no GUI backend). matplotlib is imported inside the plotting
functions only: importing this module, ``train.py --help`` and a run that never plots do
not pay for it. Colours are matplotlib's default cycle (tab10), the train loss is grey.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from emakit.checkpoint import atomic_write

from . import one_line
from .outputs import read_summary

__all__ = ["plot_summary", "plot_summary_quietly", "plot_sweep", "plot_sweeps", "PALETTE", "GREY"]

_log = logging.getLogger(__name__)

# matplotlib's default colour cycle ("tab10"): series i gets PALETTE[i % 10].
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
GREY = "#808080"
_DPI = 100


def _finite(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """The points of a series with both coordinates finite (a missing value is left out and
    its neighbours joined)."""
    points = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    return [x for x, _ in points], [y for _, y in points]


def _figure(size: tuple[int, int], panels: int):
    """A ``size`` (pixels) figure on the Agg canvas with ``panels`` axes side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / _DPI, size[1] / _DPI), dpi=_DPI, layout="tight")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _save(fig, out: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``out``, atomically (a crash never leaves a truncated file)."""
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    return Path(out)


def _read_columns(path: str | os.PathLike) -> dict[str, list[float]]:
    """``summary.csv`` as columns of floats (NaN for an empty or non-numeric cell)."""
    rows = read_summary(path)
    if not rows:
        raise ValueError(f"{path} has no rows; train at least one epoch first")
    columns: dict[str, list[float]] = {k: [] for k in rows[0]}
    for row in rows:
        for k, v in row.items():
            try:
                columns[k].append(float(v))
            except (TypeError, ValueError):
                columns[k].append(float("nan"))
    return columns


def _series(columns: dict[str, list[float]], metric: str) -> list[tuple[str, str]]:
    """(label, column) pairs for the raw weights and every EMA column of ``metric``."""
    raw = next((c for c in (f"raw_eval_{metric}", f"eval_{metric}") if c in columns), None)  # timm's: eval_*
    pairs = [("raw", raw)] if raw else []
    for name in columns:
        if name.endswith(f"eval_{metric}") and name.startswith("ema"):
            pairs.append((name[: -len(f"_eval_{metric}")], name))
    return pairs


def plot_summary(summary_csv: str | os.PathLike, out_png: str | os.PathLike | None = None) -> Path:
    """Plot top-1 and loss per epoch for the raw weights and each EMA from ``summary.csv``.

    Writes ``out_png`` (default: ``summary.png`` beside the CSV, 1000 x 400 px) and returns
    its path. Series with no values (a run without an EMA) are left out.
    """
    from matplotlib.ticker import MaxNLocator

    columns = _read_columns(summary_csv)
    out = Path(out_png) if out_png else Path(summary_csv).with_name("summary.png")
    epochs = columns["epoch"]
    fig, axes = _figure((1000, 400), 2)
    for ax, (metric, title) in zip(axes, (("top1", "top-1 (%)"), ("loss", "eval loss"))):
        for i, (label, col) in enumerate(_series(columns, metric)):
            xs, ys = _finite(epochs, columns[col])
            if xs:
                ax.plot(xs, ys, "o-", color=PALETTE[i % len(PALETTE)], label=label, markersize=5)
        if metric == "loss" and "train_loss" in columns:
            xs, ys = _finite(epochs, columns["train_loss"])
            if xs:
                ax.plot(xs, ys, "--", color=GREY, label="train")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _finish(ax)
    return _save(fig, out)


def _finish(ax) -> None:
    """A light grid under the lines, and a legend where it covers the fewest points."""
    ax.grid(True, color="#e5e5e5")
    ax.set_axisbelow(True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def plot_summary_quietly(output_dir: str) -> None:
    """``summary.png`` beside ``summary.csv``. A plot is a convenience: any failure is a
    warning, never a failed run."""
    path = os.path.join(output_dir, "summary.csv")
    if not os.path.isfile(path):
        return
    try:
        png = plot_summary(path)
    except Exception as e:  # noqa: BLE001 - a bad row, a font, a full disk: a warning only
        _log.warning("could not plot %s: %s", path, one_line(e)[:300])
        return
    _log.info("plot: %s", png)


def plot_sweep(sigma_rels: Sequence[float], top1: Sequence[float], out_png: str | os.PathLike,
               *, best_index: int | None = None, title: str = "post-hoc EMA sweep") -> Path:
    """Plot top-1 against EMA length (sigma_rel), circling the best point."""
    return plot_sweeps([("sweep", sigma_rels, top1, best_index)], out_png, title=title)


def plot_sweeps(sweeps: Sequence[tuple[str, Sequence[float], Sequence[float], int | None]],
                out_png: str | os.PathLike, *, title: str = "post-hoc EMA sweeps") -> Path:
    """Plot every sweep's top-1 against EMA length (sigma_rel), one line per sweep labelled
    ``label``, each sweep's best point circled (600 x 400 px).

    ``sweeps``: ``(label, sigma_rels, top1, best_index)`` per sweep, oldest first.
    """
    fig, (ax,) = _figure((600, 400), 1)
    for i, (label, sigma_rels, top1, best_index) in enumerate(sweeps):
        colour = PALETTE[i % len(PALETTE)]
        order = sorted(range(len(sigma_rels)), key=lambda j: sigma_rels[j])
        xs, ys = _finite([sigma_rels[j] for j in order], [top1[j] for j in order])
        if not xs:
            continue
        ax.plot(xs, ys, "o-", color=colour, label=label, markersize=5)
        if best_index is not None and 0 <= best_index < len(top1) and math.isfinite(top1[best_index]):
            ax.plot([sigma_rels[best_index]], [top1[best_index]], "o", markersize=14, markerfacecolor="none",
                    markeredgecolor=colour, markeredgewidth=2)
    ax.set(title=title, xlabel="EMA length sigma_rel (circled: best of each sweep)", ylabel="top-1 (%)")
    _finish(ax)
    return _save(fig, out_png)
