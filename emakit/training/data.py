"""Datasets, transforms and loaders for ``train.py`` (and ``validate.py``).

Two sources: an ImageFolder root in the imagenette2-320 layout (``root/train/<class>/*.jpg``
and ``root/val/<class>/*.jpg`` or ``root/validation/...``), or, with no data argument, the
embedded default: scikit-learn's bundled 8x8 digits (1797 images, no download), split
80/20 stratified with a fixed seed. Transforms are timm's (``create_transform``). Loaders
are plain DataLoaders with samplers that make every epoch a pure function of (seed, epoch),
so a resumed run sees the same batches, and an evaluation sampler that gives each rank a
disjoint share of the validation set, so every sample is counted exactly once.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import UsageError, one_line
from .distributed import DistInfo
from .lifecycle import ignore_stop_signals, loader_workers_started
from .decode import fuse_eval_resize, tensor_crop_for_device, with_decoder
from .photometric import apply_photometric, split_photometric
from .settings import AugmentConfig

__all__ = [
    "BadImageError", "DataSplits", "ImageListDataset", "DIGITS_NAME", "load_digits_splits",
    "load_image_folder", "class_folders", "scan_split", "build_datasets", "check_images", "build_transforms",
    "ShardSampler", "ResumableSampler", "RepeatAugSampler", "AugSplitDataset", "split_collate", "ImageSavingLoader",
    "image_mode",
    "StopSafeLoader", "build_train_loader", "build_eval_loader", "epoch_seed", "sample_seed", "SeededDataset",
    "DeviceLoader", "normalize_uint8", "device_random_erasing", "resolve_data_config_for", "set_epoch",
    "AugmentConfig", "shown_path", "flip_labels", "VAL_SPLITS",
]

_log = logging.getLogger(__name__)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_NAME = "digits (scikit-learn's bundled 8x8 handwritten digits)"
VAL_SPLITS = ("val", "validation")


class BadImageError(UsageError):
    """An image file that cannot be read; the message names the file."""


# What PIL raises for a file it cannot read: damaged bytes, an unknown format, or a header
# claiming more than twice Image.MAX_IMAGE_PIXELS (a decompression bomb, refused unread).
_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def shown_path(path: str) -> str:
    """``path`` safe to print and log: bytes of a non-UTF-8 file name (which Python keeps as
    lone surrogates) appear as ``\\xff`` escapes instead of breaking a UTF-8 log file."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class DataSplits:
    """The train and validation datasets, their class names and a line saying what they are."""

    train: "ImageListDataset"
    val: "ImageListDataset"
    classes: list[str]
    description: str


class ImageListDataset(Dataset):
    """``(image, target)`` pairs from files or in-memory PIL images, with a settable transform.

    ``items[i]`` is a file path or a ``PIL.Image``; a file that cannot be decoded raises
    :class:`BadImageError` naming it. ``img_mode``: the PIL mode every image is converted to
    (timm's ``--input-img-mode``; ``L`` for a 1-channel model).
    """

    img_mode = "RGB"

    def __init__(self, items: Sequence[str | Image.Image], targets: Sequence[int],
                 transform: Callable | None = None) -> None:
        if len(items) != len(targets):
            raise ValueError("items and targets differ in length")
        self.items = list(items)
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Image.Image:
        """The image at ``index``, decoded, in ``img_mode`` (RGB unless set)."""
        item = self.items[index]
        if isinstance(item, Image.Image):
            return item if item.mode == self.img_mode else item.convert(self.img_mode)
        try:
            with Image.open(item) as im:
                return im.convert(self.img_mode)
        except _IMAGE_ERRORS as e:
            raise BadImageError(f"cannot read image {shown_path(item)}: {_reason(e)} "
                                "(fix or delete it, or pass --skip-bad-images)") from None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        item = self.items[index]
        if isinstance(item, str) and getattr(self.transform, "takes_path", False):  # --decoder: it decodes
            try:
                return self.transform(item), self.targets[index]  # type: ignore[misc]
            except _IMAGE_ERRORS as e:
                raise BadImageError(f"cannot read image {shown_path(item)}: {_reason(e)} "
                                    "(fix or delete it, or pass --skip-bad-images)") from None
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def load_digits_splits(val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's digits as RGB PIL images, split stratified and deterministically."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=digits.target,
                                          random_state=seed)
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    classes = [str(c) for c in range(10)]

    def subset(ix: Any) -> ImageListDataset:
        return ImageListDataset([images[i] for i in ix], [int(digits.target[i]) for i in ix])

    desc = (f"embedded dataset: {DIGITS_NAME}, {len(train_idx)} train / {len(val_idx)} val images, "
            f"stratified split seed {seed}")
    return DataSplits(subset(train_idx), subset(val_idx), classes, desc)


