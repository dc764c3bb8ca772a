"""Datasets beyond a folder tree: timm's ``--dataset`` prefixes, with emakit's guarantees.

``--dataset`` reads as timm's ``create_dataset`` (``<type>/<name>``, ``--data-dir`` the root,
``--train-split`` / ``--val-split`` the splits):

=========  =====================================================  =========  ==============================
prefix     what                                                   access     resume / distributed eval
=========  =====================================================  =========  ==============================
``''``     ImageFolder (emakit's scan), or ``<split>.tar`` files   map        exact mid-epoch / exact
           of class folders (timm's ImageInTar reader)
torch/     torchvision datasets through timm (``--dataset-        map        exact mid-epoch / exact
           download``: torchvision's download)
hfds/      Hugging Face ``datasets``: a ``save_to_disk`` folder    map        exact mid-epoch / exact
           (``load_from_disk``) or a hub name (timm's reader)
wids/      WebDataset shards indexed by ``wids`` (random access)   map        exact mid-epoch / exact
wds/       WebDataset shards streamed: each reader (rank x        stream     shard position + seed: exact
           worker) reads its own shards, in an order that is a               mid-epoch when resumed with the
           function of (seed, epoch)                                         same ranks and workers; eval
                                                                             indexed (exact)
hfids/     Hugging Face streaming (``datasets`` IterableDataset   stream     as wds/: shard position + seed;
           ``.shard()`` over the readers)                                    eval split loaded indexed
=========  =====================================================  =========  ==============================

A streamed epoch is ``samples // (processes x batch)`` batches per process; each reader
(process x loader worker) reads its own shards, so there must be at least as many shards as
readers. When every reader's shards hold the same number of samples, a multiple of the
batch size, every sample is read once per epoch; otherwise a reader that runs short starts
its shards over (a few samples twice) and one with more stops at its quota.
Resuming a stream mid-epoch needs the same processes and ``-j``: the stream is re-read and
the samples already trained on skipped without decoding.

Map-style sources go through emakit's samplers (:class:`.data.ResumableSampler`,
:class:`.data.ShardSampler`), so everything said of a folder holds. Streamed sources go
through :class:`StreamLoader`. ``webdataset``, ``wids`` and ``datasets`` are optional: a
flag that needs one that is missing is one line naming the ``pip install``.
"""
from __future__ import annotations

import importlib
import io
import itertools
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from . import UsageError, one_line
from .data import (DataSplits, ResumableSampler, StopSafeLoader, build_datasets, epoch_seed, sample_seed,
                   VAL_SPLITS, shown_path)

__all__ = ["PREFIXES", "STREAMED", "split_prefix", "MapSource", "build_splits", "load_eval_split", "ShardStream",
           "HfStream", "StreamLoader", "build_stream_loader", "is_stream", "shard_list", "TarIndex",
           "require", "wants_sources", "pack_image_folder", "shard_bytes"]

_log = logging.getLogger(__name__)
PREFIXES = ("", "torch", "hfds", "hfids", "wds", "wids")
STREAMED = ("wds", "hfids")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
_PIP = {"webdataset": "webdataset", "wids": "wids", "datasets": "datasets", "tensorboard": "tensorboard",
        "wandb": "wandb"}


def require(module: str, why: str) -> Any:
    """Import an optional package, or a ``UsageError`` naming the ``pip install`` that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise UsageError(f"{why} needs the {top} package: pip install {_PIP.get(top, top)}") from None


def split_prefix(name: str) -> tuple[str, str]:
    """(prefix, rest) of a ``--dataset`` value as timm reads it: the prefix is case-insensitive;
    an unknown prefix is a ``UsageError``."""
    prefix, sep, rest = (name or "").partition("/")
    if not sep:
        if name:
            raise UsageError(f"--dataset {name}: expected <type>/<name> with type one of "
                             f"{', '.join(p for p in PREFIXES if p)}, or '' for an ImageFolder")
        return "", ""
    prefix = prefix.lower()
    if prefix not in PREFIXES:
        hint = " (tfds/ needs tensorflow-datasets, which emakit does not read)" if prefix == "tfds" else ""
        raise UsageError(f"--dataset {name}: unknown type {prefix}/{hint}; use one of "
                         f"{', '.join(p + '/' for p in PREFIXES if p)} or '' for an ImageFolder")
    return prefix, rest


def _rgb(obj: Any) -> Image.Image:
    """An RGB PIL image from what a reader returns: a PIL image, bytes, a file object or a
    Hugging Face ``{'bytes', 'path'}`` dict."""
    if isinstance(obj, dict):
        obj = obj.get("bytes") or obj.get("path")
    if isinstance(obj, Image.Image):
        return obj.convert("RGB")
    if isinstance(obj, (bytes, bytearray)):
        obj = io.BytesIO(obj)
    with Image.open(obj) as im:
        return im.convert("RGB")


class MapSource(Dataset):
    """``(image, target)`` by index from any random-access reader: ``read(i)`` gives the raw
    image (PIL, bytes, file object) and, when ``targets`` is None, its label. ``targets`` (a
    list, as :class:`.data.ImageListDataset`'s) lets ``--label-noise`` flip labels."""

    def __init__(self, read: Callable[[int], tuple[Any, int]], length: int, targets: list[int] | None,
                 transform: Callable | None = None) -> None:
        self.read, self.length, self._targets, self.transform = read, length, targets, transform

    @property
    def targets(self) -> list[int]:
        """Every label; read once (the images' bytes are read, not decoded) when the reader
        gives them only with the images (shards)."""
        if self._targets is None:
            self._targets = [int(self.read(i)[1]) for i in range(self.length)]
        return self._targets

    @targets.setter
    def targets(self, value: list[int]) -> None:
        self._targets = value

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int]:
        raw, target = self.read(index)
        img = _rgb(raw)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self._targets[index] if self._targets is not None else target)


