"""Host-side image work that timm's transforms do in more steps than needed: evaluation's
resize-then-crop as one resample of the kept centre box, and optional decoders.

``CenterBoxResize`` replaces timm's eval ``Resize(shorter side) + CenterCrop`` by one Pillow
resample of the source box that the crop keeps, onto the same output grid (the same sample
positions and filter support as the full resize): it computes only the pixels that are kept.
Its output differs from resize-then-crop by Pillow's uint8 rounding between its two passes
(at most 2 levels of 255, mean under 0.3 on 320-px and 1024x768 images: tests/test_decode.py),
so it is used where pixels may differ that much: with ``--decoder`` (opt-in). On the GPU
input path the eval resize is :class:`TensorCenterResize` (torch's uint8 kernel, the default
there); the CPU path keeps timm's eval transform exactly.

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
           "draft_scale", "DecodeResizedCrop", "DecodeCenterBox", "with_decoder", "tensor_resized_crop",
           "TensorResizedCrop", "tensor_crop_for_device", "TensorCenterResize", "draw_crop"]

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


def fuse_eval_resize(transform: Any, tensor: bool = False) -> Any:
    """timm's eval ``Compose`` with its ``Resize(int)`` + ``CenterCrop`` pair replaced by one
    :class:`CenterBoxResize` (``tensor``: :class:`TensorCenterResize`, for a transform that
    ends in a uint8 tensor); unchanged where the pair is not there."""
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
        fused = (TensorCenterResize if tensor else CenterBoxResize)(short, size, resize.interpolation)
        steps[i:i + 2] = [fused]
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
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
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


# ----------------------------------------------------------------------------- decode + first resample
def _size_only(width: int, height: int) -> Any:
    """A zero-storage tensor of shape (1, height, width): what torchvision's ``get_image_size``
    reads, so timm's ``get_params`` draws a crop for an image not decoded yet."""
    import torch

    return torch.empty(()).expand(1, height, width)


class _Header:
    """The size of an image file, read without decoding it, and its decode at a DCT scale."""

    def __init__(self, path: str, decoder: str) -> None:
        self.path, self.decoder, self.data = path, decoder, None
        if decoder == "simplejpeg" and path.lower().endswith((".jpg", ".jpeg")):
            import simplejpeg

            with open(path, "rb") as f:
                self.data = f.read()
            self.height, self.width, _, _ = simplejpeg.decode_jpeg_header(self.data)
            self.image = None
        else:
            self.image = Image.open(path)  # reads the header only; decoded (once) by decode()
            self.width, self.height = self.image.size

    def decode_array(self, scale: int) -> Any:
        """simplejpeg's decode: an (H, W, 3) uint8 array, DCT-downscaled by ``scale``."""
        import simplejpeg

        w, h = math.ceil(self.width / scale), math.ceil(self.height / scale)
        return simplejpeg.decode_jpeg(self.data, colorspace="RGB", min_width=w, min_height=h)

    def decode(self, scale: int) -> Image.Image:
        """The RGB image, DCT-downscaled by ``scale`` (1, 2, 4, 8) where the format allows."""
        if self.data is not None:
            return Image.fromarray(self.decode_array(scale))
        im, self.image = self.image, None
        if im is None:
            raise RuntimeError("decode() called twice")
        with im:
            if scale > 1 and im.format == "JPEG":
                im.draft("RGB", (math.ceil(self.width / scale), math.ceil(self.height / scale)))
            return im.convert("RGB")

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
            self.image = None


def _resample(header: _Header, box: tuple[float, float, float, float], out_w: int, out_h: int,
              interpolation: Any) -> Image.Image:
    scale = draft_scale(int(box[2] - box[0]), int(box[3] - box[1]), out_w, out_h)
    img = header.decode(scale)
    fx, fy = header.width / img.width, header.height / img.height
    mode = _PIL_MODES[interpolation] if isinstance(interpolation, InterpolationMode) else interpolation
    return img.resize((out_w, out_h), mode, box=(box[0] / fx, box[1] / fy, box[2] / fx, box[3] / fy))


def draw_crop(rrc: Any, img: Any) -> tuple[int, int, int, int, Any]:
    """timm's ``RandomResizedCropAndInterpolation`` draw, in its order: the box ``(i, j, h, w)``
    from ``get_params`` on ``img`` (an image or anything with its ``size``), then the
    interpolation (``random.choice`` when it holds several)."""
    import random

    i, j, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
    interp = rrc.interpolation
    if isinstance(interp, (tuple, list)):
        interp = random.choice(interp)
    return i, j, h, w, interp


