"""Host-side image work that timm's transforms do in more steps than needed: evaluation's
resize-then-crop as one resample of the kept centre box, and optional decoders.

``CenterBoxResize`` replaces timm's eval ``Resize(shorter side) + CenterCrop`` by one Pillow
resample of the source box that the crop keeps, onto the same output grid (the same sample
positions and filter support as the full resize): it computes only the pixels that are kept.
Its output differs from resize-then-crop by Pillow's uint8 rounding between its two passes
(at most 2 levels of 255, mean under 0.3 on 320-px and 1024x768 images: tests/test_decode.py),
so it is the default.

Decoders (``--decoder``, opt-in, they change pixels within decoder noise):
``pil`` (the default: ``Image.open(...).convert("RGB")``, timm's), ``pil-draft`` (Pillow's
JPEG DCT-domain downscale by 1/2, 1/4 or 1/8 where the image is larger than the output
needs, :func:`draft_scale`), ``simplejpeg`` (libjpeg-turbo through the ``simplejpeg``
package, with the same DCT downscale). A decoder that is asked for and not installed is a
one-line error (:func:`check_decoder`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from . import UsageError

__all__ = ["CenterBoxResize", "center_box", "fuse_eval_resize", "DECODERS", "check_decoder", "decode",
           "draft_scale"]

DECODERS = ("pil", "pil-draft", "simplejpeg")
_PIL_MODES = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.BILINEAR: Image.BILINEAR,
              InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.BOX: Image.BOX,
              InterpolationMode.HAMMING: Image.HAMMING, InterpolationMode.LANCZOS: Image.LANCZOS}


def center_box(width: int, height: int, short: int, out_h: int, out_w: int) -> tuple[tuple[float, ...], bool] | None:
    """The source box (left, top, right, bottom) that torchvision's ``Resize(short)`` then
    ``CenterCrop((out_h, out_w))`` keeps, and whether the resize changes the size at all;
    None when the crop would pad (the resized image smaller than the crop)."""
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    if new_w < out_w or new_h < out_h:
        return None
    top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy), (new_w, new_h) != (width, height)


class CenterBoxResize:
    """``Resize(short, interpolation)`` + ``CenterCrop(size)`` in one Pillow resample."""

    def __init__(self, short: int, size: Sequence[int], interpolation: InterpolationMode) -> None:
        self.short, self.size, self.interpolation = int(short), (int(size[0]), int(size[1])), interpolation

    def __call__(self, img: Any) -> Any:
        out_h, out_w = self.size
        if isinstance(img, Image.Image):
            found = center_box(img.width, img.height, self.short, out_h, out_w)
            if found is not None:
                box, resized = found
                if not resized:  # no resample at all: the crop alone, as torchvision does it
                    return F.center_crop(img, [out_h, out_w])
                return img.resize((out_w, out_h), _PIL_MODES[self.interpolation], box=box)
        return F.center_crop(F.resize(img, self.short, self.interpolation), [out_h, out_w])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(short={self.short}, size={self.size}, interpolation={self.interpolation.value})"


def fuse_eval_resize(transform: Any) -> Any:
    """timm's eval ``Compose`` with its ``Resize(int)`` + ``CenterCrop`` pair replaced by one
    :class:`CenterBoxResize` (unchanged where the pair is not there)."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    for i in range(len(steps) - 1):
        resize, crop = steps[i], steps[i + 1]
        if type(resize) is not T.Resize or type(crop) is not T.CenterCrop:
            continue
        short = resize.size
        if isinstance(short, (list, tuple)):
            if len(short) != 1:
                return transform  # a fixed (h, w) resize: not the shorter-side case
            short = short[0]
        if resize.interpolation not in _PIL_MODES or resize.max_size is not None:
            return transform
        size = tuple(crop.size) if len(crop.size) == 2 else (crop.size[0], crop.size[0])
        steps[i:i + 2] = [CenterBoxResize(short, size, resize.interpolation)]
        return T.Compose(steps)
    return transform


# ----------------------------------------------------------------------------- decoders
def check_decoder(name: str) -> None:
    """A one-line ``UsageError`` when ``name`` is unknown or its package is missing."""
    if name not in DECODERS:
        raise UsageError(f"--decoder {name}: unknown; choose one of {', '.join(DECODERS)}")
    if name == "simplejpeg":
        try:
            import simplejpeg  # noqa: F401
        except ImportError:
            raise UsageError("--decoder simplejpeg: the simplejpeg package is not installed; "
                             "pip install simplejpeg, or use --decoder pil") from None


def draft_scale(width: int, height: int, need_w: int, need_h: int) -> int:
    """The largest DCT downscale (1, 2, 4 or 8) that leaves the image at least
    ``need_w`` x ``need_h`` pixels."""
    for scale in (8, 4, 2):
        if width // scale >= need_w and height // scale >= need_h:
            return scale
    return 1


def decode(path: str, decoder: str = "pil", need: tuple[int, int] | None = None) -> tuple[Image.Image, float]:
    """``(RGB image, factor)``: ``path`` decoded by ``decoder``; with ``need`` = (w, h) the
    smallest size the caller will resample from, JPEGs may come out DCT-downscaled, by
    ``factor`` (1.0 when not)."""
    if decoder == "simplejpeg" and path.lower().endswith((".jpg", ".jpeg")):
        import simplejpeg

        with open(path, "rb") as f:
            data = f.read()
        if need is None:
            return Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB")), 1.0
        width, height, _, _ = simplejpeg.decode_jpeg_header(data)
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=need[0], min_height=need[1])
        return Image.fromarray(pixels), width / pixels.shape[1]
    with Image.open(path) as im:
        width = im.width
        if decoder in ("pil-draft", "simplejpeg") and need is not None and im.format == "JPEG":
            scale = draft_scale(im.width, im.height, need[0], need[1])
            if scale > 1:
                im.draft("RGB", (math.ceil(im.width / scale), math.ceil(im.height / scale)))
        rgb = im.convert("RGB")
    return rgb, width / rgb.width
