"""PNG plots of a run: raw vs EMA top-1 and loss per epoch, and post-hoc EMA sweeps.

matplotlib is optional: without it each function logs a one-line notice and returns
``None`` instead of a path, and training carries on.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_summary", "plot_sweep", "plot_sweeps", "matplotlib_available", "preload_pyplot"]

_log = logging.getLogger(__name__)
_NOTICE = "matplotlib is not installed; skipping %s (pip install matplotlib to get plots)"


def matplotlib_available() -> bool:
    """True when matplotlib can be imported (headless Agg backend is used)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def preload_pyplot() -> None:
    """Import matplotlib's pyplot (Agg backend) ahead of a plot, e.g. on a background thread
    while the last checkpoint is written; a failure is left for the plot itself to report."""
    try:
        if matplotlib_available():
            _pyplot()
    except Exception:  # noqa: BLE001 - the plot reports it
        pass


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    return plt


def _read_summary(path: str | os.PathLike) -> dict[str, list[float]]:
    """``summary.csv`` as columns of floats (NaN for an empty or non-numeric cell)."""
    from .outputs import read_summary

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
    pairs = [("raw", f"eval_{metric}")] if f"eval_{metric}" in columns else []
    for name in columns:
        if name.endswith(f"eval_{metric}") and name.startswith("ema"):
            label = name[: -len(f"_eval_{metric}")]
            pairs.append((label, name))
    return pairs


def plot_summary(summary_csv: str | os.PathLike, out_png: str | os.PathLike | None = None) -> Path | None:
    """Plot top-1 and loss per epoch for the raw weights and each EMA from ``summary.csv``.

    Writes ``out_png`` (default: ``summary.png`` beside the CSV) and returns its path,
    or ``None`` when matplotlib is missing.
    """
    if not matplotlib_available():
        _log.warning(_NOTICE, "the training curves")
        return None
    columns = _read_summary(summary_csv)
    out = Path(out_png) if out_png else Path(summary_csv).with_name("summary.png")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    epochs = columns["epoch"]
    for ax, metric, title in ((axes[0], "top1", "top-1 (%)"), (axes[1], "loss", "eval loss")):
        for label, col in _series(columns, metric):
            ax.plot(epochs, columns[col], marker="o", markersize=3, label=label)
        if metric == "loss" and "train_loss" in columns:
            ax.plot(epochs, columns["train_loss"], linestyle="--", color="gray", label="train")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return out


def plot_sweep(sigma_rels: Sequence[float], top1: Sequence[float], out_png: str | os.PathLike,
               *, best_index: int | None = None, title: str = "post-hoc EMA sweep") -> Path | None:
    """Plot top-1 against EMA length (sigma_rel), marking the best; ``None`` without matplotlib."""
    return plot_sweeps([("sweep", sigma_rels, top1, best_index)], out_png, title=title)


def plot_sweeps(sweeps: Sequence[tuple[str, Sequence[float], Sequence[float], int | None]],
                out_png: str | os.PathLike, *, title: str = "post-hoc EMA sweeps") -> Path | None:
    """Plot every sweep's top-1 against EMA length (sigma_rel), one line per sweep labelled
    ``label``, each sweep's best point circled; ``None`` without matplotlib.

    ``sweeps``: ``(label, sigma_rels, top1, best_index)`` per sweep, oldest first.
    """
    if not matplotlib_available():
        _log.warning(_NOTICE, "the sweep plot")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, sigma_rels, top1, best_index in sweeps:
        order = sorted(range(len(sigma_rels)), key=lambda i: sigma_rels[i])
        line, = ax.plot([sigma_rels[i] for i in order], [top1[i] for i in order], marker="o", label=label)
        if best_index is not None:
            ax.scatter([sigma_rels[best_index]], [top1[best_index]], s=120, facecolors="none",
                       edgecolors=line.get_color())
    ax.set_xlabel("EMA length sigma_rel (circled: best of each sweep)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out_png)
    _save(fig, out)
    plt.close(fig)
    return out


def _save(fig, out: Path) -> None:
    """Write atomically so a crash never leaves a truncated PNG."""
    from emakit.checkpoint import atomic_write

    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
