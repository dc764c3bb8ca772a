"""emakit.training.decode: evaluation's one resample of the kept centre box against timm's
resize-then-crop, and the decoders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from emakit.training import UsageError
from emakit.training.data import AugmentConfig, build_transforms
from emakit.training.decode import CenterBoxResize, check_decoder, decode, draft_scale, fuse_eval_resize


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(9, 12, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    pixels += rng.normal(0, 8, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(427, 320), (320, 427), (1024, 768), (768, 1024), (500, 333), (64, 48), (300, 300)])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_one_resample_within_rounding_of_resize_then_crop(size, mode):
    interp = T.InterpolationMode(mode)
    img = _image(*size, seed=size[0])
    ref = np.asarray(T.CenterCrop(224)(T.Resize(256, interpolation=interp)(img)), dtype=np.int16)
    got = np.asarray(CenterBoxResize(256, (224, 224), interp)(img), dtype=np.int16)
    diff = np.abs(ref - got)
    assert got.shape == ref.shape
    assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())  # Pillow's between-pass rounding


def test_eval_transform_is_fused_and_identity_stays_identity():
    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 0.875}
    _, eval_tf = build_transforms(cfg, AugmentConfig(), uint8=True)  # the GPU path
    names = [type(t).__name__ for t in eval_tf.transforms]
    assert names[0] == "TensorCenterResize" and "Resize" not in names and "CenterCrop" not in names
    _, eval_tf = build_transforms(cfg, AugmentConfig(), uint8=False)  # the CPU path: timm's exactly
    assert [type(t).__name__ for t in eval_tf.transforms][:2] == ["Resize", "CenterCrop"]
    _, eval_tf = build_transforms(cfg, AugmentConfig(decoder="pil-draft"), uint8=False)
    assert type(eval_tf.transforms[0]).__name__ == "DecodeCenterBox"
    # the tests' identity eval (32 px, crop 1.0): no resample at all
    cfg32 = dict(cfg, input_size=(3, 32, 32), crop_pct=1.0)
    _, eval_tf = build_transforms(cfg32, AugmentConfig(), uint8=True)
    img = _image(32, 32)
    assert torch.equal(eval_tf(img), torch.from_numpy(np.array(img)).permute(2, 0, 1))
    # a crop larger than the resized image pads: the two-step path
    pad = CenterBoxResize(20, (32, 32), T.InterpolationMode.BILINEAR)(_image(40, 30))
    assert pad.size == (32, 32)


def test_fixed_size_resize_is_left_alone():
    tf = T.Compose([T.Resize((10, 20)), T.CenterCrop(8)])
    assert fuse_eval_resize(tf) is tf


def test_draft_scale():
    assert draft_scale(1024, 768, 224, 224) == 2 and draft_scale(2048, 1536, 224, 224) == 4
    assert draft_scale(320, 427, 224, 224) == 1 and draft_scale(4000, 3000, 100, 100) == 8


def test_decoders(tmp_path):
    path = tmp_path / "a.jpg"
    _image(1024, 768).save(path, quality=92)
    full, f1 = decode(str(path), "pil")
    small, f2 = decode(str(path), "pil-draft", need=(300, 300))
    assert full.size == (1024, 768) and f1 == 1.0
    assert small.size == (512, 384) and f2 == 2.0
    ref = np.asarray(full.resize((512, 384), Image.BILINEAR), dtype=np.int16)
    assert np.abs(ref - np.asarray(small, dtype=np.int16)).mean() < 3  # DCT downscale: decoder noise
    with pytest.raises(UsageError, match="unknown"):
        check_decoder("nvjpeg2")


def test_simplejpeg_missing_or_equal(tmp_path):
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="pip install simplejpeg"):
            check_decoder("simplejpeg")
        return
    check_decoder("simplejpeg")
    path = tmp_path / "a.jpg"
    _image(640, 480).save(path, quality=92)
    pil, _ = decode(str(path), "pil")
    sj, factor = decode(str(path), "simplejpeg")
    assert factor == 1.0 and sj.size == pil.size
    assert np.abs(np.asarray(pil, dtype=np.int16) - np.asarray(sj, dtype=np.int16)).mean() < 1.5


def _jpeg_folder(tmp_path, size=(1024, 768), n=6):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.jpg"
        _image(*size, seed=i).save(p, quality=90)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("decoder", ["pil-draft", "simplejpeg"])
def test_decoder_transforms_draw_timms_crops(tmp_path, decoder):
    """--decoder: the fused decode+crop draws the crop timm's RRC draws (same seed, same random
    calls) and its output stays within decoder noise of timm's; eval likewise."""
    pytest.importorskip("simplejpeg") if decoder == "simplejpeg" else None
    import random

    from emakit.training.data import ImageListDataset

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 0.875}
    paths = _jpeg_folder(tmp_path)
    ref_tf = build_transforms(cfg, AugmentConfig(color_jitter=0.0, hflip=0.0), uint8=True)
    fast_tf = build_transforms(cfg, AugmentConfig(color_jitter=0.0, hflip=0.0, decoder=decoder), uint8=True)
    assert getattr(fast_tf[0], "takes_path", False) and getattr(fast_tf[1], "takes_path", False)
    for k, (ref_t, fast_t) in enumerate(zip(ref_tf, fast_tf)):
        ref_ds, fast_ds = ImageListDataset(paths, [0] * len(paths), ref_t), ImageListDataset(paths, [0] * len(paths), fast_t)
        diffs = []
        for i in range(len(paths)):
            random.seed(i), torch.manual_seed(i)
            a = ref_ds[i][0]
            random.seed(i), torch.manual_seed(i)
            b = fast_ds[i][0]
            a, b = (x[0] if isinstance(x, tuple) else x for x in (a, b))
            assert a.shape == b.shape == (3, 224, 224)
            diffs.append((a.float() - b.float()).abs().mean().item())
        assert max(diffs) < 4.0, (k, diffs)  # the same crop; a different crop differs by tens of levels