class _DecodeFirst:
    """A first transform op ``op`` fused with the decode (``--decoder`` other than pil): given a
    path it reads the file's header (:class:`_Header`) and :meth:`_from_header` decodes what
    the op needs; given a decoded image (in-memory datasets) it is the op itself."""

    takes_path = True

    def __init__(self, op: Any, decoder: str) -> None:
        self.op, self.decoder = op, decoder

    def __call__(self, item: Any) -> Any:
        if not isinstance(item, str):
            return self.op(item)
        header = _Header(item, self.decoder)
        try:
            return self._from_header(header)
        finally:
            header.close()

    def _from_header(self, header: _Header) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(decoder={self.decoder}, {self.op!r})"


def _scaled_box(i: int, j: int, h: int, w: int, header: _Header, width: int, height: int
                ) -> tuple[int, int, int, int]:
    """The crop ``(i, j, h, w)`` of the full-size image as (top, left, height, width) in its
    ``width`` x ``height`` DCT-downscaled decode, kept inside it."""
    fx, fy = header.width / width, header.height / height
    top, left = int(i / fy), int(j / fx)
    return top, left, max(1, min(height - top, round(h / fy))), max(1, min(width - left, round(w / fx)))


class DecodeResizedCrop(_DecodeFirst):
    """timm's ``RandomResizedCropAndInterpolation`` fused with the decode: the crop is drawn
    from the file's header size with timm's own ``get_params`` (the same random calls), then
    the file is decoded at the largest DCT downscale that still leaves the crop at least the
    output size, and the crop box resampled once. ``tensor``: the GPU input path's uint8
    tensor, resampled by torch's kernel (:func:`tensor_resized_crop`)."""

    def __init__(self, rrc: Any, decoder: str, tensor: bool = False) -> None:
        super().__init__(rrc, decoder)
        self.tensor = tensor

    def _from_header(self, header: _Header) -> Any:
        i, j, h, w, interp = draw_crop(self.op, _size_only(header.width, header.height))
        out_h, out_w = self.op.size
        if not (self.tensor and interp in _TORCH_MODES):
            return _resample(header, (j, i, j + w, i + h), out_w, out_h, interp)
        scale = draft_scale(w, h, out_w, out_h)
        if header.data is not None:  # simplejpeg: no PIL image
            pixels = header.decode_array(scale)
            top, left, height, width = _scaled_box(i, j, h, w, header, pixels.shape[1], pixels.shape[0])
            return _tensor_resize(torch_hwc(pixels)[:, :, top:top + height, left:left + width], self.op.size, interp)
        img = header.decode(scale)
        top, left, height, width = _scaled_box(i, j, h, w, header, img.width, img.height)
        return tensor_resized_crop(img, top, left, height, width, self.op.size, interp)


class DecodeCenterBox(_DecodeFirst):
    """:class:`CenterBoxResize` fused with the decode (``--decoder`` other than pil)."""

    def _from_header(self, header: _Header) -> Any:
        out_h, out_w = self.op.size
        found = center_box(header.width, header.height, self.op.short, out_h, out_w)
        if found is None:
            return self.op(header.decode(1))
        box = found[0]
        # decoded at the DCT scale the kept box allows, then the op's own resize + crop (the
        # same geometry on the smaller image, up to rounding)
        scale = draft_scale(int(box[2] - box[0]), int(box[3] - box[1]), out_w, out_h)
        if (header.data is not None and isinstance(self.op, TensorCenterResize)
                and self.op.interpolation in _TORCH_MODES):  # simplejpeg: no PIL image
            x = torch_hwc(header.decode_array(scale))
            if center_box(x.shape[-1], x.shape[-2], self.op.short, out_h, out_w) is not None:
                return self.op.from_tensor(x)  # an (H, W, 3) array's view: channels-last already
        return self.op(header.decode(scale))


def with_decoder(transform: Any, decoder: str) -> Any:
    """``transform`` whose first op decodes the file itself (:class:`DecodeResizedCrop`,
    :class:`DecodeCenterBox`) for ``decoder`` other than pil; the dataset then hands it the
    path (``takes_path``). Unchanged for pil or when the first op is neither."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    if decoder == "pil":
        return transform
    check_decoder(decoder)
    steps = list(getattr(transform, "transforms", []))
    if not steps:
        return transform
    if isinstance(steps[0], TensorResizedCrop):
        steps[0] = DecodeResizedCrop(steps[0].rrc, decoder, tensor=True)
    elif isinstance(steps[0], RandomResizedCropAndInterpolation):
        steps[0] = DecodeResizedCrop(steps[0], decoder)
    elif isinstance(steps[0], CenterBoxResize):
        steps[0] = DecodeCenterBox(steps[0], decoder)
    else:
        return transform
    composed = T.Compose(steps)
    composed.takes_path = True  # type: ignore[attr-defined]
    return composed


# ----------------------------------------------------------------------------- the crop's resample in torch
_TORCH_MODES = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}


def tensor_resized_crop(img: Image.Image, top: int, left: int, height: int, width: int, size: Sequence[int],
                        interpolation: Any) -> Any:
    """torchvision's ``resized_crop`` of a PIL image (crop, then antialiased resize) done by
    torch's uint8 kernel on the HWC pixels: a (3, H, W) uint8 tensor, within a few levels of
    255 of Pillow's result (2 when shrinking, up to 5 seen when a small crop is upscaled; mean
    under 0.05: tests/test_decode.py, test_input_path.py) and 4-6x cheaper than Pillow's
    resize on one core. Modes other than bilinear/bicubic: Pillow's, then to a tensor."""
    mode = _TORCH_MODES.get(interpolation)
    if mode is None:
        return F.pil_to_tensor(F.resized_crop(img, top, left, height, width, list(size), interpolation))
    crop = _hwc(img.crop((left, top, left + width, top + height)))  # Pillow clips nothing here: box inside
    return _tensor_resize(crop, size, interpolation)


