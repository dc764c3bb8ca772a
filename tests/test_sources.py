"""``--dataset`` sources (emakit/training/sources.py) on real local data: the ImageFolder of
conftest as a folder, ``<split>.tar`` files, torchvision's ImageFolder (``torch/image_folder``),
a Hugging Face dataset saved to disk (``hfds/``), WebDataset shards made by ``emakit pack``
and by webdataset's own writer (``wds/`` streamed, ``wids/`` indexed).

Quick tests: ``emakit pack`` output read by timm's own wds reader, the stream's rules (each
reader its own shards, a skip reproduces the rest of the epoch), bad sources in one line.
Slow ones: one epoch + validate.py per source, mid-epoch SIGTERM then --resume bitwise, and
torchrun x2 on shards counting every sample once."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import CLASSES, FAST_ARGS, REPO, TRAIN_PER_CLASS, VAL_PER_CLASS, subprocess_env

N_TRAIN, N_VAL = len(CLASSES) * TRAIN_PER_CLASS, len(CLASSES) * VAL_PER_CLASS  # 24, 15
ONE_EPOCH = [*FAST_ARGS, "--epochs", "1"]


def _tar_dir(folder: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        with tarfile.open(out / f"{split}.tar", "w") as tf:
            for path in sorted((folder / split).rglob("*.jpg")):
                tf.add(path, arcname=str(path.relative_to(folder / split)))
    return out


def _hf_dataset(folder: Path, out: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})

    def split(name: str):
        files = sorted((folder / name).rglob("*.jpg"))
        return datasets.Dataset.from_dict({"image": [str(f) for f in files],
                                           "label": [CLASSES.index(f.parent.name) for f in files]},
                                          features=features)

    datasets.DatasetDict({"train": split("train"), "validation": split("val")}).save_to_disk(str(out))
    return out


def _hf_parquet(saved: Path, out: Path) -> Path:
    """The saved dataset as parquet files (4 train, 1 validation) that datasets streams (hfids/)."""
    datasets = pytest.importorskip("datasets")
    (out / "data").mkdir(parents=True)
    for split, n in (("train", 4), ("validation", 1)):
        ds = datasets.load_from_disk(str(saved))[split]
        for i in range(n):
            ds.shard(n, i, contiguous=True).to_parquet(str(out / "data" / f"{split}-{i:05d}-of-{n:05d}.parquet"))
    return out


def _wds_writer_shards(folder: Path, out: Path) -> Path:
    """Shards written by webdataset's own ShardWriter, 4 samples each, no _info.json."""
    wds = pytest.importorskip("webdataset")
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=4, verbose=0) as sink:
            for i, path in enumerate(sorted((folder / split).rglob("*.jpg"))):
                sink.write({"__key__": f"s{i:05d}", "jpg": path.read_bytes(), "cls": CLASSES.index(path.parent.name)})
    return out


def _pack(folder: Path, out: Path, size: str = "2KiB") -> list[str]:
    from emakit.training.cli import main

    code = main(["pack", str(folder), str(out), "--shard-size", size])
    assert code == 0
    return sorted(os.listdir(out))


@pytest.fixture(scope="session")
def sources(image_folder, tmp_path_factory):
    """Every source made once from the session's ImageFolder."""
    root = tmp_path_factory.mktemp("sources")
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(root / "hf-cache"))
    datasets = pytest.importorskip("datasets")
    datasets.config.HF_DATASETS_CACHE = root / "hf-cache"  # no writes to ~/.cache (read at import time)
    datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    _pack(image_folder, root / "packed")
    return {"folder": image_folder, "tars": _tar_dir(image_folder, root / "tars"),
            "hf": _hf_dataset(image_folder, root / "hf"), "packed": root / "packed",
            "hfp": _hf_parquet(root / "hf", root / "hfp"),
            "writer": _wds_writer_shards(image_folder, root / "writer")}


def _flags(sources, kind: str) -> list[str]:
    """The train.py data flags of each source."""
    return {
        "folder": [sources["folder"]],
        "tar": ["--data-dir", sources["tars"]],
        "torch": ["--data-dir", sources["folder"], "--dataset", "torch/image_folder", "--val-split", "val"],
        "hfds": ["--dataset", f"hfds/{sources['hf']}"],
        "hfids": ["--dataset", f"hfids/{sources['hfp']}", "--train-num-samples", str(N_TRAIN)],
        "wds": ["--data-dir", sources["packed"], "--dataset", "wds/packed"],
        "wids": ["--data-dir", sources["packed"], "--dataset", "wids/packed"],
        "wds-writer": ["--data-dir", sources["writer"], "--dataset", "wds/writer", "--num-classes", "3",
                       "--train-split", "train-{000000..000005}.tar", "--val-split", "val-{000000..000003}.tar"],
    }[kind]