def test_decoder_missing_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_simplejpeg(name, *a, **k):
        if name == "simplejpeg":
            raise ImportError("no")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_simplejpeg)
    with pytest.raises(UsageError, match="--decoder simplejpeg: the simplejpeg package is not installed"):
        build_transforms({"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3,
                          "std": (0.5,) * 3, "crop_pct": 1.0}, AugmentConfig(decoder="simplejpeg"))


@pytest.mark.parametrize("box", [(20, 40, 280, 300), (100, 100, 90, 120), (0, 0, 320, 427), (10, 10, 150, 300),
                                 (5, 7, 30, 40)])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_tensor_resized_crop_within_rounding_of_pillows(box, mode):
    import torchvision.transforms.functional as TF

    from emakit.training.decode import tensor_resized_crop

    img = _image(427, 320, seed=box[0])
    interp = T.InterpolationMode(mode)
    ref = np.asarray(TF.resized_crop(img, *box, [224, 224], interp), dtype=np.int16)
    got = tensor_resized_crop(img, *box, (224, 224), interp)
    assert got.dtype == torch.uint8 and got.shape == (3, 224, 224)
    diff = np.abs(ref - got.permute(1, 2, 0).numpy().astype(np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_device_train_transform_uses_tensor_crop_with_timms_draws():
    import random

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 0.875}
    ours = build_transforms(cfg, AugmentConfig(), uint8=True)[0]
    assert type(ours.transforms[0]).__name__ == "TensorResizedCrop"
    from timm.data import create_transform

    timms = create_transform(224, is_training=True, color_jitter=0.4, interpolation="random", use_prefetcher=True)
    host = build_transforms(cfg, AugmentConfig(auto_augment="rand-m9-mstd0.5"), uint8=True)[0]
    assert type(host.transforms[0]).__name__ == "RandomResizedCropAndInterpolation"  # PIL ops follow: unchanged
    for seed in range(8):
        img = _image(427, 320, seed=seed)
        random.seed(seed), torch.manual_seed(seed)
        x, _ = ours(img)
        random.seed(seed), torch.manual_seed(seed)
        for t in timms.transforms:  # timm's without its jitter (ours applies it on the device)
            if type(t).__name__ != "ColorJitter":
                img_ = t(img if t is timms.transforms[0] else img_)
            else:
                t.get_params(t.brightness, t.contrast, t.saturation, t.hue)
        assert (x.float() - img_.float()).abs().max() <= 2


@pytest.mark.parametrize("size", [(427, 320), (320, 427), (1024, 768), (300, 300), (64, 48)])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_tensor_eval_resize_within_rounding_of_timms(size, mode):
    from emakit.training.decode import TensorCenterResize

    interp = T.InterpolationMode(mode)
    img = _image(*size, seed=size[1])
    ref = np.asarray(T.CenterCrop(224)(T.Resize(256, interpolation=interp)(img)), dtype=np.int16)
    got = TensorCenterResize(256, (224, 224), interp)(img)
    assert got.dtype == torch.uint8 and got.shape == (3, 224, 224)
    diff = np.abs(ref - got.permute(1, 2, 0).numpy().astype(np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())


def test_simplejpeg_eval_without_pil_equals_with(tmp_path):
    """The simplejpeg eval path that skips the PIL image gives the pixels of the one through it."""
    pytest.importorskip("simplejpeg")
    from emakit.training.decode import DecodeCenterBox, TensorCenterResize, _Header

    op = TensorCenterResize(256, (224, 224), T.InterpolationMode.BICUBIC)
    for size in ((1024, 768), (427, 320), (320, 427)):
        path = tmp_path / f"{size[0]}.jpg"
        _image(*size).save(path, quality=90)
        fast = DecodeCenterBox(op, "simplejpeg")(str(path))
        header = _Header(str(path), "simplejpeg")
        found = center_box_scale(header, op)
        slow = op(header.decode(found))
        assert torch.equal(fast, slow), size


def center_box_scale(header, op):
    from emakit.training.decode import center_box, draft_scale

    box = center_box(header.width, header.height, op.short, *op.size)[0]
    return draft_scale(int(box[2] - box[0]), int(box[3] - box[1]), op.size[1], op.size[0])
