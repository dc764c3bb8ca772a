"""timm's train.py augmentation and data-loading flags: --aug-repeats, --aug-splits /
--split-bn / --resplit, the transform probabilities, --train-crop-mode, --input-img-mode,
--save-images, --worker-seeding, --use-multi-epochs-loader, --tta.

References are timm's own classes (``RepeatAugSampler``, ``create_transform``) and counts
made here; the loaders are emakit's.
"""
from __future__ import annotations

import collections
import json

import pytest
import torch

from conftest import FAST_ARGS

timm = pytest.importorskip("timm")

from emakit.training.data import (AugSplitDataset, ImageListDataset, RepeatAugSampler,  # noqa: E402
                                  build_train_loader, build_transforms, set_epoch, split_collate)
from emakit.training.distributed import DistInfo  # noqa: E402
from emakit.training.settings import AugmentConfig  # noqa: E402

# timm's train.py (main branch) defaults of these flags
TIMM_DEFAULTS = {"train_crop_mode": None, "color_jitter_prob": None, "grayscale_prob": None,
                 "gaussian_blur_prob": None, "aug_repeats": 0, "aug_splits": 0, "split_bn": False, "resplit": False,
                 "input_img_mode": None, "save_images": False, "worker_seeding": "all",
                 "use_multi_epochs_loader": False, "tta": 0}


def test_flags_parse_with_timms_defaults_and_reach_the_settings():
    from emakit.training.config import build_parser, parse_settings

    by_dest = {a.dest: a for a in build_parser()._actions}
    for dest, default in TIMM_DEFAULTS.items():
        assert by_dest[dest].default == default, dest
    aug = parse_settings(["DATA", "--aug-repeats", "2.5", "--aug-splits", "3", "--split-bn", "--resplit",
                          "--train-crop-mode", "rkrr", "--color-jitter-prob", "0.3", "--grayscale-prob", "0.2",
                          "--gaussian-blur-prob", "0.1", "--input-img-mode", "RGB", "--save-images",
                          "--worker-seeding", "part", "--use-multi-epochs-loader", "--tta", "1"]).data.augment
    assert (aug.aug_repeats, aug.aug_splits, aug.split_bn, aug.resplit, aug.re_num_splits) == (2.5, 3, True, True, 3)
    assert (aug.train_crop_mode, aug.color_jitter_prob, aug.grayscale_prob, aug.gaussian_blur_prob) == (
        "rkrr", 0.3, 0.2, 0.1)
    assert (aug.input_img_mode, aug.save_images, aug.worker_seeding, aug.use_multi_epochs_loader) == (
        "RGB", True, "part", True)


