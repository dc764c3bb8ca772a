"""Photometric augmentation (ColorJitter, RandomGrayscale) moved from the loader workers to the device.

timm's train transform ends, after the crop and flips, with torchvision's ``ColorJitter``
(and, where asked, ``RandomGrayscale``) on the PIL image: after decoding, the largest host
cost per sample. On the GPU input path (:class:`.data.DeviceLoader`) those trailing ops are
split in two:

- on the host, :class:`DrawPhotometric` draws each op's random parameters with the very
  calls the op makes (``ColorJitter.get_params``: ``torch.randperm(4)`` for the order, then one
  uniform per factor; ``torch.rand(1) < p`` for grayscale), at the same place in the
  transform, from the same (per-sample seeded) generator: every sample gets the factors and
  the order torchvision would have given it, so the distribution is timm's exactly and a
  resumed run draws the same ones. The sample becomes ``(uint8 image, parameters)``.
- on the device, :func:`apply_photometric` applies them to the batch in float32 in [0, 1],
  each sample with its own factors and its own order, by the formulas of torchvision's
  tensor functional ops (``adjust_brightness/contrast/saturation/hue``, ``rgb_to_grayscale``).

The one difference from the host ops is rounding: Pillow rounds to uint8 after every op,
the device keeps float32 until normalisation (a difference of at most a few levels of 255
per pixel, the same as torchvision's own tensor and PIL paths differ by).

The parameter row of a sample is self-describing (a kind code, then the op's values), so
the device side needs nothing but the batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import transforms as T

__all__ = ["DrawPhotometric", "split_photometric", "apply_photometric", "adjust_brightness", "adjust_contrast",
           "adjust_saturation", "adjust_hue", "to_grayscale", "MOVABLE"]

_COLOR_JITTER, _GRAYSCALE = 1.0, 2.0
_LENGTH = {_COLOR_JITTER: 9, _GRAYSCALE: 2}  # kind code + order(4) + factors(4); kind code + flag
MOVABLE = (T.ColorJitter, T.RandomGrayscale)


class DrawPhotometric:
    """Host half: ``tensor -> (tensor, float64 parameter row)``, drawing what ``ops`` would draw."""

    def __init__(self, ops: Sequence[Any]) -> None:
        for op in ops:
            if not isinstance(op, MOVABLE):
                raise TypeError(f"cannot move {type(op).__name__} to the device")
        self.ops = list(ops)

    def __call__(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        row: list[float] = []
        for op in self.ops:
            if isinstance(op, T.ColorJitter):
                order, *factors = op.get_params(op.brightness, op.contrast, op.saturation, op.hue)
                row += [_COLOR_JITTER, *map(float, order.tolist()),
                        *(math.nan if f is None else float(f) for f in factors)]
            else:
                row += [_GRAYSCALE, 1.0 if torch.rand(1) < op.p else 0.0]
        return img, torch.tensor(row, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(drawn here, applied on the device: {self.ops})"


def split_photometric(transform: Any) -> Any:
    """``transform`` (timm's uint8 train ``Compose``) with its trailing ColorJitter /
    RandomGrayscale ops (those right before ``MaybePILToTensor``) replaced by a
    :class:`DrawPhotometric` right after it; unchanged when there are none. Only the run of
    such ops at the end moves, so the order of all random draws and ops is kept."""
    steps = getattr(transform, "transforms", None)
    if not steps:
        return transform
    to_tensor = next((i for i, s in enumerate(steps) if type(s).__name__ == "MaybePILToTensor"), None)
    if to_tensor is None:
        return transform
    start = to_tensor
    while start > 0 and isinstance(steps[start - 1], MOVABLE):
        start -= 1
    if start == to_tensor:
        return transform
    moved = steps[start:to_tensor]
    return T.Compose([*steps[:start], steps[to_tensor], DrawPhotometric(moved), *steps[to_tensor + 1:]])


# --- the device half: torchvision's tensor formulas, one factor per sample ((N, 1, 1, 1) tensors)
def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = ratio.to(a.dtype)
    return (r * a + (1.0 - ratio).to(a.dtype) * b).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_brightness`` per sample (blend with black)."""
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_contrast`` per sample (blend with the mean grey level)."""
    return _blend(x, torch.mean(_gray(x), dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_saturation`` per sample (blend with the greyscale image)."""
    return _blend(x, _gray(x), factor)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale(..., num_output_channels=3)``."""
    return _gray(x).expand(x.shape).contiguous()


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    hi, lo = x.max(dim=-3).values, x.min(dim=-3).values
    flat = hi == lo
    span = hi - lo
    ones = torch.ones_like(hi)
    s = span / torch.where(flat, ones, hi)
    d = torch.where(flat, ones, span)
    rc, gc, bc = (hi - r) / d, (hi - g) / d, (hi - b) / d
    h = ((hi == r) * (bc - gc) + ((hi == g) & (hi != r)) * (2.0 + rc - bc)
         + ((hi != g) & (hi != r)) * (4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, hi), dim=-3)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=-3)
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # per sector (0..5) the (r, g, b) sources, as in Pillow / torchvision
    table = torch.stack((torch.stack((v, q, p, p, t, v), dim=-3), torch.stack((t, v, v, q, p, p), dim=-3),
                         torch.stack((p, p, t, v, v, q), dim=-3)), dim=-4)  # (..., 3, 6, H, W)
    index = sector.unsqueeze(-3).unsqueeze(-3).expand(*table.shape[:-3], 1, *table.shape[-2:])
    return table.gather(-3, index.long()).squeeze(-3)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` per sample (a rotation of the hue in HSV)."""
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + factor.to(x.dtype).view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _apply_masked(x: torch.Tensor, rows: torch.Tensor, fn: Any, factor: torch.Tensor | None) -> torch.Tensor:
    """``fn`` on the samples ``rows`` (a CPU bool mask) of ``x``."""
    if not bool(rows.any()):
        return x
    if bool(rows.all()):
        return fn(x) if factor is None else fn(x, factor.view(-1, 1, 1, 1))
    index = rows.nonzero().squeeze(1).to(x.device)
    part = x.index_select(0, index)
    part = fn(part) if factor is None else fn(part, factor.index_select(0, index).view(-1, 1, 1, 1))
    return x.index_copy(0, index, part)


def apply_photometric(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply the ops whose parameters :class:`DrawPhotometric` drew (``params``: the (N, L)
    float64 batch of rows, on the CPU) to ``x``, float (N, 3, H, W) in [0, 1] on any device."""
    col = 0
    while col < params.shape[1]:
        kind = float(params[0, col])
        if kind == _COLOR_JITTER:
            order = params[:, col + 1:col + 5].to(torch.int64)
            factors = params[:, col + 5:col + 9]
            on_device = factors.to(device=x.device, dtype=torch.float64, non_blocking=True)
            for step in range(4):
                for fn_id, fn in enumerate(_JITTER_OPS):
                    if torch.isnan(factors[:, fn_id]).all():  # that factor is off (None) for this op
                        continue
                    x = _apply_masked(x, order[:, step] == fn_id, fn, on_device[:, fn_id])
        elif kind == _GRAYSCALE:
            x = _apply_masked(x, params[:, col + 1] > 0.5, to_grayscale, None)
        else:
            raise ValueError(f"unknown photometric op code {kind} in column {col}")
        col += _LENGTH[kind]
    return x