# --------------------------------------------------------------------------- quick
def test_pack_shards_hold_every_image_once_and_timm_reads_them(sources, image_folder, tmp_path):
    from timm.data import create_dataset

    info = json.loads((sources["packed"] / "_info.json").read_text())
    assert info["classes"] == list(CLASSES)
    train = info["splits"]["train"]
    assert train["num_samples"] == N_TRAIN == sum(train["shard_lengths"]) and len(train["filenames"]) > 1
    assert info["splits"]["val"]["num_samples"] == N_VAL
    # a shard stays within --shard-size and holds as many samples as fit
    shards = _pack(image_folder, tmp_path / "sized", "30KiB")
    lengths = json.loads((tmp_path / "sized" / "_info.json").read_text())["splits"]["train"]["shard_lengths"]
    assert sum(lengths) == N_TRAIN and min(lengths[:-1]) > 1
    assert all((tmp_path / "sized" / name).stat().st_size <= 30 * 1024 for name in shards if name.endswith(".tar"))
    # timm's own wds reader, as timm's train.py would build it
    ds = create_dataset("wds/packed", root=str(sources["packed"]), split="train", is_training=False)
    got = sorted((hashlib.sha1(img.tobytes()).hexdigest(), target) for img, target in ds)
    from PIL import Image

    want = sorted((hashlib.sha1(Image.open(p).convert("RGB").tobytes()).hexdigest(), CLASSES.index(p.parent.name))
                  for p in (image_folder / "train").rglob("*.jpg"))
    assert got == want


def _stream(sources, world: int = 1, rank: int = 0, workers: int = 0, batch: int = 4, seed: int = 7):
    from emakit.training.sources import ShardStream, _Keys, shard_list

    shards, _ = shard_list(str(sources["packed"]), "train", None, "wds/")
    stream = ShardStream(shards, _Keys(None, None, "wds/"), seed=seed, batch_size=batch, world_size=world,
                         workers=workers)
    stream.rank = rank
    return stream


def _digest(batch) -> list[str]:
    images, _ = batch
    return [hashlib.sha1(t.numpy().tobytes()).hexdigest() for t in images]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_skip_reproduces_the_rest_of_the_epoch(sources, workers):
    # the resume rule of wds/: shard position + seed. The epoch's stream is a function of
    # (seed, epoch); skipping k batches yields exactly the batches k.. of the whole epoch.
    from torchvision.transforms import v2

    from emakit.training.sources import StreamLoader

    def run(skip: int, epoch: int) -> list[list[str]]:
        stream = _stream(sources, workers=workers)
        stream.transform = v2.Compose([v2.PILToTensor(), v2.RandomCrop(24)])  # random: seeded per sample
        loader = StreamLoader(stream, 4, seed=7, rank=0, workers=workers)
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip(skip * 4)
        return [_digest(b) for b in loader]

    whole = run(0, 1)
    assert len(whole) == N_TRAIN // 4
    assert run(0, 1) == whole and run(0, 2) != whole  # a pure function of the epoch
    assert run(3, 1) == whole[3:]


def test_every_reader_reads_its_own_shards_and_an_epoch_sees_every_sample_once(sources):
    seen, used = [], []
    for rank in range(2):
        stream = _stream(sources, world=2, rank=rank, batch=4)
        reads = []
        original = stream._read_shard
        stream._read_shard = lambda path, reads=reads, original=original: (reads.append(path), original(path))[1]
        used += [hashlib.sha1(bytes(img.tobytes())).hexdigest() for img, _ in stream]
        seen.append(set(reads))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24  # 24 shards of one sample
    assert len(used) == N_TRAIN == len(set(used))


def test_more_readers_than_shards_is_refused(sources):
    from emakit.training import UsageError

    with pytest.raises(UsageError, match=r"every reader needs its own shard"):
        _stream(sources, world=5, workers=5)


def _bad(sources, tmp_path, kind: str) -> list[str]:
    if kind == "prefix":
        return ["--dataset", "nope/x", "--data-dir", sources["packed"]]
    if kind == "missing shard":
        copy = tmp_path / "copy"
        shutil.copytree(sources["packed"], copy)
        (copy / "train-000003.tar").unlink()
        return ["--dataset", "wds/copy", "--data-dir", copy]
    if kind == "empty split":
        copy = tmp_path / "copy"
        shutil.copytree(sources["packed"], copy)
        info = json.loads((copy / "_info.json").read_text())
        info["splits"]["val"].update(num_samples=0, filenames=[], shard_lengths=[])
        (copy / "_info.json").write_text(json.dumps(info))
        return ["--dataset", "wids/copy", "--data-dir", copy]
    if kind == "no input key":
        return ["--dataset", f"hfds/{sources['hf']}", "--input-key", "picture"]
    if kind == "no split":
        return ["--dataset", "wds/packed", "--data-dir", sources["packed"], "--train-split", "training"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,words", [
    ("prefix", "unknown type nope/"), ("missing shard", "missing shard"), ("empty split", "is empty"),
    ("no input key", "no column 'picture' (--input-key)"), ("no split", "no split 'training'"),
])
def test_a_bad_source_is_one_line_exit_2_and_nothing_written(run_train, sources, tmp_path, kind, words):
    out = tmp_path / "out"
    code, _, err = run_train([*_bad(sources, tmp_path, kind), *ONE_EPOCH, "--output", out])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and words in lines[0], err
    assert not out.exists()