def _tensor_resize(crop: Any, size: Sequence[int], interpolation: Any) -> Any:
    """(1, 3, h, w) uint8 in channels-last layout (as torch's uint8 kernel wants it) -> (3, H, W);
    the output stays in that layout (the batch's collate copies it into place anyway)."""
    import torch
    from torch.nn.functional import interpolate

    if tuple(crop.shape[-2:]) == tuple(size):
        return crop[0]
    crop = crop.contiguous(memory_format=torch.channels_last)  # a no-op unless crop is a strided view
    return interpolate(crop, size=list(size), mode=_TORCH_MODES[interpolation], antialias=True)[0]


def torch_hwc(pixels: Any) -> Any:
    """An (H, W, 3) uint8 numpy array as a (1, 3, H, W) channels-last tensor (no copy)."""
    import torch

    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)


def _hwc(img: Image.Image) -> Any:
    """A PIL image's pixels as a (1, 3, H, W) uint8 tensor in channels-last layout (one copy)."""
    import torch

    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(
        rgb.height, rgb.width, 3).permute(2, 0, 1).unsqueeze(0)


class TensorResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` (the same ``get_params`` and
    interpolation draw, so the same crops) with the resample done by
    :func:`tensor_resized_crop`; outputs a uint8 tensor. For the GPU input path only, where
    every later host op takes a tensor (flips, :class:`.photometric.DrawPhotometric`)."""

    def __init__(self, rrc: Any) -> None:
        self.rrc = rrc

    def __call__(self, img: Any) -> Any:
        if not isinstance(img, Image.Image):
            return self.rrc(img)
        i, j, h, w, interp = draw_crop(self.rrc, img)
        return tensor_resized_crop(img, i, j, h, w, self.rrc.size, interp)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rrc!r})"


def tensor_crop_for_device(transform: Any) -> Any:
    """The uint8 train ``Compose`` with timm's random resized crop as :class:`TensorResizedCrop`
    where everything after it takes a tensor (flips, ``MaybePILToTensor``, the drawn
    photometric parameters); unchanged otherwise (AutoAugment, host ColorJitter: PIL ops)."""
    from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    from .photometric import DrawPhotometric

    steps = list(getattr(transform, "transforms", []))
    if not steps or type(steps[0]) is not RandomResizedCropAndInterpolation:
        return transform
    if not all(isinstance(s, (T.RandomHorizontalFlip, T.RandomVerticalFlip, MaybePILToTensor, DrawPhotometric))
               for s in steps[1:]):
        return transform
    return T.Compose([TensorResizedCrop(steps[0]), *steps[1:]])


class TensorCenterResize(CenterBoxResize):
    """timm's eval ``Resize(short)`` + ``CenterCrop`` with the resize done by torch's uint8
    antialiased kernel (4-6x cheaper than Pillow's on one core, within a few levels of it): a
    (3, H, W) uint8 tensor, for the GPU input path. Modes other than bilinear/bicubic, and a
    crop that would pad: :class:`CenterBoxResize`, then to a tensor."""

    def __call__(self, img: Any) -> Any:
        out_h, out_w = self.size
        mode = _TORCH_MODES.get(self.interpolation)
        found = center_box(img.width, img.height, self.short, out_h, out_w) if isinstance(img, Image.Image) else None
        if mode is None or found is None:
            out = super().__call__(img)
            return F.pil_to_tensor(out) if isinstance(out, Image.Image) else out
        return self.from_tensor(_hwc(img))

    def from_tensor(self, x: Any) -> Any:
        """The same on a (1, 3, H, W) uint8 channels-last tensor (bilinear/bicubic only, no padding)."""
        from torch.nn.functional import interpolate

        out_h, out_w = self.size
        height, width = x.shape[-2:]
        if width <= height:
            new_w, new_h = self.short, int(self.short * height / width)
        else:
            new_w, new_h = int(self.short * width / height), self.short
        top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
        if (new_h, new_w) != (height, width):
            x = interpolate(x, size=[new_h, new_w], mode=_TORCH_MODES[self.interpolation], antialias=True)
        return x[0, :, top:top + out_h, left:left + out_w]