def _remap(targets: list[int], names: Sequence[str], class_to_idx: dict[str, int], where: str) -> list[int]:
    """Labels of a split whose classes are ``names`` re-indexed by the train split's ``class_to_idx``."""
    missing = [n for n in names if n not in class_to_idx]
    if missing:
        raise UsageError(f"{where} has classes the train split lacks: {', '.join(map(str, missing[:5]))}")
    return [class_to_idx[names[t]] for t in targets]


def _class_map(path: str, root: str | None) -> list[str] | None:
    """Class names of a ``--class-map`` text file, one a line (timm's format)."""
    if not path:
        return None
    found = path if os.path.isfile(path) else os.path.join(root or "", path)
    if not os.path.isfile(found):
        raise UsageError(f"--class-map {path}: no such file")
    with open(found, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise UsageError(f"--class-map {path} is empty: expected one class name a line")
    return names


def _apply_class_map(splits: DataSplits, names: list[str] | None, where: str) -> DataSplits:
    """Re-label both splits by ``--class-map`` (its line number is the label)."""
    if names is None:
        return splits
    to_idx = {n: i for i, n in enumerate(names)}
    missing = [c for c in splits.classes if c not in to_idx]
    if missing:
        raise UsageError(f"--class-map lacks classes of {where}: {', '.join(map(str, missing[:5]))}")
    for ds in (splits.train, splits.val):
        if ds.targets is None:  # a stream
            raise UsageError(f"--class-map needs the labels up front; {where} streams them (use wids/ for shards)")
        ds.targets = _remap(ds.targets, splits.classes, to_idx, where)
    return DataSplits(splits.train, splits.val, names, splits.description + ", classes from --class-map")


def _check_nonempty(ds: Any, split: str, where: str) -> None:
    if len(ds) == 0:
        raise UsageError(f"{where}: split {split} is empty; check --train-split / --val-split")


# --------------------------------------------------------------------------- '' : folder / tar
def _find_split(root: str, names: Sequence[str]) -> str | None:
    for n in names:
        for path in (os.path.join(root, n), os.path.join(root, n + ".tar")):
            if os.path.exists(path):
                return path
    return None


def _tar_splits(data: Any) -> DataSplits:
    """``<root>/<split>.tar`` files of class folders, read by timm's ImageInTar reader."""
    from timm.data import create_dataset

    root = data.path
    train_path = _find_split(root, [data.train_split])
    val_path = _find_split(root, [data.val_split] if data.val_split else list(VAL_SPLITS))
    for kind, path in (("train", train_path), ("validation", val_path)):
        if path is None:
            raise UsageError(f"{root} has no {kind} split: expected {root}/train/ or train.tar and val/ or val.tar")
    try:
        train = create_dataset("", root=train_path, split=data.train_split, search_split=False)
        val = create_dataset("", root=val_path, split="validation", search_split=False,
                             class_map=dict(train.reader.class_name_to_idx))
    except (tarfile.TarError, OSError, AssertionError, KeyError) as e:
        raise UsageError(f"cannot read the image tar {shown_path(train_path)} / {shown_path(val_path)}: "
                         f"{one_line(e) or type(e).__name__}") from None
    classes = [n for n, _ in sorted(train.reader.class_name_to_idx.items(), key=lambda kv: kv[1])]
    out = []
    for ds, path in ((train, train_path), (val, val_path)):
        _check_nonempty(ds.reader, os.path.basename(path), shown_path(path))
        out.append(MapSource(ds.reader.__getitem__, len(ds.reader), list(map(int, ds.reader.targets))))
    desc = (f"image tar {shown_path(train_path)}: {len(out[0])} train, {len(out[1])} val images "
            f"({os.path.basename(val_path)}), {len(classes)} classes (timm's ImageInTar reader)")
    return DataSplits(out[0], out[1], classes, desc)


# --------------------------------------------------------------------------- torch/
def _torch_split(name: str, data: Any, split: str, train: bool) -> Any:
    from timm.data import create_dataset

    try:
        return create_dataset(f"torch/{name}", root=data.path or "", split=split, is_training=train,
                              download=data.dataset_download)
    except AssertionError as e:
        raise UsageError(f"--dataset torch/{name}: {one_line(e)}") from None
    except (RuntimeError, FileNotFoundError, OSError) as e:
        hint = "" if data.dataset_download else " (add --dataset-download to fetch it)"
        raise UsageError(f"--dataset torch/{name} in {data.path}: {one_line(e)[:200]}{hint}") from None


def _torch_splits(name: str, data: Any) -> DataSplits:
    train = _torch_split(name, data, data.train_split, True)
    val = _torch_split(name, data, data.val_split or "validation", False)
    classes = [str(c) for c in getattr(train, "classes", [])]
    out = []
    for ds, split in ((train, data.train_split), (val, data.val_split or "validation")):
        _check_nonempty(ds, split, f"torch/{name}")
        targets = [int(t) for t in getattr(ds, "targets", [])] or None
        out.append(MapSource(ds.__getitem__, len(ds), targets))
    val_classes = [str(c) for c in getattr(val, "classes", [])]
    if classes and val_classes and val_classes != classes and out[1].targets is not None:
        out[1].targets = _remap(out[1].targets, val_classes, {c: i for i, c in enumerate(classes)},
                                f"torch/{name} validation")
    if not classes:
        classes = [str(i) for i in range(max(out[0].targets or [0]) + 1)]
    desc = f"torch/{name} (torchvision through timm) in {data.path}: {len(out[0])} train, {len(out[1])} val images"
    return DataSplits(out[0], out[1], classes, desc)


# --------------------------------------------------------------------------- hfds/
def _hf_location(name: str, root: str | None) -> str | None:
    """The ``save_to_disk`` folder ``name`` means (itself, or under --data-dir), else None."""
    for path in (name, os.path.join(root or "", name)):
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
            return path
    return None


def _hf_split(ds: Any, split: str, where: str) -> Any:
    if hasattr(ds, "keys"):  # a DatasetDict
        if split not in ds:
            raise UsageError(f"{where} has no split {split!r} (it has {', '.join(ds.keys())}); "
                             "set --train-split / --val-split")
        return ds[split]
    return ds


def _hf_source(ds: Any, split: str, input_key: str, target_key: str, where: str) -> tuple[MapSource, list[str]]:
    datasets = require("datasets", "--dataset hfds/")
    for key, flag in ((input_key, "--input-key"), (target_key, "--target-key")):
        if key not in ds.column_names:
            raise UsageError(f"{where} split {split} has no column {key!r} ({flag}); its columns: "
                             f"{', '.join(ds.column_names)}")
    _check_nonempty(ds, split, where)
    feature = ds.features[target_key]
    names = list(getattr(feature, "names", None) or [])
    targets = [int(t) for t in ds[target_key]]
    if not names:
        names = [str(i) for i in range(max(targets) + 1)]
    ds = ds.cast_column(input_key, datasets.Image(decode=False))  # decoded by us, as timm's reader does

    def read(i: int) -> tuple[Any, int]:
        return ds[i][input_key], -1

    return MapSource(read, len(ds), targets), names


def _hfds_splits(name: str, data: Any) -> DataSplits:
    datasets = require("datasets", "--dataset hfds/")
    where = f"hfds/{name}"
    input_key, target_key = data.input_key or "image", data.target_key or "label"
    on_disk = _hf_location(name, data.path)
    val_split = data.val_split or "validation"
    parts = []
    for split in (data.train_split, val_split):
        if on_disk:
            try:
                ds = datasets.load_from_disk(on_disk)
            except Exception as e:  # datasets' errors have no common base
                raise UsageError(f"cannot load {where} from {on_disk}: {one_line(e)[:200]}") from None
        else:
            try:
                ds = datasets.load_dataset(name, split=split, cache_dir=data.path,
                                           **({"trust_remote_code": True} if data.trust_remote_code else {}))
            except Exception as e:
                raise UsageError(f"cannot load {where} (split {split}) with datasets.load_dataset: "
                                 f"{one_line(e)[:200]}; a local dataset saved with save_to_disk is read with "
                                 "--dataset hfds/PATH") from None
        parts.append(_hf_source(_hf_split(ds, split, where), split, input_key, target_key, where))
    (train, classes), (val, val_names) = parts
    if val_names != classes:
        val.targets = _remap(val.targets, val_names, {c: i for i, c in enumerate(classes)}, f"{where} {val_split}")
    desc = f"{where} ({'load_from_disk ' + on_disk if on_disk else 'datasets cache'}): {len(train)} train, " \
           f"{len(val)} val images, {len(classes)} classes"
    return DataSplits(train, val, classes, desc)


# --------------------------------------------------------------------------- shards: wds/ and wids/
def _info(root: str) -> dict[str, Any]:
    for name in ("_info.json", "info.json"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return json.load(f)
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read {path}: {one_line(e)}") from None
    return {}


def _count_samples(path: str) -> int:
    keys = set()
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.isfile():
                keys.add(_key_ext(m.name)[0])
    return len(keys)


def _key_ext(name: str) -> tuple[str, str]:
    """WebDataset's sample key and extension of a tar member: ``a/b.x.jpg`` -> (``a/b``, ``x.jpg``)."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext


def shard_list(root: str | None, split: str, num_samples: int | None, where: str) -> tuple[list[tuple[str, int]], dict]:
    """([(shard path, samples)], _info.json) of a split given as timm's wds reader takes it: a
    split name of ``<root>/_info.json``, or a brace pattern ``name-{0000..0009}.tar`` (with an
    optional ``|N`` sample count). Missing shards are a ``UsageError``; counts unknown to the
    info file are read from the shards' tar headers."""
    if not root or not os.path.isdir(root):
        raise UsageError(f"{where} needs --data-dir: the folder of the shards and their _info.json")
    info = _info(root)
    if "tar" in split or ".." in split:
        require("webdataset", f"{where} split pattern {split}")
        from timm.data.readers.reader_wds import _parse_split_info

        try:
            parsed = _parse_split_info(split, info)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UsageError(f"{where}: bad split pattern {split!r}: {one_line(e)}") from None
        files, lengths = list(parsed.filenames), list(parsed.shard_lengths)
    else:
        splits = info.get("splits", {})
        if not info:
            raise UsageError(f"{root} has no _info.json: give the split as a pattern like "
                             "name-{0000..0009}.tar, or make the shards with python -m emakit pack")
        if split not in splits:
            raise UsageError(f"{root}/_info.json has no split {split!r} (it has {', '.join(splits) or 'none'}); "
                             "set --train-split / --val-split")
        files, lengths = list(splits[split]["filenames"]), list(splits[split].get("shard_lengths") or [])
    paths = [os.path.join(root, f) for f in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"{where}: missing shard {shown_path(missing[0])}" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if len(lengths) != len(paths):
        lengths = [_count_samples(p) for p in paths]
    shards = list(zip(paths, map(int, lengths)))
    total = num_samples or sum(lengths)
    if total <= 0 or not shards:
        raise UsageError(f"{where}: split {split} is empty (no samples in {len(shards)} shard(s))")
    return shards, info


class _Keys:
    """How a sample dict becomes (image bytes, label): ``input_key`` extensions tried in turn,
    the label from ``.cls`` or a json sidecar field."""

    def __init__(self, input_key: str | None, target_key: str | None, where: str) -> None:
        self.images = tuple(k.strip().lstrip(".") for k in (input_key or "jpg;png;webp").split(";") if k.strip())
        self.target_key, self.where = target_key, where

    def split(self, sample: dict[str, Any]) -> tuple[bytes, int]:
        sample = {k.lstrip("."): v for k, v in sample.items()}
        image = next((sample[k] for k in self.images if k in sample), None)
        if image is None:
            raise UsageError(f"{self.where}: sample {sample.get('__key__')} has no {'/'.join(self.images)} "
                             f"member (--input-key); it has {', '.join(k for k in sample if not k.startswith('__'))}")
        if self.target_key:
            if "json" not in sample:
                raise UsageError(f"{self.where}: sample {sample.get('__key__')} has no .json for --target-key")
            meta = json.loads(_bytes(sample["json"]))
            if self.target_key not in meta:
                raise UsageError(f"{self.where}: sample {sample.get('__key__')} has no {self.target_key!r} field")
            return _bytes(image), int(meta[self.target_key])
        if "cls" not in sample:
            raise UsageError(f"{self.where}: sample {sample.get('__key__')} has no .cls label (or pass --target-key)")
        return _bytes(image), int(_bytes(sample["cls"]).decode().strip())


def _bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if hasattr(value, "read"):
        value.seek(0)
        return value.read()
    return str(value).encode()


def _classes(info: dict[str, Any], num_classes: int | None, where: str) -> list[str]:
    if info.get("classes"):
        return [str(c) for c in info["classes"]]
    n = num_classes or info.get("num_classes")
    if not n:
        raise UsageError(f"{where}: the shards' _info.json names no classes; pass --num-classes N")
    return [str(i) for i in range(int(n))]


class TarIndex(Dataset):
    """Random access to WebDataset tar shards by index (each shard's member offsets read once
    from its headers): the validation split of ``wds/``, so distributed evaluation is exact."""

    def __init__(self, shards: list[tuple[str, int]], keys: _Keys) -> None:
        self.paths, self.keys, self.index = [p for p, _ in shards], keys, []
        for s, path in enumerate(self.paths):
            with tarfile.open(path) as tf:
                members: dict[str, dict[str, tuple[int, int]]] = {}
                for m in tf.getmembers():
                    if m.isfile():
                        key, ext = _key_ext(m.name)
                        members.setdefault(key, {})[ext] = (m.offset_data, m.size)
            self.index += [(s, key, parts) for key, parts in members.items()]
        self.transform: Callable | None = None
        self._targets: list[int] | None = None

    @property
    def targets(self) -> list[int]:
        """Every label, read once from the shards (images not decoded)."""
        if self._targets is None:
            self._targets = [self._raw(i)[1] for i in range(len(self))]
        return self._targets

    def __len__(self) -> int:
        return len(self.index)

    def _raw(self, i: int) -> tuple[bytes, int]:
        s, key, parts = self.index[i]
        sample: dict[str, Any] = {"__key__": key}
        with open(self.paths[s], "rb") as f:
            for ext, (offset, size) in parts.items():
                f.seek(offset)
                sample[ext] = f.read(size)
        return self.keys.split(sample)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        raw, target = self._raw(i)
        img = _rgb(raw)
        return (self.transform(img) if self.transform is not None else img), target


def _same_path(url: str) -> str:
    return url  # local shards are read in place, never copied into wids' cache


def _wids_source(shards: list[tuple[str, int]], keys: _Keys) -> MapSource:
    wids = require("wids", "--dataset wids/")
    import contextlib

    with contextlib.redirect_stderr(io.StringIO()):  # wids prints a line of shard statistics on every build
        ds = wids.ShardListDataset([{"url": p, "nsamples": n} for p, n in shards], localname=_same_path,
                                   transformations=[])
    return MapSource(lambda i: keys.split(ds[i]), len(ds), None)


def _shard_splits(prefix: str, data: Any, world_size: int, workers: int, seed: int) -> DataSplits:
    where = f"{prefix}/"
    keys = _Keys(data.input_key, data.target_key, where)
    train_shards, info = shard_list(data.path, data.train_split, data.train_num_samples, where)
    val_split = data.val_split or next((s for s in ("validation", "val") if s in info.get("splits", {})),
                                       "validation")
    val_shards, _ = shard_list(data.path, val_split, data.val_num_samples, where)
    classes = _classes(info, data.num_classes, where)
    if prefix == "wids":
        train, val = _wids_source(train_shards, keys), _wids_source(val_shards, keys)
        how = "indexed by wids"
    else:
        train = ShardStream(train_shards, keys, seed=seed, batch_size=data.batch_size, world_size=world_size,
                            workers=workers, num_samples=data.train_num_samples)
        val = TarIndex(val_shards, keys)
        how = (f"streamed, {len(train_shards)} shards over {world_size} process(es) x {max(1, workers)} reader(s); "
               "validation indexed")
    desc = (f"{where} shards in {data.path}: {sum(n for _, n in train_shards)} train ({len(train_shards)} shards), "
            f"{len(val)} val samples, {len(classes)} classes, {how}")
    return DataSplits(train, val, classes, desc)


# --------------------------------------------------------------------------- streams
class _Stream(IterableDataset):
    """A training stream cut into ``batches`` batches per rank and epoch. Reader ``g`` of ``G``
    (rank x loader worker) reads its own part of the source in an order that is a function of
    (seed, epoch, g), shuffled through a buffer, and every sample's augmentation is seeded
    from (seed, epoch, g, position): a stream is a pure function of (seed, epoch), so
    :meth:`skip` (a mid-epoch resume) reproduces the rest of the epoch exactly when the ranks
    and workers are the same. A reader that runs out before its quota starts its part over."""

    shuffle_buffer = 256

    def __init__(self, total: int, *, seed: int, batch_size: int, world_size: int, workers: int, where: str) -> None:
        self.seed, self.batch_size, self.workers = seed, batch_size, max(1, workers)
        self.rank, self.world_size = 0, world_size
        self.batches = total // (world_size * batch_size)
        if self.batches < 1:
            raise UsageError(f"{where}: {total} samples, fewer than one batch of {batch_size} per process; "
                             "lower -b/--batch-size")
        self.total, self.epoch, self.skip_batches = total, 0, 0
        self.transform: Callable | None = None
        self.targets = None

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def raw(self, reader: int, readers: int, epoch: int) -> Iterator[tuple[bytes, int]]:
        """This reader's (image bytes, label) in order, one pass over its part."""
        raise NotImplementedError

    def _shuffled(self, reader: int, readers: int) -> Iterator[tuple[bytes, int]]:
        rng = random.Random(epoch_seed(self.seed, self.epoch, reader))
        for sweep in itertools.count():  # one pass over the reader's part, then (if asked) the next
            got, buffer = False, []
            for item in self.raw(reader, readers, self.epoch * 1_000 + sweep):
                got = True
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            while buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
            if not got:
                return

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        role = (worker + self.skip_batches) % workers  # the loader asks worker 0 first, also after a skip
        reader, readers = self.rank * workers + role, self.world_size * workers
        need = len(range(role, self.batches, workers)) * self.batch_size
        skip = len(range(role, self.skip_batches, workers)) * self.batch_size
        base = epoch_seed(self.seed, self.epoch, reader)
        for pos, (image, target) in enumerate(itertools.islice(self._shuffled(reader, readers), need)):
            if pos >= skip:  # skipped samples are read, never decoded
                yield self._decode(image, target, sample_seed(base, pos), info is None)

    def _decode(self, image: bytes, target: int, seed: int, restore: bool) -> tuple[Any, int]:
        saved = (random.getstate(), np.random.get_state(), torch.random.get_rng_state()) if restore else None
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.random.default_generator.manual_seed(seed)
            img = _rgb(image)
            return (self.transform(img) if self.transform is not None else img), int(target)
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.random.set_rng_state(saved[2])


class ShardStream(_Stream):
    """``wds/``: WebDataset tar shards, each reader its own shards (``shards[g::G]`` of the
    epoch's shard order), read sequentially."""

    def __init__(self, shards: list[tuple[str, int]], keys: _Keys, *, seed: int, batch_size: int, world_size: int,
                 workers: int, num_samples: int | None = None) -> None:
        readers = world_size * max(1, workers)
        if len(shards) < readers:
            raise UsageError(f"wds/: {len(shards)} shard(s) for {readers} readers ({world_size} process(es) x "
                             f"{max(1, workers)} loader worker(s)): every reader needs its own shard; pack with a "
                             "smaller --shard-size or lower -j")
        super().__init__(num_samples or sum(n for _, n in shards), seed=seed, batch_size=batch_size,
                         world_size=world_size, workers=workers, where="wds/")
        self.shards, self.keys = shards, keys

    def raw(self, reader: int, readers: int, epoch: int) -> Iterator[tuple[bytes, int]]:
        order = list(range(len(self.shards)))
        random.Random(epoch_seed(self.seed, self.epoch)).shuffle(order)
        for s in order[reader::readers]:
            yield from self._read_shard(self.shards[s][0])

    def _read_shard(self, path: str) -> Iterator[tuple[bytes, int]]:
        sample: dict[str, Any] = {}
        with tarfile.open(path, "r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _key_ext(m.name)
                if sample and sample["__key__"] != key:
                    yield self.keys.split(sample)
                    sample = {}
                sample["__key__"] = key
                sample[ext] = tf.extractfile(m).read()
        if sample:
            yield self.keys.split(sample)


class HfStream(_Stream):
    """``hfids/``: a Hugging Face streaming dataset, ``.shard(G, g)`` per reader."""

    def __init__(self, ds: Any, total: int, input_key: str, target_key: str, **kwargs: Any) -> None:
        readers = kwargs["world_size"] * max(1, kwargs["workers"])
        shards = getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1)
        if shards < readers:
            raise UsageError(f"hfids/: the dataset has {shards} shard(s) (files) for {readers} readers; lower -j or "
                             "the process count")
        super().__init__(total, where="hfids/", **kwargs)
        self.ds, self.input_key, self.target_key = ds, input_key, target_key

    def raw(self, reader: int, readers: int, epoch: int) -> Iterator[tuple[bytes, int]]:
        part = self.ds.shard(num_shards=readers, index=reader)
        for item in part:
            yield item[self.input_key], int(item[self.target_key])


def _hfids_splits(name: str, data: Any, world_size: int, workers: int, seed: int) -> DataSplits:
    datasets = require("datasets", "--dataset hfids/")
    where = f"hfids/{name}"
    input_key, target_key = data.input_key or "image", data.target_key or "label"
    val_split = data.val_split or "validation"
    try:
        train = datasets.load_dataset(name, split=data.train_split, streaming=True, cache_dir=data.path)
        val = datasets.load_dataset(name, split=val_split, streaming=False, cache_dir=data.path)
    except Exception as e:  # datasets' errors have no common base
        raise UsageError(f"cannot load {where}: {one_line(e)[:200]}") from None
    feature = (train.features or {}).get(target_key) if train.features else None
    for key, flag in ((input_key, "--input-key"), (target_key, "--target-key")):
        if train.features is not None and key not in train.features:
            raise UsageError(f"{where} has no column {key!r} ({flag}); its columns: {', '.join(train.features)}")
    total = data.train_num_samples
    if not total:
        try:
            total = train.info.splits[data.train_split].num_examples
        except (AttributeError, KeyError, TypeError):
            total = None
    if not total:
        raise UsageError(f"{where}: the dataset does not say how many samples its {data.train_split} split has; "
                         "pass --train-num-samples N")
    val_source, classes = _hf_source(val, val_split, input_key, target_key, where)
    train = train.cast_column(input_key, datasets.Image(decode=False))  # bytes, decoded (seeded) by the stream
    if feature is not None and getattr(feature, "names", None):
        classes = list(feature.names)
    stream = HfStream(train, total, input_key, target_key, seed=seed, batch_size=data.batch_size,
                      world_size=world_size, workers=workers)
    return DataSplits(stream, val_source, classes,
                      f"{where} streamed: {total} train samples, {len(val_source)} val images (indexed)")


class _StreamPosition(ResumableSampler):
    """What :func:`.data.set_epoch` and a mid-epoch resume (``skip``) tell a stream: the
    epoch and the samples of this rank already trained on."""

    def __init__(self, seed: int) -> None:  # no DistributedSampler state: there are no indices
        self.seed, self.epoch, self._start = seed, 0, 0

    def __iter__(self) -> Iterator[Any]:
        raise TypeError("a stream has no sampler order")

    def __len__(self) -> int:
        return 0


class StreamLoader:
    """The training loader of a streamed source: a fresh :class:`.data.StopSafeLoader` over
    the stream each epoch (its workers read the epoch and skip), ``len`` the batches per
    rank; ``sampler``/``generator``/``dataset`` as :func:`.data.set_epoch` and the resume
    code use them."""

    def __init__(self, stream: _Stream, batch_size: int, *, seed: int, rank: int, workers: int = 0,
                 pin_memory: bool = False) -> None:
        stream.rank = rank
        self.dataset, self.batch_size, self.workers, self.pin_memory = stream, batch_size, workers, pin_memory
        self.sampler = _StreamPosition(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.dataset.batches

    def __iter__(self) -> Iterator[Any]:
        self.dataset.epoch = self.sampler.epoch
        self.dataset.skip_batches, self.sampler._start = self.sampler._start // self.batch_size, 0
        loader = StopSafeLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                                pin_memory=self.pin_memory, drop_last=True, generator=self.generator)
        return iter(loader)


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset`` is a streamed training source (:class:`StreamLoader` reads it)."""
    return isinstance(dataset, _Stream)


def build_stream_loader(dataset: _Stream, batch_size: int, dist: Any, *, seed: int, workers: int = 0,
                        pin_memory: bool = False) -> StreamLoader:
    """The training loader of a streamed source (see :class:`StreamLoader`)."""
    return StreamLoader(dataset, batch_size, seed=seed, rank=dist.rank, workers=workers, pin_memory=pin_memory)


# --------------------------------------------------------------------------- entry points
def build_splits(data: Any, *, seed: int, world_size: int = 1) -> DataSplits:
    """The train/val datasets of ``--dataset`` / ``--data-dir`` (a :class:`.settings.DataSettings`).

    ``''`` with an ImageFolder (or no data: the embedded digits) is :func:`.data.build_datasets`
    unchanged; everything else is read here. Bad sources are a one-line ``UsageError``.
    """
    prefix, name = split_prefix(data.dataset)
    names = _class_map(data.class_map, data.path)
    if prefix == "" and (data.path is None or not os.path.isfile(os.path.join(data.path, data.train_split + ".tar"))):
        splits = build_datasets(data.path, data.train_split, data.val_split, data.skip_bad_images,
                                threads=max(2, data.workers))
        return _apply_class_map(splits, names, data.path or "the digits")
    if prefix in STREAMED and data.label_noise > 0:
        raise UsageError(f"--label-noise needs the labels up front; {prefix}/ streams them (use wids/ for shards)")
    if prefix == "":
        splits = _tar_splits(data)
    elif prefix == "torch":
        splits = _torch_splits(name, data)
    elif prefix == "hfds":
        splits = _hfds_splits(name, data)
    elif prefix == "hfids":
        splits = _hfids_splits(name, data, world_size, data.workers, seed)
    else:
        splits = _shard_splits(prefix, data, world_size, data.workers, seed)
    return _apply_class_map(splits, names, f"--dataset {data.dataset}")


def wants_sources(dataset: str, root: str | None, split: str | None) -> bool:
    """Whether validate.py reads its data here: ``--dataset`` given, or DIR holds ``<split>.tar``
    (``val.tar`` / ``validation.tar`` without ``--split``) instead of split folders."""
    if dataset:
        return True
    if not root or not os.path.isdir(root):
        return False
    path = _find_split(root, [split] if split else list(VAL_SPLITS))
    return path is not None and path.endswith(".tar")


def load_eval_split(dataset: str, root: str | None, split: str | None, *, num_samples: int | None = None,
                    input_key: str | None = None, target_key: str | None = None, class_map: str = "",
                    download: bool = False, trust_remote_code: bool = False,
                    train_args: Any = None) -> tuple[Dataset, str]:
    """(dataset, description) of one split for ``validate.py --dataset``: map-style always (a
    streamed ``wds/`` or ``hfids/`` split is indexed), so every sample counts once."""
    from types import SimpleNamespace

    prefix, name = split_prefix(dataset)
    args = dict(train_args or {})
    split = split or args.get("val_split") or "validation"
    data = SimpleNamespace(dataset=dataset, path=root, train_split=split, val_split=split, input_key=input_key,
                           target_key=target_key, class_map=class_map, dataset_download=download,
                           trust_remote_code=trust_remote_code, num_classes=args.get("num_classes"),
                           train_num_samples=num_samples, val_num_samples=num_samples, workers=0, batch_size=1,
                           label_noise=0.0, skip_bad_images=False)
    if prefix == "":
        path = _find_split(root or "", [split] if split else list(VAL_SPLITS))
        if path is None or not path.endswith(".tar"):
            raise UsageError(f"{root} has no {split}.tar (give DIR for an ImageFolder without --dataset)")
        from timm.data import create_dataset

        ds = create_dataset("", root=path, split=split, search_split=False).reader
        return MapSource(ds.__getitem__, len(ds), list(map(int, ds.targets))), f"image tar {path}: {len(ds)} images"
    if prefix == "torch":
        ds = _torch_split(name, data, split, False)
        _check_nonempty(ds, split, dataset)
        targets = [int(t) for t in getattr(ds, "targets", [])] or None
        return MapSource(ds.__getitem__, len(ds), targets), f"torch/{name} {split}: {len(ds)} images"
    if prefix in ("hfds", "hfids"):
        datasets = require("datasets", f"--dataset {prefix}/")
        on_disk = _hf_location(name, root)
        try:
            ds = datasets.load_from_disk(on_disk) if on_disk else datasets.load_dataset(name, split=split,
                                                                                         cache_dir=root)
        except Exception as e:
            raise UsageError(f"cannot load {dataset}: {one_line(e)[:200]}") from None
        source, _ = _hf_source(_hf_split(ds, split, dataset), split, input_key or "image", target_key or "label",
                               dataset)
        return source, f"{dataset} {split}: {len(source)} images"
    shards, _ = shard_list(root, split, num_samples, f"{prefix}/")
    keys = _Keys(input_key, target_key, f"{prefix}/")
    source = _wids_source(shards, keys) if prefix == "wids" else TarIndex(shards, keys)
    return source, f"{prefix}/ shards {split} in {root}: {len(source)} samples in {len(shards)} shard(s)"


# --------------------------------------------------------------------------- emakit pack
def shard_bytes(text: str) -> int:
    """``--shard-size``: ``512MiB``, ``1GB``, a bare number of bytes (``ValueError`` otherwise)."""
    from emakit.posthoc import parse_budget

    budget = parse_budget(text)
    if budget.nbytes is None:
        raise ValueError(f"a shard size such as 512MiB or 1GB, got {text!r}")
    return budget.nbytes


_TAR_BLOCK = 512


def _tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no clock, no owner: the same bytes every time
    tf.addfile(info, io.BytesIO(data))


def pack_image_folder(src: str, out: str, shard_size: int, splits: Sequence[str] | None = None) -> list[str]:
    """Write each split of ImageFolder ``src`` (train/, val/ or validation/, ...) as WebDataset
    shards ``out/<split>-NNNNNN.tar`` of at most ``shard_size`` bytes (a tar file is a multiple
    of 10 KiB, its record size; a shard of one sample may exceed the size),
    each sample ``<key>.<ext>`` (the image file's bytes, unchanged) and ``<key>.cls`` (the class
    index of the train split's sorted class folders), in the folder's sorted order; then
    ``out/_info.json`` in the layout timm's wds reader reads (``splits`` -> ``num_samples``,
    ``filenames``, ``shard_lengths``) plus ``classes``. Returns the lines to print. Writes go
    to ``.tmp`` names renamed when complete; ``out`` must not hold shards already."""
    from .data import load_image_folder, scan_split

    if not os.path.isdir(src):
        raise UsageError(f"{src} is not a folder: give an ImageFolder root with train/ and val/")
    names = list(splits) if splits else [n for n in ("train", *VAL_SPLITS)
                                         if os.path.isdir(os.path.join(src, n))]
    if "train" not in names:
        load_image_folder(src)  # its error names what is missing
    classes = load_image_folder(src).classes
    to_idx = {c: i for i, c in enumerate(classes)}
    if os.path.exists(os.path.join(out, "_info.json")):
        raise UsageError(f"{out} already holds shards (_info.json); pack into a new folder")
    os.makedirs(out, exist_ok=True)
    info: dict[str, Any] = {"name": os.path.basename(os.path.normpath(src)), "classes": classes,
                            "num_classes": len(classes), "splits": {}}
    lines = []
    for split in names:
        paths, targets, _ = scan_split(os.path.join(src, split), to_idx)
        files, lengths, tf, size, index = [], [], None, 0, 0
        for k, (path, target) in enumerate(zip(paths, targets)):
            with open(path, "rb") as f:
                data = f.read()
            ext = os.path.splitext(path)[1].lstrip(".").lower().replace("jpeg", "jpg")
            cost = _TAR_BLOCK + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK + 2 * _TAR_BLOCK  # image + .cls members
            closed = -(-(size + cost + 2 * _TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
            if tf is None or (closed > shard_size and lengths[-1] > 0):
                if tf is not None:
                    tf.close()
                    os.replace(files[-1] + ".tmp", files[-1])
                files.append(os.path.join(out, f"{split}-{index:06d}.tar"))
                index, size = index + 1, 0
                lengths.append(0)
                tf = tarfile.open(files[-1] + ".tmp", "w", format=tarfile.USTAR_FORMAT)
            key = f"{k:08d}"
            _tar_member(tf, f"{key}.{ext}", data)
            _tar_member(tf, f"{key}.cls", str(target).encode())
            size = tf.offset
            lengths[-1] += 1
        if tf is not None:
            tf.close()
            os.replace(files[-1] + ".tmp", files[-1])
        info["splits"][split] = {"name": split, "num_samples": len(paths),
                                 "filenames": [os.path.basename(f) for f in files], "shard_lengths": lengths}
        lines.append(f"{split}: {len(paths)} samples in {len(files)} shard(s) {split}-000000.tar .. "
                     f"{os.path.basename(files[-1])}")
    tmp = os.path.join(out, "_info.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(out, "_info.json"))
    lines.append(f"wrote {out}/_info.json ({len(classes)} classes); train with: python train.py --data-dir {out} "
                 f"--dataset wds/{info['name']} (streamed) or wids/{info['name']} (indexed)")
    return lines