def test_a_missing_optional_package_names_its_pip_install(monkeypatch):
    from emakit.training import UsageError
    from emakit.training.sources import require

    monkeypatch.setitem(sys.modules, "wids", None)  # import wids -> ImportError
    with pytest.raises(UsageError, match=r"^--dataset wids/ needs the wids package: pip install wids$"):
        require("wids", "--dataset wids/")


# --------------------------------------------------------------------------- slow: train + validate
def _validate(capsys, argv: list) -> tuple[int, str, str]:
    import validate

    capsys.readouterr()
    code = validate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _eval_flags(train_flags: list) -> list:
    """validate.py's spelling of a source: the data flags, --val-split as --split."""
    flags = [str(f) for f in train_flags]
    out, i = [], 0
    while i < len(flags):
        if flags[i] in ("--val-split",):
            out += ["--split", flags[i + 1]]
            i += 2
        elif flags[i] in ("--train-split", "--num-classes", "--train-num-samples"):
            i += 2
        else:
            out.append(flags[i])
            i += 1
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "tar", "torch", "hfds", "hfids", "wds", "wids", "wds-writer"])
def test_each_source_trains_an_epoch_and_validate_py_reads_it(run_train, capsys, sources, tmp_path, kind):
    flags = _flags(sources, kind)
    code, _, err = run_train([*flags, *ONE_EPOCH, "--output", tmp_path, "--experiment", "run"])
    assert code == 0, err[-3000:]
    row = (tmp_path / "run" / "summary.csv").read_text().splitlines()
    got = dict(zip(row[0].split(","), row[1].split(",")))
    assert re.search(r"\beval: loss \S+ top1 \S+ top5 \S+ \((\d+) samples\)", err)[1] == str(N_VAL)
    assert "3 optimizer steps per epoch" in err  # 24 images, batch 8
    split = {"wds-writer": ["--split", "val-{000000..000003}.tar"], "wds": ["--split", "val"],
             "wids": ["--split", "val"], "tar": ["--split", "val"]}.get(kind, [])
    code, out, err = _validate(capsys, [*_eval_flags(flags), *split, "--checkpoint",
                                        tmp_path / "run" / "last.pth.tar", "--img-size", "32"])
    assert code == 0, err[-3000:]
    record = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert record["samples"] == N_VAL
    assert record["top1"] == pytest.approx(float(got["raw_eval_top1"]), abs=1e-6)


# --------------------------------------------------------------------------- slow: stop and resume
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tar", "wids", "wds", "hfids"])
def test_sigterm_mid_epoch_then_resume_is_bitwise_the_straight_run(run_train, sources, tmp_path, kind):
    # map-style sources through emakit's samplers; the streams (wds/, hfids/) by their rule: shard position + seed
    from test_train_e2e import assert_same, load
    from test_train_signals import ARGS, COMPARED, _resume_argv, _run_signalled

    base = [*_flags(sources, kind), *ARGS, "--epochs", "2", "--output", tmp_path]
    code, _, err = run_train([*base, "--experiment", "straight"])
    assert code == 0, err[-2000:]
    code, err = _run_signalled(run_train, [*base, "--experiment", "stopped"], "train 0 [4/12]", signal.SIGTERM)
    assert code == 143, err[-2000:]
    code, _, err = run_train(_resume_argv(err.strip().splitlines()[-1]))
    assert code == 0, err[-2000:]
    assert "continuing epoch 0 at step 5/12" in err
    a, b = load(tmp_path / "straight" / "last.pth.tar"), load(tmp_path / "stopped" / "last.pth.tar")
    for key in COMPARED:
        assert_same(a[key], b[key], key)