def _list(folder: str) -> list[os.DirEntry]:
    """The entries of ``folder`` by name; a folder that cannot be listed is an error naming it."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise UsageError(f"cannot list {shown_path(folder)}: {e.strerror or e}; fix its permissions "
                         "or move it out of the data folder") from None


def class_folders(split_dir: str) -> list[str]:
    """The class folder names of a split, sorted (their index is the label), hidden ones left
    out; an unlistable folder is a ``UsageError``."""
    return [e.name for e in _list(split_dir) if e.is_dir() and not e.name.startswith(".")]


def _folder_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _image_files(class_dir: str, seen: set[tuple[int, int]] | None = None) -> list[str]:
    """Image files under ``class_dir`` in sorted order, files of a folder before its subfolders.

    Symlinked folders are followed once: a folder already scanned (``seen``: the split's
    class folders and every folder visited so far) is skipped with a warning, so a symlink
    loop or a second path to a folder never counts its images twice. Entries with an image
    name that are not regular files (a FIFO, a socket, a broken link) are skipped with a
    warning: opening a FIFO would wait forever.
    """
    seen = set() if seen is None else seen
    seen.add(_folder_key(class_dir))
    files, subfolders = [], []
    for entry in _list(class_dir):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subfolders.append(entry.path)
        elif entry.name.lower().endswith(IMG_EXTENSIONS):
            if entry.is_file():
                files.append(entry.path)
            else:
                _log.warning("skipping %s: not a regular file (a FIFO, socket, device or broken link)",
                             shown_path(entry.path))
    for folder in subfolders:
        if _folder_key(folder) in seen:
            _log.warning("not following %s: it leads to %s, which is already scanned (a symlink loop or a "
                         "second path to one folder); its images are counted once", shown_path(folder),
                         shown_path(os.path.realpath(folder)))
            continue
        files += _image_files(folder, seen)
    return files


def scan_split(split_dir: str, class_to_idx: dict[str, int] | None) -> tuple[list[str], list[int], list[str]]:
    """(image paths, labels, class folder names) of one split folder.

    Labels come from ``class_to_idx`` (the train split's classes, so val labels match
    train's), or from the split's own sorted class folders when it is None. A split without
    class folders or images, a class the mapping lacks, or two class folders that are one
    folder is a ``UsageError``; symlink loops and non-regular files are skipped with a
    warning (see ``_image_files``).
    """
    classes = class_folders(split_dir)
    if not classes:
        raise UsageError(f"{shown_path(split_dir)} has no class folders: expected "
                         f"{shown_path(split_dir)}/<class name>/<image files>")
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in classes if c not in class_to_idx]
    if unknown:
        raise UsageError(f"{shown_path(split_dir)} has class folders that the train split lacks: "
                         f"{', '.join(map(shown_path, unknown[:5]))}")
    folders = [os.path.join(split_dir, c) for c in classes]
    first: dict[tuple[int, int], str] = {}
    for folder in folders:
        same = first.setdefault(_folder_key(folder), folder)
        if same != folder:
            raise UsageError(f"class folders {shown_path(same)} and {shown_path(folder)} are the same folder "
                             "(a symlink): its images would carry two labels; remove one of them")
    seen = set(first)
    paths, targets = [], []
    for c, folder in zip(classes, folders):
        files = _image_files(folder, seen)
        if not files:
            _log.warning("class folder %s has no image files (%s)", shown_path(folder), ", ".join(IMG_EXTENSIONS))
        paths += files
        targets += [class_to_idx[c]] * len(files)
    if not paths:
        raise UsageError(f"{shown_path(split_dir)} has class folders but no image files ({', '.join(IMG_EXTENSIONS)})")
    return paths, targets, classes


def _check_classes(split_dir: str, classes: list[str], targets: list[int]) -> None:
    """A training split needs images of at least two classes: with one, every prediction is
    right by construction and nothing is learned."""
    present = sorted(set(targets))
    if len(present) < 2:
        only = shown_path(classes[present[0]]) if present else "none"
        raise UsageError(f"{shown_path(split_dir)} has images of one class only ({only}): classification "
                         "needs at least two class folders with images")


def _find_split(root: str, name: str | None, kind: str) -> str:
    names = [name] if name else list(VAL_SPLITS)
    for n in names:
        path = os.path.join(root, n)
        if os.path.isdir(path):
            return path
    wanted = " or ".join(f"{n}/" for n in names)
    raise UsageError(f"{root} has no {kind} folder {wanted}: expected the imagenette2-320 layout "
                     f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")


def load_image_folder(root: str, train_split: str = "train", val_split: str | None = None) -> DataSplits:
    """Scan an ImageFolder root; raises ``UsageError`` for a missing folder or split, a split
    without class folders or images, or validation classes the train split lacks."""
    if not os.path.exists(root):
        raise UsageError(f"data folder {root} does not exist (omit it to train on the embedded digits dataset)")
    if not os.path.isdir(root):
        raise UsageError(f"data path {root} is not a folder: expected an ImageFolder root with train/ and val/")
    train_dir = _find_split(root, train_split, "train")
    val_dir = _find_split(root, val_split, "validation")
    train_paths, train_targets, classes = scan_split(train_dir, None)
    _check_classes(train_dir, classes, train_targets)
    val_paths, val_targets, _ = scan_split(val_dir, {c: i for i, c in enumerate(classes)})
    desc = (f"ImageFolder {root}: {len(train_paths)} train images in {os.path.basename(train_dir)}/, "
            f"{len(val_paths)} val images in {os.path.basename(val_dir)}/, {len(classes)} classes")
    return DataSplits(ImageListDataset(train_paths, train_targets),
                      ImageListDataset(val_paths, val_targets), classes, desc)


def _reason(error: BaseException) -> str:
    if isinstance(error, Image.DecompressionBombError):
        return (f"{one_line(error)} (a decompression bomb, or raise PIL.Image.MAX_IMAGE_PIXELS "
                "if the image is real)")
    return one_line(error) or type(error).__name__


def _check_one(path: str, decode: bool) -> str | None:
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
        return None
    except _IMAGE_ERRORS as e:
        return _reason(e)


# Files slower than this to check (large decodes, network storage) are checked by a thread
# pool; faster ones (small local files) in the calling thread, where the pool's hand-offs of
# the GIL cost more than they save (800 64-px JPEGs, header only: 0.05 s in one thread,
# 0.10 s with 2 threads, 0.13 s with a future per file).
_THREADED_CHECK_S = 0.5e-3
_CHECK_CHUNK = 64


def check_images(dataset: ImageListDataset, decode: bool, threads: int = 4) -> list[tuple[int, str]]:
    """``(index, reason)`` for every file that cannot be opened (header only) or, with
    ``decode``, fully decoded. In-memory images are skipped. The first 64 files are checked
    in this thread; the rest too where those took under 0.5 ms a file, else by ``threads``
    threads, 64 files to a task."""
    paths = [(i, p) for i, p in enumerate(dataset.items) if isinstance(p, str)]
    chunks = [paths[k:k + _CHECK_CHUNK] for k in range(0, len(paths), _CHECK_CHUNK)]

    def check(chunk: list[tuple[int, str]]) -> list[tuple[int, str | None]]:
        return [(i, _check_one(p, decode)) for i, p in chunk]

    if not chunks:
        return []
    done = [check(chunks[0][:1])]  # the first file pays for loading PIL's plugins: not timed
    timed, start = chunks[0][1:], time.perf_counter()
    done.append(check(timed))
    slow = time.perf_counter() - start > _THREADED_CHECK_S * len(timed)
    if threads > 1 and len(chunks) > 1 and slow:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            done += pool.map(check, chunks[1:])
    else:
        done += map(check, chunks[1:])
    return [(i, reason) for chunk in done for i, reason in chunk if reason is not None]


def _drop_bad(dataset: ImageListDataset, skip_bad: bool, threads: int) -> None:
    bad = check_images(dataset, decode=skip_bad, threads=threads)
    if bad and not skip_bad:
        index, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BadImageError(f"cannot read image {shown_path(dataset.items[index])}: {reason}{more} "
                            "(fix or delete it, or pass --skip-bad-images)")
    for index, reason in bad:
        _log.warning("skipping unreadable image %s: %s", shown_path(dataset.items[index]), reason)
    if bad:
        _log.warning("skipped %d unreadable image(s) of %d", len(bad), len(dataset))
    drop = {i for i, _ in bad}
    if drop:
        keep = [i for i in range(len(dataset)) if i not in drop]
        dataset.items = [dataset.items[i] for i in keep]
        dataset.targets = [dataset.targets[i] for i in keep]


def build_datasets(data: str | None, train_split: str = "train", val_split: str | None = None,
                   skip_bad_images: bool = False, threads: int = 4) -> DataSplits:
    """The train/val datasets for ``data`` (None: embedded digits), images checked up front.

    Without ``skip_bad_images`` every file's header is read (cheap) and the first bad file is
    an error; with it every file is decoded and bad ones are dropped with a warning.
    """
    if data is None:
        return load_digits_splits()
    splits = load_image_folder(data, train_split, val_split)
    for ds in (splits.train, splits.val):
        _drop_bad(ds, skip_bad_images, threads)
        if len(ds) == 0:
            raise UsageError(f"{shown_path(data)}: no readable images left in a split after skipping bad ones")
    _check_classes(os.path.join(data, train_split), splits.classes, splits.train.targets)
    return splits


def flip_labels(dataset: ImageListDataset, fraction: float, num_classes: int, seed: int) -> list[int]:
    """Replace ``round(fraction * len(dataset))`` training labels by a different class,
    chosen uniformly among the ``num_classes - 1`` others (``--label-noise``, symmetric
    label noise as in the noisy-label literature). Which samples and which new labels are a
    pure function of ``seed``, so a resumed run sees the same flips. Returns the indices
    flipped. Only the training split gets this; validation labels stay clean.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    g = torch.Generator().manual_seed(int(seed))
    count = int(round(fraction * len(dataset)))
    flipped = sorted(torch.randperm(len(dataset), generator=g)[:count].tolist())
    shifts = torch.randint(1, num_classes, (count,), generator=g).tolist()
    for index, shift in zip(flipped, shifts):
        dataset.targets[index] = (dataset.targets[index] + shift) % num_classes
    return flipped


def resolve_data_config_for(model: Any, *, img_size: int | None = None, crop_pct: float | None = None,
                            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                            interpolation: str = "") -> dict[str, Any]:
    """timm's ``resolve_data_config`` for ``model`` with the given overrides (None/'' = model default)."""
    from timm.data import resolve_data_config

    given = {"img_size": img_size, "crop_pct": crop_pct, "mean": mean, "std": std, "interpolation": interpolation}
    return resolve_data_config({k: v for k, v in given.items() if v not in (None, "")}, model=model)


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's RandAugment/AutoAugment posterize op as Pillow <= 12 did it: ``bits_to_keep`` 0
    gives a black image. Pillow 13 refuses 0 bits (``ValueError: bits must be between or equal
    to 1 and 8``), which RandAugment's ``inc1`` policies ask for in about 0.2% of calls, and
    timm's own op passes it through: one such call ends the run in its first epoch."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _zero_bit_posterize_is_black() -> None:
    """Point timm's posterize ops at :func:`posterize` (before transforms are built: each op
    keeps the function it finds in ``NAME_TO_OP`` when it is made). Idempotent."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = posterize


def build_transforms(data_config: dict[str, Any], aug: AugmentConfig, *, uint8: bool = False,
                     crop_border_pixels: int | None = None) -> tuple[Callable, Callable]:
    """(train, eval) transforms from timm's ``create_transform`` and a resolved data config.

    The eval transform uses the config's ``crop_mode`` (timm's ``resolve_data_config``: the
    flag, else the model's pretrained cfg) and ``crop_border_pixels`` (validate.py's flag).

    ``uint8=True`` (the GPU input path, :class:`DeviceLoader`): the transforms stop at a
    ``uint8`` tensor; normalisation and random erasing are left to the device, and so are the
    photometric ops timm puts after the crop (ColorJitter, RandomGrayscale): the train
    transform draws their parameters and yields ``(uint8 image, parameters)``
    (:func:`.photometric.split_photometric`), the device applies them; with nothing but
    flips left after the random resized crop, its resample is torch's uint8 kernel
    (:func:`.decode.tensor_crop_for_device`, within a few levels of Pillow's: up to 5 where a small crop is upscaled), and so is the eval
    transform's resize (:func:`.decode.fuse_eval_resize`). Without ``uint8`` (the CPU path)
    the eval transform is timm's exactly, so validate.py on the CPU reproduces timm's figures
    to the bit. ``aug.decoder`` other than pil: the first op of each decodes the file itself,
    at a DCT scale where the crop is shrunk anyway (:func:`.decode.with_decoder`).

    The train transform takes every augmentation flag timm's ``create_transform`` takes
    (``--train-crop-mode``, ``--color-jitter-prob``, ``--grayscale-prob``,
    ``--gaussian-blur-prob``, ...). With ``--aug-splits N`` it is the tuple (base, augment,
    final, clean final) that :class:`AugSplitDataset` applies.
    """
    from timm.data import create_transform

    _zero_bit_posterize_is_black()
    train_interp = data_config["interpolation"] if aug.no_aug or not aug.interpolation else aug.interpolation
    train_kwargs = dict(
        is_training=True, no_aug=aug.no_aug, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip,
        vflip=aug.vflip, color_jitter=aug.color_jitter, auto_augment=aug.auto_augment, interpolation=train_interp,
        mean=data_config["mean"], std=data_config["std"], re_prob=aug.re_prob, re_mode=aug.re_mode,
        re_count=aug.re_count, re_num_splits=aug.re_num_splits, train_crop_mode=aug.train_crop_mode,
        color_jitter_prob=aug.color_jitter_prob, grayscale_prob=aug.grayscale_prob,
        gaussian_blur_prob=aug.gaussian_blur_prob, use_prefetcher=uint8, separate=aug.aug_splits > 0)
    train_tf: Any = create_transform(data_config["input_size"], **train_kwargs)
    if aug.aug_splits > 1:
        # (base, augment, final, clean final): --resplit keeps random erasing off the clean split
        # also on the CPU, where timm's per-image erasing cannot tell the splits apart
        clean = create_transform(data_config["input_size"], **{**train_kwargs, "re_prob": 0.0})[2] \
            if aug.resplit and aug.re_prob > 0 and not uint8 else train_tf[2]
        train_tf = (*train_tf, clean)
    if uint8 and aug.aug_splits == 0:  # photometric ops and the crop's resample on the device
        train_tf = tensor_crop_for_device(split_photometric(train_tf))
    eval_tf = create_transform(
        data_config["input_size"], is_training=False, interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"), crop_border_pixels=crop_border_pixels, use_prefetcher=uint8,
    )
    if uint8 or aug.decoder != "pil":  # the CPU path keeps timm's eval transform exactly (validate.py's parity)
        eval_tf = fuse_eval_resize(eval_tf, tensor=uint8)
    return with_decoder(train_tf, aug.decoder), with_decoder(eval_tf, aug.decoder)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: disjoint shares covering the dataset once, with no
    padding (unlike ``DistributedSampler``), so distributed evaluation counts are exact."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(index, sample_seed)`` pairs, the seed of every
    sample a pure function of (seed, epoch, index) (see :class:`SeededDataset`), and that can
    start one epoch part-way (a mid-epoch resume): after :meth:`skip` ``n``, the next
    iteration yields this epoch's samples from position ``n`` on, without loading the ones
    before; later iterations are whole again. ``len`` stays the epoch's full length, so step
    counts and schedules do not change."""

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._start = 0

    def skip(self, n: int) -> None:
        """Leave out the first ``n`` samples of the next iteration only."""
        self._start = int(n)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        start, self._start = self._start, 0
        base = epoch_seed(self.seed, self.epoch)
        indices = list(super().__iter__())[start:]
        return ((i, sample_seed(base, i)) for i in indices)


class RepeatAugSampler(ResumableSampler):
    """timm's ``RepeatAugSampler`` (repeated augmentation, ``--aug-repeats N``), resumable
    like :class:`ResumableSampler`: the epoch's order is a pure function of (seed, epoch), so
    :meth:`skip` resumes mid-epoch exactly.

    Each epoch shuffles the images, repeats each N times in a row (a fraction N repeats the
    first images of the shuffle one more time, as timm), pads to a multiple of the process
    count, gives rank r the positions ``r, r + world, ...`` and keeps the first
    ``floor(images rounded down to 256 / world)`` of them (timm's ``selected_round=256``; a
    dataset under 256 images is not rounded, where timm would keep none). Each copy of an
    image gets its own augmentation seed (copy 0 the seed :class:`ResumableSampler` gives), so
    the copies differ. timm refuses a single process; here its copies land in one batch.
    """

    SELECTED_ROUND = 256

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int, repeats: float) -> None:
        super().__init__(dataset, world_size, rank, seed)
        self.repeats = float(repeats)
        n = len(dataset)  # type: ignore[arg-type]
        self.num_samples = math.ceil(n * self.repeats / world_size)
        self.total_size = self.num_samples * world_size
        rounded = n // self.SELECTED_ROUND * self.SELECTED_ROUND if n >= self.SELECTED_ROUND else n
        self.num_selected = rounded // world_size

    def __len__(self) -> int:
        return self.num_selected

    def positions(self) -> list[tuple[int, int]]:
        """This rank's ``(index, copy)`` pairs of the epoch, in order."""
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g)
        if self.repeats.is_integer():
            indices = torch.repeat_interleave(order, int(self.repeats)).tolist()
        else:
            indices = order[torch.tensor([int(i // self.repeats) for i in range(math.ceil(self.repeats * n))])].tolist()
        indices += indices[:self.total_size - len(indices)]
        seen: dict[int, int] = {}
        pairs = []
        for i in indices:
            pairs.append((i, seen.get(i, 0)))
            seen[i] = seen.get(i, 0) + 1
        return pairs[self.rank:self.total_size:self.num_replicas][:self.num_selected]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        start, self._start = self._start, 0
        base, n = epoch_seed(self.seed, self.epoch), len(self.dataset)  # type: ignore[arg-type]
        return ((i, sample_seed(base, i + copy * n)) for i, copy in self.positions()[start:])


class AugSplitDataset(Dataset):
    """timm's ``AugMixDataset`` (``--aug-splits N``): item ``i`` is N versions of image ``i``
    after the base transform (the random crop and flip): the first only finished (the clean
    split), the others augmented (``--aa``, color jitter, ...) then finished; ``transforms``
    is :func:`build_transforms`' tuple (base, augment, final, clean final)."""

    def __init__(self, dataset: ImageListDataset, num_splits: int, transforms: Sequence[Callable]) -> None:
        self.dataset, self.num_splits = dataset, num_splits
        self.base, self.augment, self.final, self.clean_final = transforms

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tuple[Any, ...], int]:
        x = self.base(self.dataset.load(index))
        splits = [self.clean_final(x)] + [self.final(self.augment(x)) for _ in range(self.num_splits - 1)]
        return tuple(splits), self.dataset.targets[index]


def split_collate(batch: Sequence[tuple[Sequence[torch.Tensor], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of :class:`AugSplitDataset` items as timm's ``fast_collate`` lays it out: split
    0 of every image, then split 1 of every image, ...; the targets repeated to match."""
    from torch.utils.data import default_collate

    splits = len(batch[0][0])
    images = torch.cat([default_collate([b[0][j] for b in batch]) for j in range(splits)])
    targets = default_collate([b[1] for b in batch])
    return images, targets.repeat(splits)


class SeededDataset(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` reseeds python's ``random``,
    numpy's and torch's global generators with ``seed`` before loading and transforming
    item ``index``.

    Random augmentations then depend on (seed, epoch, index) only, not on which worker
    process loads the sample, how many there are, or what they loaded before: data-loader
    workers can persist across epochs and a resumed run still sees bit-identical batches
    (also with a different ``--workers``). Outside a worker process (``workers=0``) the
    caller's generator states are restored afterwards, so the training loop's own random
    numbers (dropout, mixup) do not depend on the data: once per batch, since the loader
    fetches a batch through :meth:`__getitems__` (saving and restoring the three states per
    sample cost about 0.09 ms, a tenth of timm's per-core pipeline).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        """The samples of ``keys`` (one batch: DataLoader calls this once per batch)."""
        if torch.utils.data.get_worker_info() is not None:
            return [self._load(key) for key in keys]
        saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        try:
            return [self._load(key) for key in keys]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.set_rng_state(saved[2])

    def _load(self, key: tuple[int, int]) -> Any:
        index, seed = key
        _seed_globals(seed)
        return self.dataset[index]


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)


def sample_seed(base: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in the epoch whose :func:`epoch_seed` is ``base``."""
    return (base * 1_000_003 + index) % (2**63 - 1)


class StopSafeLoader(DataLoader):
    """A DataLoader whose worker processes ignore SIGINT, SIGHUP, and a SIGTERM not sent by
    their main process, from their start (:func:`.lifecycle.loader_workers_started`,
    :func:`.lifecycle.ignore_stop_signals`): a signal to the whole process group (``timeout``,
    Slurm, torchrun) is the main process's to act on, and PyTorch's worker would otherwise die
    of it and fail the run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("num_workers", 0) > 0:
            kwargs["worker_init_fn"] = ignore_stop_signals
        super().__init__(*args, **kwargs)

    def __iter__(self) -> Any:
        """The loader's iterator; worker processes (if any) start with the stop signals blocked."""
        with loader_workers_started():
            return super().__iter__()


def build_train_loader(dataset: Dataset, batch_size: int, dist: DistInfo, *, seed: int, workers: int = 0,
                       pin_memory: bool = False, collate_fn: Callable | None = None,
                       augment: AugmentConfig | None = None) -> DataLoader:
    """Shuffled, sharded training loader; call :func:`set_epoch` before each epoch.

    The shuffle is ``DistributedSampler``'s (also for one process) with ``seed + epoch``;
    the last incomplete batch is dropped, as timm does, so every rank makes the same number
    of steps. The random augmentations of each sample are seeded from (seed, epoch, index)
    (:class:`SeededDataset`), so the ``workers`` worker processes persist across epochs
    (no start-up per epoch) and every epoch is still a pure function of (seed, epoch).
    ``augment``: ``--aug-repeats`` (:class:`RepeatAugSampler`) and ``--aug-splits``
    (:class:`AugSplitDataset`, :func:`split_collate`; the dataset's transform is then
    :func:`build_transforms`' tuple).
    """
    if augment is not None and augment.aug_repeats:
        sampler: ResumableSampler = RepeatAugSampler(dataset, dist.world_size, dist.rank, seed, augment.aug_repeats)
    else:
        sampler = ResumableSampler(dataset, dist.world_size, dist.rank, seed)
    if augment is not None and augment.aug_splits > 1:
        dataset = AugSplitDataset(dataset, augment.aug_splits, dataset.transform)  # type: ignore[attr-defined]
        collate_fn = collate_fn or split_collate
    per_rank = len(sampler)
    if per_rank < batch_size:
        raise UsageError(f"the train split has {len(dataset)} images, {per_rank} per process: fewer than "  # type: ignore[arg-type]
                         f"one batch of {batch_size}; lower -b/--batch-size")
    return StopSafeLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                          pin_memory=pin_memory, drop_last=True, collate_fn=collate_fn,
                          generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)


def build_eval_loader(dataset: Dataset, batch_size: int, dist: DistInfo, *, workers: int = 0,
                      pin_memory: bool = False) -> DataLoader:
    """In-order evaluation loader over this rank's disjoint share of ``dataset``; its
    ``workers`` worker processes persist across passes."""
    sampler = ShardSampler(len(dataset), dist.rank, dist.world_size)  # type: ignore[arg-type]
    return StopSafeLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          pin_memory=pin_memory, drop_last=False, persistent_workers=workers > 0)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, rank): a resumed run reseeds
    every random number generator exactly as the uninterrupted run did at that epoch."""
    return ((seed * 1_000_003 + epoch) * 10_007 + rank) % (2**63 - 1)


def set_epoch(loader: Any, epoch: int, seed: int, rank: int = 0) -> None:
    """Make ``epoch``'s shuffling (same on all ranks, as ``DistributedSampler`` needs) and
    augmentation seeds depend on (seed, epoch) only, and the workers' base seed on
    (seed, epoch, rank). ``loader`` is a DataLoader or a :class:`DeviceLoader` around one."""
    loader = loader.loader if isinstance(loader, DeviceLoader) else loader
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed(seed, epoch, rank))


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` images (N, C, H, W) -> ``(x / 255 - mean) / std`` in ``dtype``, wherever
    ``images`` live. The same operations in the same order as torchvision's ``ToTensor``
    followed by ``Normalize`` (the CPU transform), so the result is the same to the bit;
    ``mean`` and ``std`` are (C, 1, 1) tensors of ``dtype`` on the images' device."""
    return images.to(dtype).div_(255).sub_(mean).div_(std)


class DeviceLoader:
    """The GPU input path (timm's ``PrefetchLoader`` is the reference): a DataLoader of
    ``uint8`` batches (:func:`build_transforms` with ``uint8=True``, pinned memory) whose
    batches are copied to ``device`` without blocking, normalised there
    (:func:`normalize_uint8`) and randomly erased there when ``random_erasing`` is given
    (timm's ``RandomErasing`` built for ``device``). Batches whose images come as
    ``(uint8 images, parameter rows)`` (a train transform from :func:`build_transforms`
    with ``uint8=True`` and colour jitter or grayscale) get those photometric ops applied
    on the device first, each sample with its own drawn factors
    (:func:`.photometric.apply_photometric`). On CUDA the next batch is copied and
    normalised on a side stream while the current one is used; batches must be consumed
    on the stream that is current when the iterator advances. On other devices it works
    the same without the side stream (used by the tests on the CPU).

    ``len``, ``sampler``, ``dataset`` and ``generator`` are those of the wrapped loader.
    """

    def __init__(self, loader: DataLoader, device: torch.device, mean: Sequence[float], std: Sequence[float], *,
                 dtype: torch.dtype = torch.float32, random_erasing: Callable | None = None) -> None:
        self.loader, self.device, self.dtype = loader, torch.device(device), dtype
        self.mean = torch.tensor(list(mean), dtype=dtype, device=self.device).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=dtype, device=self.device).view(-1, 1, 1)
        self.random_erasing = random_erasing
        self._stream: Any = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        """The wrapped loader's sampler."""
        return self.loader.sampler

    @property
    def dataset(self) -> Any:
        """The wrapped loader's dataset."""
        return self.loader.dataset

    @property
    def generator(self) -> Any:
        """The wrapped loader's generator."""
        return self.loader.generator

    def _prepare(self, images: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = None
        if isinstance(images, (tuple, list)):
            images, params = images
        images = images.to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        if params is None:
            images = normalize_uint8(images, self.mean, self.std, self.dtype)
        else:  # float32 in [0, 1], the photometric ops, then the normalisation (as normalize_uint8 does it)
            images = apply_photometric(images.to(torch.float32).div_(255), params)
            images = images.to(self.dtype).sub_(self.mean).div_(self.std)
        if self.random_erasing is not None:
            images = self.random_erasing(images)
        return images, target

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cuda = self.device.type == "cuda"
        if cuda and self._stream is None:
            # one stream for the loader's life: the caching allocator pools blocks per stream
            self._stream = torch.cuda.Stream(device=self.device)
        pending = None
        for images, target in self.loader:
            if cuda:
                consumer = torch.cuda.current_stream(self.device)
                # blocks the consumer freed may be reused below: wait for its queued work first
                self._stream.wait_stream(consumer)
                with torch.cuda.stream(self._stream):
                    batch = self._prepare(images, target)
            else:
                batch = self._prepare(images, target)
            if pending is not None:
                yield pending
            if cuda:
                torch.cuda.current_stream(self.device).wait_stream(self._stream)
            pending = batch
        if pending is not None:
            yield pending


def image_mode(flag: str | None, channels: int) -> str:
    """The PIL mode images are read in: ``--input-img-mode``, else timm's rule (RGB for 3
    input channels, L otherwise); ``UsageError`` when the mode's bands are not the model's
    input channels (the normalisation would fail on the first image)."""
    mode = flag or ("RGB" if channels == 3 else "L")
    bands = Image.getmodebands(mode)
    if bands != channels:
        raise UsageError(f"--input-img-mode {mode} gives {bands}-channel images but the model takes {channels} "
                         "(--in-chans / --input-size); give a mode with as many bands")
    return mode


class ImageSavingLoader:
    """timm's ``--save-images``: every batch whose index is a multiple of ``every`` (and the
    last) is also written to ``folder/train-batch-<index>.jpg`` (torchvision's ``save_image``,
    min-max normalised, no padding), as the loader gives it: before mixup/cutmix, which timm
    applies first. ``len``, ``sampler``, ``generator``, ``dataset`` are the wrapped loader's,
    so :func:`set_epoch` and a mid-epoch resume work through it."""

    def __init__(self, loader: Any, folder: str, every: int) -> None:
        self.loader, self.folder, self.every = loader, folder, max(1, int(every))

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, generator, dataset, loader: the wrapped loader's
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator[Any]:
        from torchvision.utils import save_image

        last = len(self.loader) - 1
        for index, (images, target) in enumerate(self.loader):
            if index % self.every == 0 or index == last:
                save_image(images.float(), os.path.join(self.folder, f"train-batch-{index}.jpg"), padding=0,
                           normalize=True)
            yield images, target


def device_random_erasing(aug: AugmentConfig, device: torch.device) -> Callable | None:
    """timm's ``RandomErasing`` for batches on ``device`` (None when ``aug.re_prob`` is 0)."""
    if aug.no_aug or aug.re_prob <= 0:
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=aug.re_prob, mode=aug.re_mode, max_count=aug.re_count,
                         num_splits=aug.re_num_splits, device=device)