@pytest.mark.parametrize("argv, words", [
    (["--tta", "2"], "--tta 2 is not supported"),
    (["--aug-splits", "1"], "--aug-splits 1"),
    (["--split-bn"], "--split-bn needs --aug-splits"),
    (["--aug-repeats", "0.5"], "--aug-repeats 0.5"),
    (["--aug-splits", "2", "--no-aug"], "--aug-splits needs augmentation"),
    (["--input-img-mode", "XYZ"], "not a PIL image mode"),
    (["--input-img-mode", "L"], "--input-img-mode L gives 1-channel images but the model takes 3"),
])
def test_bad_combinations_are_one_line_exit_2(run_train, tmp_path, argv, words):
    code, out, err = run_train(["--output", tmp_path, "--epochs", "1", *argv])
    errors = [line for line in err.splitlines() if "error" in line]  # (a build-time error follows info lines)
    assert code == 2 and len(errors) == 1 and words in errors[0]
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- --aug-repeats
class _Indexed(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("repeats, world", [(3, 1), (3, 2), (2.5, 3), (1, 4)])
def test_repeat_sampler_gives_timms_indices_on_every_rank(repeats, world):
    from timm.data.distributed_sampler import RepeatAugSampler as TimmRepeatAugSampler

    data = _Indexed(600)
    for rank in range(world):
        ours = RepeatAugSampler(data, world, rank, seed=0, repeats=repeats)  # timm seeds its shuffle with the epoch
        theirs = TimmRepeatAugSampler(data, num_replicas=world, rank=rank, num_repeats=repeats)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert [i for i, _ in ours] == list(theirs)
            assert len(ours) == len(theirs) == 512 // world  # timm: 600 rounded down to 256s, per rank


def test_aug_repeats_3_in_one_process_shows_each_sample_3_times_per_epoch_augmented_differently():
    class Noisy(ImageListDataset):  # the "augmentation": a random number drawn with the sample's seed
        def __getitem__(self, index):
            return torch.tensor([float(index), torch.rand(()).item()]), self.targets[index]

    n = 48
    data = Noisy([None] * n, [0] * n)
    loader = build_train_loader(data, 8, DistInfo(), seed=5, augment=AugmentConfig(aug_repeats=3))
    for epoch in (0, 1):
        set_epoch(loader, epoch, 5)
        rows = torch.cat([x for x, _ in loader])
        counts = collections.Counter(int(i) for i in rows[:, 0])
        assert len(rows) == n and set(counts.values()) == {3} and len(counts) == n // 3
        draws = collections.defaultdict(set)
        for i, r in rows.tolist():
            draws[int(i)].add(r)
        assert all(len(v) == 3 for v in draws.values())  # three copies, three augmentations
    plain = build_train_loader(data, 8, DistInfo(), seed=5)
    set_epoch(plain, 0, 5)
    assert set(collections.Counter(int(i) for x, _ in plain for i in x[:, 0]).values()) == {1}


def test_aug_repeats_resumes_mid_epoch_exactly():
    data = _Indexed(100)
    sampler = RepeatAugSampler(data, 1, 0, seed=7, repeats=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.skip(37)
    assert list(sampler) == whole[37:]
    assert list(sampler) == whole  # the next iteration is whole again


# --------------------------------------------------------------------------- --aug-splits
def test_aug_split_batches_are_clean_split_first_then_each_augmented_split():
    from PIL import Image

    images = [Image.new("RGB", (4, 4), (10 * i, 0, 0)) for i in range(4)]
    data = ImageListDataset(images, [0, 1, 2, 1])

    def base(im):
        return torch.tensor(float(im.getpixel((0, 0))[0]))

    splits = AugSplitDataset(data, 3, (base, lambda x: x + 1000, lambda x: x * 2, lambda x: x * 3))
    x, y = split_collate([splits[i] for i in range(4)])
    assert x.tolist() == [0, 30, 60, 90] + [2000, 2020, 2040, 2060] * 2  # clean final, then final(augment)
    assert y.tolist() == [0, 1, 2, 1] * 3  # timm's fast_collate layout


def test_transform_flags_reach_timms_create_transform():
    config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 1.0, "crop_mode": "center"}
    aug = AugmentConfig(train_crop_mode="rkrr", color_jitter_prob=0.3, grayscale_prob=0.2, gaussian_blur_prob=0.1)
    text = repr(build_transforms(config, aug)[0])
    for op in ("ResizeKeepRatio", "RandomCropOrPad", "RandomApply", "RandomGrayscale", "GaussianBlur"):
        assert op in text, op
    assert "RandomGrayscale" not in repr(build_transforms(config, AugmentConfig())[0])
    base, augment, final, clean = build_transforms(config, AugmentConfig(aug_splits=2, resplit=True, re_prob=1.0,
                                                                        auto_augment="rand-m9"))[0]
    assert "RandAugment" in repr(augment) and "RandAugment" not in repr(base)
    assert "RandomErasing" in repr(final) and "RandomErasing" not in repr(clean)  # --resplit: clean not erased
    _, _, final, clean = build_transforms(config, AugmentConfig(aug_splits=2, re_prob=1.0))[0]
    assert clean is final  # without --resplit every split is erased, as timm


def test_aug_splits_split_bn_and_save_images_train_and_validate_to_the_logged_numbers(run_train, tmp_path,
                                                                                      image_folder, capsys):
    import validate

    no_ema = FAST_ARGS[:FAST_ARGS.index("--model-ema")]  # eval_* are the raw weights' then, in any layout
    code, out, err = run_train([image_folder, *no_ema, "--epochs", "1", "--output", tmp_path, "--experiment", "x",
                                "--aug-splits", "3", "--split-bn", "--resplit", "--reprob", "0.5", "--aa", "rand-m9",
                                "--save-images", "--log-interval", "2"])
    assert code == 0, err
    run = tmp_path / "x"
    assert sorted(p.name for p in run.glob("train-batch-*.jpg")) == ["train-batch-0.jpg", "train-batch-2.jpg"]
    from PIL import Image

    with Image.open(run / "train-batch-0.jpg") as im:  # 3 splits x 8 images in torchvision's 8-wide grid
        assert im.size == (8 * 32, 3 * 32)
    ckpt = torch.load(run / "last.pth.tar", map_location="cpu", weights_only=False)
    assert any(".aux_bn.1." in k for k in ckpt["state_dict"])  # SplitBatchNorm2d: 2 auxiliary BNs
    capsys.readouterr()
    assert validate.main([str(image_folder), "--checkpoint", str(run / "last.pth.tar"), "--no-progress"]) == 0
    record = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][0])
    logged = (run / "summary.csv").read_text().splitlines()
    header, row = logged[0].split(","), logged[1].split(",")
    assert record["top1"] == pytest.approx(float(row[header.index("eval_top1")]))
    assert record["loss"] == pytest.approx(float(row[header.index("eval_loss")]), rel=1e-5)


@pytest.mark.parametrize("on_device", [False, True])  # the CPU transform, and the GPU input path (run on the CPU)
@pytest.mark.parametrize("resplit", [False, True])
def test_resplit_keeps_random_erasing_off_the_clean_split_only(on_device, resplit):
    from PIL import Image

    from emakit.training.data import DeviceLoader, device_random_erasing

    config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 1.0, "crop_mode": "center"}
    aug = AugmentConfig(aug_splits=3, resplit=resplit, re_prob=1.0, hflip=0.0, color_jitter=0.0)
    data = ImageListDataset([Image.new("RGB", (40, 40), (100 + 20 * i, 50, 20)) for i in range(4)], [0, 1, 2, 0])
    data.transform, _ = build_transforms(config, aug, uint8=on_device)
    loader = build_train_loader(data, 4, DistInfo(), seed=0, augment=aug)
    if on_device:
        loader = DeviceLoader(loader, torch.device("cpu"), config["mean"], config["std"],
                              random_erasing=device_random_erasing(aug, torch.device("cpu")))
    set_epoch(loader, 0, 0)
    x, y = next(iter(loader))
    assert x.shape == (12, 3, 32, 32) and y.tolist() == y[:4].tolist() * 3
    flat = x.flatten(2)
    erased = (flat.amax(-1) - flat.amin(-1) > 1e-3).any(-1)  # a solid image stays solid unless erased
    assert erased[4:].all()
    assert erased[:4].any() != resplit  # the clean split: erased as timm without --resplit, not with it