COUNTING_TRAIN = r'''
import hashlib, os, sys
sys.path.insert(0, os.environ["REPO"])
from emakit.training import sources
original = sources._Stream._decode
def counted(self, image, target, seed, restore):
    with open(os.path.join(os.environ["COUNT_DIR"], f"rank{os.environ['RANK']}-e{self.epoch}"), "a") as f:
        f.write(hashlib.sha1(image).hexdigest() + "\n")
    return original(self, image, target, seed, restore)
sources._Stream._decode = counted
import train
sys.exit(train.main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_torchrun_two_ranks_on_shards_see_every_sample_once_per_epoch(sources, tmp_path):
    from test_train_distributed import free_port, torchrun

    script, counts = tmp_path / "counting_train.py", tmp_path / "counts"
    script.write_text(COUNTING_TRAIN)
    counts.mkdir()
    cmd = [*torchrun(), "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script),
           *map(str, [*_flags(sources, "wds"), *FAST_ARGS, "-b", "4", "--epochs", "2", "--device", "cpu",
                      "--output", tmp_path / "out", "--experiment", "run"])]
    proc = subprocess.run(cmd, env=subprocess_env(REPO=str(REPO), COUNT_DIR=str(counts)), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for epoch in range(2):
        per_rank = [(counts / f"rank{r}-e{epoch}").read_text().split() for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) == N_TRAIN // 2
        assert not set(per_rank[0]) & set(per_rank[1]) and len(set(per_rank[0]) | set(per_rank[1])) == N_TRAIN
    # evaluation on the indexed val shards: exact counts over the 2 ranks, every epoch, raw and EMA
    assert re.findall(r"\beval(?: \(EMA\))?: .*\((\d+) samples\)", proc.stderr) == [str(N_VAL)] * 4


def test_class_map_sets_the_label_of_each_class_name(sources, tmp_path):
    from emakit.training.settings import DataSettings
    from emakit.training.sources import build_splits

    names = ["cat", "ant", "bee"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    for data in (DataSettings(path=str(sources["folder"]), class_map=str(tmp_path / "classes.txt")),
                 DataSettings(path=str(sources["tars"]), class_map=str(tmp_path / "classes.txt"))):
        splits = build_splits(data, seed=0)
        assert splits.classes == names
        for ds in (splits.train, splits.val):
            assert ds[0][1] in (0, 1, 2)
            assert sorted(set(ds.targets)) == [0, 1, 2]
            assert ds.targets.count(names.index("cat")) == len(ds) // 3
    with pytest.raises(Exception, match=r"--class-map lacks classes of .*: bee"):
        (tmp_path / "short.txt").write_text("cat\nant\n")
        build_splits(DataSettings(path=str(sources["folder"]), class_map=str(tmp_path / "short.txt")), seed=0)


@pytest.mark.slow
def test_the_set_up_commands_work_without_the_optional_packages(run_train, image_folder, tmp_path, monkeypatch):
    # README's two set-up commands train on a folder / the digits: none of these packages is imported
    for package in ("webdataset", "wids", "datasets", "tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, package, None)
    code, _, err = run_train([image_folder, *ONE_EPOCH, "--output", tmp_path])
    assert code == 0, err[-2000:]


def _mnist_files(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """torchvision's MNIST raw files (idx format), written here: 8x8 noise images, labels 0-9."""
    import numpy as np

    raw, rng = root / "MNIST" / "raw", np.random.default_rng(0)
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0x803, n, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([0x801, n], dtype=">i4").tobytes() + labels.tobytes())
    return root


def test_torch_mnist_reads_torchvisions_files_and_asks_for_download_when_missing(tmp_path):
    from emakit.training import UsageError
    from emakit.training.settings import DataSettings
    from emakit.training.sources import build_splits

    root = _mnist_files(tmp_path / "mnist")
    splits = build_splits(DataSettings(path=str(root), dataset="torch/mnist"), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.classes)) == (40, 20, 10)
    image, label = splits.train[3]
    assert image.mode == "RGB" and label == 3
    with pytest.raises(UsageError, match=r"--dataset torch/mnist in .*\(add --dataset-download to fetch it\)$"):
        build_splits(DataSettings(path=str(tmp_path / "empty"), dataset="torch/mnist"), seed=0)


@pytest.mark.parametrize("case,words", [("no folder", "is not a folder"), ("bad size", "--shard-size: "),
                                        ("again", "already holds shards")])
def test_pack_refuses_bad_input_in_one_line(sources, tmp_path, capsys, case, words):
    from emakit.training.cli import main

    src, out, size = sources["folder"], tmp_path / "out", "1MiB"
    if case == "no folder":
        src = tmp_path / "missing"
    elif case == "bad size":
        size = "lots"
    else:
        out = sources["packed"]
    before = sorted(os.listdir(out)) if out.exists() else None
    capsys.readouterr()
    assert main(["pack", str(src), str(out), "--shard-size", size]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("emakit: error: ") and words in err[0], err
    assert (sorted(os.listdir(out)) if out.exists() else None) == before
