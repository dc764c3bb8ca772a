"""PNG plots of a run: raw vs EMA top-1 and loss per epoch, and post-hoc EMA sweeps.

Drawn with Pillow, which the image pipeline already needs: no plotting library to import
(matplotlib's import and one figure cost about 1.3 s of CPU at the end of every run, the
longest step after the last checkpoint). The look follows matplotlib's defaults: the same
colour cycle (tab10), 100 dpi sizes, a light grid, a legend in the emptiest corner. Lines
are drawn at twice the size and downsampled, which antialiases them.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["plot_summary", "plot_sweep", "plot_sweeps", "Series", "Panel", "draw_panels", "nice_ticks", "PALETTE"]

# matplotlib's default colour cycle ("tab10"): series i gets PALETTE[i % 10].
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
GREY = "#808080"
_SCALE = 2  # drawn at twice the size, then downsampled (antialiasing)
_GRID, _AXES, _TEXT = "#e5e5e5", "#000000", "#000000"


@dataclass
class Series:
    """One line: points ``(xs[i], ys[i])`` (NaN points are left out), joined in order."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    colour: str
    dashed: bool = False
    markers: bool = True
    circled: int | None = None  # index of a point ringed by a hollow circle (a sweep's best)


@dataclass
class Panel:
    """One set of axes: its title, axis labels and series."""

    title: str
    xlabel: str
    ylabel: str = ""
    series: list[Series] = field(default_factory=list)
    integer_x: bool = False  # whole-number x ticks (epochs)


def nice_ticks(lo: float, hi: float, most: int = 7, *, integer: bool = False) -> list[float]:
    """Round tick values inside [lo, hi]: the smallest step of 1, 2, 2.5 or 5 times a power
    of ten that gives at most ``most`` ticks (as matplotlib's default locator); with
    ``integer`` only whole steps (epochs)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    power = 10.0 ** math.floor(math.log10((hi - lo) / most))
    for step in (m * power * p for p in (1, 10, 100) for m in (1, 2, 2.5, 5)):
        if integer and (step < 1 or step != int(step)):
            continue
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if last - first + 1 <= most:
            return [round(i * step, 12) for i in range(first, last + 1)]
    return [lo, hi]


def _tick_text(v: float, ticks: Sequence[float]) -> str:
    """``v`` with as many decimals as the tick step needs (0.25 steps: two)."""
    step, decimals = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0, 0
    while decimals < 8 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    return f"{v:.{decimals}f}"


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _range(values: Sequence[float]) -> tuple[float, float]:
    """The data range with matplotlib's 5% margin on each side (a flat series gets +-1 or +-5%)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _points(series: Series) -> list[tuple[float, float]]:
    return [(x, y) for x, y in zip(series.xs, series.ys) if math.isfinite(x) and math.isfinite(y)]


def _dashes(line: list[tuple[float, float]], on: float, off: float) -> list[list[tuple[float, float]]]:
    """Split a polyline into dash pieces ``on`` long with ``off`` gaps (lengths in pixels)."""
    pieces, current, drawing, left = [], [line[0]], True, on
    for (x0, y0), (x1, y1) in zip(line, line[1:]):
        length, done = math.hypot(x1 - x0, y1 - y0), 0.0
        while length - done > left:
            done += left
            t = done / length
            point = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)
            if drawing:
                pieces.append(current + [point])
            current, drawing = [point], not drawing
            left = on if drawing else off
        left -= length - done
        if drawing:
            current.append((x1, y1))
    if drawing and len(current) > 1:
        pieces.append(current)
    return pieces


def _along(line: list[tuple[float, float]], spacing: float) -> list[tuple[float, float]]:
    """Points every ``spacing`` pixels along a polyline (its vertices included)."""
    out = list(line[:1])
    for (x0, y0), (x1, y1) in zip(line, line[1:]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / spacing))
        out += [(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n) for i in range(1, n + 1)]
    return out


