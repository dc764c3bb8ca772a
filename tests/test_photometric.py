"""ColorJitter / RandomGrayscale on the device (emakit.training.photometric): the same draws as
torchvision's host ops, the same formulas as its functional ops, and a DeviceLoader batch that
matches timm's host pipeline up to uint8 rounding."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from emakit.training import photometric as P
from emakit.training.data import (AugmentConfig, DeviceLoader, ImageListDataset, build_train_loader,
                                  build_transforms, set_epoch)
from emakit.training.distributed import DistInfo

FNS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[0] = x[0, :1]  # a grey image: hue undefined, saturation 0
    return x


def _rows(orders: list[list[int]], factors: list[list[float]]) -> torch.Tensor:
    return torch.tensor([[1.0, *map(float, o), *f] for o, f in zip(orders, factors)], dtype=torch.float64)


def test_given_factors_equal_torchvision_functional_ops():
    x = _images(6)
    perms = [list(p) for p in itertools.permutations(range(4))]
    orders = [perms[i * 5 % 24] for i in range(6)]
    factors = [[0.6, 1.4, 0.7, -0.1], [1.3, 0.65, 1.35, 0.25], [1.0, 1.0, 1.0, 0.0],
               [0.61, 1.2, 0.0, 0.5], [1.39, 0.0, 2.0, -0.5], [0.8, 0.9, 1.1, 0.05]]
    got = P.apply_photometric(x.clone(), _rows(orders, factors))
    for i in range(6):
        want = x[i]
        for fn_id in orders[i]:
            want = FNS[fn_id](want, factors[i][fn_id])
        torch.testing.assert_close(got[i], want, atol=2e-6, rtol=0, msg=f"sample {i}")


def test_off_factor_and_grayscale():
    x = _images(4)
    nan = math.nan
    rows = torch.tensor([[1.0, 3, 2, 1, 0, 0.7, 1.3, nan, nan, 2.0, flag] for flag in (1, 0, 1, 0)],
                        dtype=torch.float64)
    got = P.apply_photometric(x.clone(), rows)
    for i in range(4):
        want = TF.adjust_brightness(TF.adjust_contrast(x[i], 1.3), 0.7)  # order 3, 2, 1, 0: hue, sat off
        if rows[i, -1] > 0.5:
            want = TF.rgb_to_grayscale(want, num_output_channels=3)
        torch.testing.assert_close(got[i], want, atol=2e-6, rtol=0)


def test_draws_are_torchvisions_draws():
    """The host half consumes the generator exactly as ColorJitter + RandomGrayscale do."""
    jitter, gray = T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.RandomGrayscale(0.3)
    draw = P.DrawPhotometric([jitter, gray])
    for seed in range(50):
        torch.manual_seed(seed)
        order, *factors = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        flag = float(torch.rand(1) < 0.3)
        after = torch.rand(1)
        torch.manual_seed(seed)
        _, row = draw(torch.zeros(3, 2, 2))
        assert row.tolist() == [1.0, *map(float, order.tolist()), *factors, 2.0, flag]
        assert torch.rand(1) == after  # nothing more drawn


def test_factor_ranges_and_order_distribution():
    """A fixed-seed sample of 4,800 draws of timm's jitter 0.4: factors uniform on [0.6, 1.4]
    (mean, spread, a KS bound), hue off, each of the 24 orders about 1/24 of the time."""
    jitter = T.ColorJitter(0.4, 0.4, 0.4)
    draw = P.DrawPhotometric([jitter])
    torch.manual_seed(0)
    rows = torch.stack([draw(torch.zeros(1))[1] for _ in range(4800)])
    factors = rows[:, 5:8].numpy()
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert np.all(np.isnan(rows[:, 8].numpy()))
    for col in factors.T:
        assert abs(col.mean() - 1.0) < 0.02 and abs(col.std() - 0.8 / math.sqrt(12)) < 0.01
        ks = np.max(np.abs(np.sort(col) - (0.6 + 0.8 * (np.arange(1, len(col) + 1) / len(col)))))
        assert ks < 0.04  # 1.63 / sqrt(n) * 0.8 range: the 1% KS bound
    counts = {}
    for o in rows[:, 1:5].to(torch.int64).tolist():
        counts[tuple(o)] = counts.get(tuple(o), 0) + 1
    assert len(counts) == 24
    chi2 = sum((c - 200) ** 2 / 200 for c in counts.values())
    assert chi2 < 49.7  # chi-square, 23 degrees of freedom, p = 0.001


def test_split_moves_only_trailing_photometric_ops():
    cfg = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 1.0}
    train, _ = build_transforms(cfg, AugmentConfig(), uint8=True)
    names = [type(t).__name__ for t in train.transforms]
    assert "ColorJitter" not in names and names[-2:] == ["MaybePILToTensor", "DrawPhotometric"]
    host, _ = build_transforms(cfg, AugmentConfig(), uint8=False)
    assert "ColorJitter" in [type(t).__name__ for t in host.transforms]
    # timm keeps ColorJitter(0) (it still draws an order): so does the host half, and the device does nothing
    off, _ = build_transforms(cfg, AugmentConfig(color_jitter=0.0), uint8=True)
    _, row = off.transforms[-1](torch.zeros(3, 2, 2))
    assert row[5:].isnan().all()
    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(P.apply_photometric(x.clone(), row[None]), x)


def _dataset(n: int = 16, size: int = 40) -> ImageListDataset:
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        coarse = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse, "RGB").resize((size, size + 8), Image.BICUBIC))
    return ImageListDataset(images, [i % 2 for i in range(n)])


def test_device_loader_matches_host_pipeline():
    """Same seed: the DeviceLoader batch (jitter on the 'device', here the CPU) equals timm's host
    pipeline (PIL jitter, ToTensor, Normalize) within uint8 rounding: the same crops, flips,
    factors and orders."""
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    cfg = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": mean, "std": std, "crop_pct": 1.0}
    aug = AugmentConfig(color_jitter=0.4)
    dist = DistInfo()
    batches = {}
    for uint8 in (False, True):
        ds = _dataset()
        ds.transform = build_transforms(cfg, aug, uint8=uint8)[0]
        loader = build_train_loader(ds, 8, dist, seed=3, workers=0)
        if uint8:
            loader = DeviceLoader(loader, torch.device("cpu"), mean, std)
        set_epoch(loader, 0, 3)
        batches[uint8] = [x for x, _ in loader]
    for host, dev in zip(batches[False], batches[True]):
        diff = (host - dev).abs() * 0.25 * 255  # in levels of 255
        assert diff.mean() < 2.0 and diff.max() <= 6, (diff.mean(), diff.max())  # Pillow rounds (down) after each op
    # and it is jitter: without it the two differ by much more than rounding
    plain = [normalize for normalize, _ in DeviceLoader(
        build_train_loader(_with(build_transforms(cfg, AugmentConfig(color_jitter=0.0), uint8=True)[0]), 8,
                           dist, seed=3, workers=0), torch.device("cpu"), mean, std)]
    assert max(((a - b).abs() * 0.25 * 255).mean() for a, b in zip(plain, batches[True])) > 3


def _with(transform) -> ImageListDataset:
    ds = _dataset()
    ds.transform = transform
    return ds


@pytest.mark.parametrize("bad", [T.GaussianBlur(3)])
def test_draw_refuses_other_ops(bad):
    with pytest.raises(TypeError):
        P.DrawPhotometric([bad])


def test_workers_0_and_2_give_the_same_batches_and_keep_the_callers_rng(image_folder):
    """Per-sample seeds: the main process (workers 0, one RNG save/restore per batch) and two
    worker processes give the same batches (jitter drawn on the host, applied by DeviceLoader),
    and the caller's generators are where they were after a workers-0 epoch."""
    import random

    from emakit.training.data import build_datasets

    cfg = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 1.0}
    batches = {}
    for workers in (0, 2):
        ds = build_datasets(str(image_folder)).train
        ds.transform = build_transforms(cfg, AugmentConfig(), uint8=True)[0]
        loader = DeviceLoader(build_train_loader(ds, 8, DistInfo(), seed=5, workers=workers), torch.device("cpu"),
                              (0.5,) * 3, (0.5,) * 3)
        random.seed(11), np.random.seed(11), torch.manual_seed(11)
        set_epoch(loader, 1, 5)
        batches[workers] = [(x, y) for x, y in loader]
        if workers == 0:
            assert (random.random(), np.random.rand(), torch.rand(1).item()) == _after_seed(11)
    assert len(batches[0]) == 3
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def _after_seed(seed: int) -> tuple:
    import random

    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_main_process_saves_the_rng_once_per_batch(monkeypatch):
    import random

    from emakit.training import data as D

    calls = []
    real = random.getstate
    monkeypatch.setattr(D.random, "getstate", lambda: calls.append(1) or real())
    ds = _dataset()
    ds.transform = T.PILToTensor()
    loader = build_train_loader(ds, 8, DistInfo(), seed=0, workers=0)
    set_epoch(loader, 0, 0)
    assert len(list(loader)) == 2 and len(calls) == 2
