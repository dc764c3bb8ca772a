"""Datasets, samplers and loaders: what each rank sees, and bad images named clearly."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from PIL import Image

from conftest import CLASSES, count_images, make_image_folder
from emakit.training import UsageError, one_line
from emakit.training import data as data_module
from emakit.training.data import (BadImageError, ImageListDataset, ShardSampler, build_datasets,
                                  build_eval_loader, build_train_loader, check_images, load_digits_splits,
                                  load_image_folder, set_epoch)
from emakit.training.distributed import DistInfo


def test_digits_split_is_stratified_deterministic_and_uses_every_image():
    from sklearn.datasets import load_digits

    target = load_digits().target
    a, b = load_digits_splits(), load_digits_splits()
    assert len(a.train) + len(a.val) == len(target) == 1797
    assert len(a.val) == 360  # ceil(0.2 * 1797), sklearn's rounding of test_size
    per_class = Counter(target.tolist())
    val_counts = Counter(a.val.targets)
    for c, n in per_class.items():
        assert abs(val_counts[c] - 0.2 * n) <= 1, c  # stratified: each class ~20% in val
    assert a.val.targets == b.val.targets and a.train.targets == b.train.targets
    img = a.train.load(0)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert a.classes == [str(i) for i in range(10)]


def test_image_folder_splits_count_every_file_and_share_class_indices(image_folder):
    splits = build_datasets(str(image_folder))
    assert len(splits.train) == count_images(image_folder / "train")
    assert len(splits.val) == count_images(image_folder / "val")
    assert splits.classes == sorted(CLASSES)
    for ds in (splits.train, splits.val):
        for path, target in zip(ds.items, ds.targets):
            assert f"/{splits.classes[target]}/" in path


def test_a_validation_folder_named_validation_is_found(tmp_path):
    root = make_image_folder(tmp_path / "d", val_name="validation", train_per_class=2, val_per_class=1)
    assert len(build_datasets(str(root)).val) == len(CLASSES)


@pytest.mark.parametrize("n, world", [(15, 2), (16, 4), (3, 4), (1, 1), (101, 3)])
def test_shard_sampler_gives_every_index_to_exactly_one_rank(n, world):
    seen = [i for r in range(world) for i in ShardSampler(n, r, world)]
    assert sorted(seen) == list(range(n))
    assert sum(len(ShardSampler(n, r, world)) for r in range(world)) == n


def tiny_dataset(n: int) -> ImageListDataset:
    """n in-memory 1-pixel images whose target is their index."""
    return ImageListDataset([Image.new("RGB", (1, 1))] * n, list(range(n)), transform=lambda im: torch.zeros(1))


def test_eval_loaders_of_all_ranks_cover_the_dataset_once():
    ds = tiny_dataset(11)
    seen = []
    for rank in range(3):
        loader = build_eval_loader(ds, 4, DistInfo(rank=rank, world_size=3))
        seen += [int(t) for _, target in loader for t in target]
    assert sorted(seen) == list(range(11))


def _order(loader) -> list[int]:
    return [int(t) for _, target in loader for t in target]


def test_training_order_is_a_function_of_seed_and_epoch_only():
    ds = tiny_dataset(40)
    a = build_train_loader(ds, 8, DistInfo(), seed=3)
    b = build_train_loader(ds, 8, DistInfo(), seed=3)
    set_epoch(a, 1, 3)
    _order(a)  # advancing `a` through another epoch must not matter
    set_epoch(a, 2, 3)
    set_epoch(b, 2, 3)
    order = _order(a)
    assert order == _order(b)
    set_epoch(b, 3, 3)
    assert _order(b) != order and sorted(order) == list(range(40))


def test_training_shards_are_disjoint_and_each_rank_takes_the_same_number_of_steps():
    ds = tiny_dataset(30)
    loaders = [build_train_loader(ds, 4, DistInfo(rank=r, world_size=2), seed=0) for r in range(2)]
    for loader in loaders:
        set_epoch(loader, 0, 0)
    orders = [_order(loader) for loader in loaders]
    assert len(orders[0]) == len(orders[1]) == 12  # 15 per rank, full batches of 4 only
    assert not set(orders[0]) & set(orders[1])


def test_a_batch_larger_than_the_train_split_is_a_usage_error():
    ds = tiny_dataset(5)
    with pytest.raises(UsageError, match="fewer than one batch"):
        build_train_loader(ds, 8, DistInfo(), seed=0)


def test_header_check_names_a_garbage_file_and_decode_check_names_a_truncated_one(image_folder_copy):
    garbage = image_folder_copy / "train" / "ant" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    good = image_folder_copy / "train" / "bee" / "bee_000.jpg"
    truncated = image_folder_copy / "train" / "bee" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:-150])  # header intact, pixels missing
    ds = load_image_folder(str(image_folder_copy)).train
    header = {ds.items[i] for i, _ in check_images(ds, decode=False)}
    decoded = {ds.items[i] for i, _ in check_images(ds, decode=True)}
    assert header == {str(garbage)}
    assert decoded == {str(garbage), str(truncated)}


@pytest.mark.parametrize("threaded", [False, True])
def test_the_check_finds_each_bad_file_in_every_chunk_in_one_thread_and_in_the_pool(image_folder_copy, monkeypatch,
                                                                                    threaded):
    """200 files (4 tasks of 64): bad ones in the first, untimed file, the timed rest of the
    first chunk, and the later chunks, found at their own indices whether the later chunks
    run here or in the pool."""
    good = sorted(str(p) for p in (image_folder_copy / "train").rglob("*.jpg"))
    bad = {0: "zero.jpg", 5: "five.jpg", 64: "sixty-four.jpg", 130: "one-thirty.jpg", 199: "last.jpg"}
    for name in bad.values():
        (image_folder_copy / name).write_bytes(b"not an image")
    items = [str(image_folder_copy / bad[i]) if i in bad else good[i % len(good)] for i in range(200)]
    pools = []
    monkeypatch.setattr(data_module, "_THREADED_CHECK_S", 0.0 if threaded else float("inf"))
    monkeypatch.setattr(data_module, "ThreadPoolExecutor",
                        lambda **kw: pools.append(kw) or ThreadPoolExecutor(**kw))
    found = check_images(ImageListDataset(items, [0] * 200), decode=False, threads=3)
    assert [i for i, _ in found] == sorted(bad)
    assert all(reason for _, reason in found)
    assert pools == ([{"max_workers": 3}] if threaded else [])


def test_skip_bad_images_drops_exactly_the_unreadable_files(image_folder_copy):
    (image_folder_copy / "val" / "cat" / "bad.png").write_bytes(b"\x89PNG broken")
    splits = build_datasets(str(image_folder_copy), skip_bad_images=True)
    assert len(splits.val) == count_images(image_folder_copy / "val") - 1
    assert all("bad.png" not in p for p in splits.val.items)


def test_a_decode_error_in_a_loader_worker_comes_back_as_one_line_naming_the_file(image_folder_copy):
    good = image_folder_copy / "val" / "ant" / "ant_000.jpg"
    good.write_bytes(good.read_bytes()[:-150])  # header intact, pixels missing
    ds = build_datasets(str(image_folder_copy)).val  # the header check passes
    ds.transform = lambda im: torch.zeros(1)
    loader = build_eval_loader(ds, 4, DistInfo(), workers=1)
    with pytest.raises(BadImageError) as info:
        list(loader)
    line = one_line(info.value)
    assert "\n" not in line and str(good) in line and line.startswith("cannot read image")