def _draw_panel(img: Image.Image, box: tuple[int, int, int, int], panel: Panel, legend_px: int) -> None:
    """Draw ``panel`` into ``box`` (left, top, right, bottom, in pixels of ``img``)."""
    k = _SCALE
    draw = ImageDraw.Draw(img)
    tick_font, label_font, title_font = _font(11 * k), _font(12 * k), _font(13 * k)
    finite = [(s, _points(s)) for s in panel.series]
    drawn = [(s, points) for s, points in finite if points]
    xs = [x for _, points in drawn for x, _ in points]
    ys = [y for _, points in drawn for _, y in points]
    (x_lo, x_hi), (y_lo, y_hi) = _range(xs), _range(ys)
    x_ticks = [t for t in nice_ticks(x_lo, x_hi, integer=panel.integer_x) if x_lo <= t <= x_hi]
    y_ticks = [t for t in nice_ticks(y_lo, y_hi) if y_lo <= t <= y_hi]
    y_texts = [_tick_text(t, y_ticks) for t in y_ticks]
    left_pad = max((draw.textlength(t, font=tick_font) for t in y_texts), default=0) + 14 * k
    if panel.ylabel:
        left_pad += 18 * k
    # The axes rectangle, on whole output pixels: its 1-px frame stays black after downsampling.
    ax = tuple(round(v / k) * k for v in (box[0] + left_pad, box[1] + 30 * k, box[2] - 14 * k, box[3] - 44 * k))

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (ax[0] + (x - x_lo) / (x_hi - x_lo) * (ax[2] - ax[0]),
                ax[3] - (y - y_lo) / (y_hi - y_lo) * (ax[3] - ax[1]))

    for t in x_ticks:  # grid, then ticks and their labels
        px = to_px(t, y_lo)[0]
        draw.line([(px, ax[1]), (px, ax[3])], fill=_GRID, width=k)
        draw.line([(px, ax[3]), (px, ax[3] + 4 * k)], fill=_AXES, width=k)
        draw.text((px, ax[3] + 6 * k), _tick_text(t, x_ticks), fill=_TEXT, font=tick_font, anchor="mt")
    for t, text in zip(y_ticks, y_texts):
        py = to_px(x_lo, t)[1]
        draw.line([(ax[0], py), (ax[2], py)], fill=_GRID, width=k)
        draw.line([(ax[0] - 4 * k, py), (ax[0], py)], fill=_AXES, width=k)
        draw.text((ax[0] - 6 * k, py), text, fill=_TEXT, font=tick_font, anchor="rm")
    draw.text(((ax[0] + ax[2]) / 2, box[1] + 22 * k), panel.title, fill=_TEXT, font=title_font, anchor="ms")
    draw.text(((ax[0] + ax[2]) / 2, box[3] - 6 * k), panel.xlabel, fill=_TEXT, font=label_font, anchor="md")
    if panel.ylabel:  # rotated: drawn on its own strip, turned a quarter
        width = int(draw.textlength(panel.ylabel, font=label_font)) + 4
        strip = Image.new("RGBA", (width, 16 * k), (255, 255, 255, 0))
        ImageDraw.Draw(strip).text((2, 8 * k), panel.ylabel, fill=_TEXT, font=label_font, anchor="lm")
        strip = strip.rotate(90, expand=True)
        img.paste(strip, (int(box[0] + 2 * k), int((ax[1] + ax[3]) / 2 - width / 2)), strip)

    lines = [[to_px(x, y) for x, y in points] for _, points in drawn]
    for (s, _), line in zip(drawn, lines):
        pieces = _dashes(line, 7 * k, 4 * k) if s.dashed else [line]
        for piece in pieces:
            if len(piece) > 1:
                draw.line(piece, fill=s.colour, width=2 * k, joint="curve")
        if s.markers:
            for px, py in line:
                draw.ellipse([px - 3 * k, py - 3 * k, px + 3 * k, py + 3 * k], fill=s.colour)
        if s.circled is not None and 0 <= s.circled < len(s.xs):
            px, py = to_px(s.xs[s.circled], s.ys[s.circled])
            if math.isfinite(px) and math.isfinite(py):
                draw.ellipse([px - 8 * k, py - 8 * k, px + 8 * k, py + 8 * k], outline=s.colour, width=2 * k)
    draw.rectangle((ax[0], ax[1], ax[2] + k - 1, ax[3] + k - 1), outline=_AXES, width=k)  # whole pixels
    if drawn:
        _draw_legend(draw, ax, [s for s, _ in drawn], [p for line in lines for p in _along(line, 4 * k)],
                     _font(legend_px * k))


def _draw_legend(draw: ImageDraw.ImageDraw, ax: tuple[float, float, float, float], series: list[Series],
                 points: list[tuple[float, float]], font) -> None:
    """A framed legend where it covers the fewest of ``points`` (drawn points, sampled along
    the lines): matplotlib's "best", its places tried in its order (upper right, upper left,
    lower left, lower right, right, centre left, lower, upper, centre; its tenth, "center
    right", is the same place as "right")."""
    k = _SCALE
    row = font.size + 4 * k if hasattr(font, "size") else 14 * k
    width = 34 * k + max(draw.textlength(s.label, font=font) for s in series) + 8 * k
    height = row * len(series) + 6 * k
    inset = 6 * k
    left, right, centre_x = ax[0] + inset, ax[2] - inset - width, (ax[0] + ax[2] - width) / 2
    top, bottom, centre_y = ax[1] + inset, ax[3] - inset - height, (ax[1] + ax[3] - height) / 2
    corners = [(right, top), (left, top), (left, bottom), (right, bottom), (right, centre_y), (left, centre_y),
               (centre_x, bottom), (centre_x, top), (centre_x, centre_y)]

    def covered(corner: tuple[float, float]) -> int:
        x0, y0 = corner
        return sum(x0 <= px <= x0 + width and y0 <= py <= y0 + height for px, py in points)

    x0, y0 = min(corners, key=covered)  # min keeps the first of equals: matplotlib's order
    draw.rounded_rectangle([x0, y0, x0 + width, y0 + height], radius=3 * k, fill="#ffffff", outline="#cccccc",
                           width=k)
    for i, s in enumerate(series):
        cy = y0 + 3 * k + row * i + row / 2
        segments = _dashes([(x0 + 6 * k, cy), (x0 + 28 * k, cy)], 7 * k, 4 * k) if s.dashed else \
            [[(x0 + 6 * k, cy), (x0 + 28 * k, cy)]]
        for piece in segments:
            draw.line(piece, fill=s.colour, width=2 * k)
        if s.markers:
            draw.ellipse([x0 + 17 * k - 3 * k, cy - 3 * k, x0 + 17 * k + 3 * k, cy + 3 * k], fill=s.colour)
        draw.text((x0 + 34 * k, cy), s.label, fill=_TEXT, font=font, anchor="lm")


def draw_panels(panels: Sequence[Panel], size: tuple[int, int], out: str | os.PathLike, *,
                legend_px: int = 11) -> Path:
    """Draw ``panels`` side by side into a ``size`` (width, height) PNG at ``out``, written
    atomically (a crash never leaves a truncated file); returns its path."""
    from emakit.checkpoint import atomic_write

    k = _SCALE
    img = Image.new("RGB", (size[0] * k, size[1] * k), "#ffffff")
    width = size[0] * k / len(panels)
    for i, panel in enumerate(panels):
        _draw_panel(img, (round(i * width), 0, round((i + 1) * width), size[1] * k), panel, legend_px)
    img = img.resize(size, Image.Resampling.BOX)
    out = Path(out)
    atomic_write(out, lambda tmp: img.save(tmp, format="PNG"))
    return out


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


def plot_summary(summary_csv: str | os.PathLike, out_png: str | os.PathLike | None = None) -> Path:
    """Plot top-1 and loss per epoch for the raw weights and each EMA from ``summary.csv``.

    Writes ``out_png`` (default: ``summary.png`` beside the CSV, 1000 x 400 px) and returns
    its path. Series with no values (a run without an EMA) are left out.
    """
    columns = _read_summary(summary_csv)
    out = Path(out_png) if out_png else Path(summary_csv).with_name("summary.png")
    epochs = columns["epoch"]
    panels = []
    for metric, title in (("top1", "top-1 (%)"), ("loss", "eval loss")):
        panel = Panel(title, "epoch", integer_x=True)
        for i, (label, col) in enumerate(_series(columns, metric)):
            panel.series.append(Series(label, epochs, columns[col], PALETTE[i % len(PALETTE)]))
        if metric == "loss" and "train_loss" in columns:
            panel.series.append(Series("train", epochs, columns["train_loss"], GREY, dashed=True, markers=False))
        panels.append(panel)
    return draw_panels(panels, (1000, 400), out)


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
    panel = Panel(title, "EMA length sigma_rel (circled: best of each sweep)", "top-1 (%)")
    for i, (label, sigma_rels, top1, best_index) in enumerate(sweeps):
        order = sorted(range(len(sigma_rels)), key=lambda j: sigma_rels[j])
        panel.series.append(Series(label, [sigma_rels[j] for j in order], [top1[j] for j in order],
                                   PALETTE[i % len(PALETTE)],
                                   circled=order.index(best_index) if best_index is not None else None))
    return draw_panels([panel], (600, 400), out_png, legend_px=10)
