"""Choosing the EMA length (issue 5), trainer side: several EMAs in one run, the post-hoc
EMA's snapshots, BatchNorm recalibration of the evaluated EMA, and the end-of-run plot.

Expectations come from independent paths: separate single-EMA runs, step counts derived
from the dataset size, files on disk, torch's own ``swa_utils.update_bn`` and validate.py.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, count_images

pytestmark = pytest.mark.slow

DECAYS = ("0.5", "0.8", "0.95")
BATCH = 8  # FAST_ARGS' -b


def fast(data, out: Path, *extra, experiment: str = "run") -> list[str]:
    return [str(a) for a in [data, *FAST_ARGS, "--output", out, "--experiment", experiment, *extra]]


def train_ok(argv: list[str]) -> None:
    import train

    assert train.main(argv) == 0


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_summary(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def assert_tensors_equal(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        assert torch.equal(a[k], b[k]), f"{where}: {k}"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


# --------------------------------------------------------------------------- several EMAs
@pytest.fixture(scope="module")
def multi_run(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi")
    train_ok(fast(image_folder, out, "--epochs", "2", "--model-ema-decay", ",".join(DECAYS), experiment="multi"))
    return out / "multi"


@pytest.fixture(scope="module")
def single_runs(image_folder, tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("single")
    for i, decay in enumerate(DECAYS):
        train_ok(fast(image_folder, out, "--epochs", "2", "--model-ema-decay", decay, experiment=f"single{i}"))
    return [out / f"single{i}" for i in range(len(DECAYS))]


def test_three_emas_in_one_run_equal_three_single_ema_runs_bitwise(multi_run, single_runs):
    multi = load(multi_run / "last.pth.tar")
    for i, run in enumerate(single_runs):
        single = load(run / "last.pth.tar")
        key, meta = ("state_dict_ema", "ema") if i == 0 else (f"state_dict_ema_{i}", f"ema_{i}")
        assert_tensors_equal(multi[key], single["state_dict_ema"], key)
        assert multi[meta] == single["ema"]
        assert_tensors_equal(multi["state_dict"], single["state_dict"], "state_dict")
    header, rows = read_summary(multi_run / "summary.csv")
    assert header == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5",
                      "raw_eval_loss", "raw_eval_top1", "raw_eval_top5", "ema_eval_loss", "ema_eval_top1", "ema_eval_top5",
                      "ema1_eval_loss", "ema1_eval_top1", "ema1_eval_top5",
                      "ema2_eval_loss", "ema2_eval_top1", "ema2_eval_top5", "ema_best", "lr"]
    for i, run in enumerate(single_runs):
        _, single_rows = read_summary(run / "summary.csv")
        prefix = "ema" if i == 0 else f"ema{i}"
        for row, single in zip(rows, single_rows, strict=True):
            for k in ("loss", "top1", "top5"):
                assert row[f"{prefix}_eval_{k}"] == single[f"ema_eval_{k}"], (prefix, k)
            assert row["raw_eval_top1"] == single["raw_eval_top1"]
        # timm's eval_* hold the EMA that picks model_best (--model-ema-select first: the first EMA)
        assert [row[f"eval_{k}"] for k in ("loss", "top1", "top5")] == [row[f"ema_eval_{k}"] for k in
                                                                       ("loss", "top1", "top5")]


def test_the_epoch_log_shows_every_ema_and_the_best_one(multi_run):
    _, rows = read_summary(multi_run / "summary.csv")
    lines = re.findall(r"epoch \d+/1: .*", (multi_run / "train.log").read_text())
    assert len(lines) == len(rows) == 2
    for line, row in zip(lines, rows):
        for i in (1, 2):
            assert f"EMA{i} top1 {float(row[f'ema{i}_eval_top1']):.2f}" in line
        top1 = [float(row[c]) for c in ("ema_eval_top1", "ema1_eval_top1", "ema2_eval_top1")]
        best = top1.index(max(top1))
        assert row["ema_best"] == ("ema" if best == 0 else f"ema:{best}")
        assert f"best of 3 EMAs: {row['ema_best']}" in line


def test_validate_weights_ema_n_reproduces_the_extra_emas_logged_metrics(multi_run, image_folder, tmp_path, capsys):
    import validate

    results = tmp_path / "results.json"
    code = validate.main([str(image_folder), "--checkpoint", str(multi_run / "last.pth.tar"), "--weights", "ema:2",
                          "--no-progress", "--results-file", str(results)])
    assert code == 0, capsys.readouterr().err
    got = json.loads(results.read_text())[0]
    logged = load(multi_run / "last.pth.tar")["metrics"]
    assert got["top1"] == pytest.approx(logged["ema2_eval_top1"], abs=1e-9)
    assert got["loss"] == pytest.approx(logged["ema2_eval_loss"], rel=1e-6)


def test_summary_png_is_written_at_the_end_with_the_expected_size(multi_run):
    assert png_size(multi_run / "summary.png") == (1000, 400)  # plots.py: 10 x 4 inches at 100 dpi
    assert f"plot: {multi_run / 'summary.png'}" in (multi_run / "train.log").read_text()


@pytest.fixture(scope="module")
def multi_resumed_best(multi_run, image_folder, tmp_path_factory) -> Path:
    """The multi-EMA run stopped after epoch 0 and resumed, picking model_best on the best EMA."""
    out = tmp_path_factory.mktemp("multi_resumed")
    (out / "resumed").mkdir()
    shutil.copy(multi_run / "checkpoint-0.pth.tar", out / "resumed" / "last.pth.tar")
    train_ok(fast(image_folder, out, "--epochs", "2", "--model-ema-decay", ",".join(DECAYS),
                  "--model-ema-select", "best", "--resume", out / "resumed" / "last.pth.tar", experiment="resumed"))
    return out / "resumed"


def test_resume_restores_every_ema_exactly(multi_run, multi_resumed_best, image_folder):
    straight, resumed = load(multi_run / "last.pth.tar"), load(multi_resumed_best / "last.pth.tar")
    for key in ("state_dict_ema", "state_dict_ema_1", "state_dict_ema_2"):
        assert_tensors_equal(straight[key], resumed[key], key)
    for key in ("ema", "ema_1", "ema_2"):
        assert straight[key] == resumed[key]
    assert resumed["ema_2"]["num_updates"] == 2 * (count_images(image_folder / "train") // BATCH)


def test_model_ema_select_best_picks_the_checkpoint_on_the_best_ema(multi_resumed_best):
    ckpt = load(multi_resumed_best / "last.pth.tar")
    m = ckpt["metrics"]
    assert ckpt["metric"] == max(m["ema_eval_top1"], m["ema1_eval_top1"], m["ema2_eval_top1"])
    best = load(multi_resumed_best / "model_best.pth.tar")
    assert best["metric"] == max(best["metrics"][c] for c in ("ema_eval_top1", "ema1_eval_top1", "ema2_eval_top1"))


# --------------------------------------------------------------------------- post-hoc EMA
POSTHOC_EPOCHS, POSTHOC_EVERY = 3, 2


def posthoc_steps(image_folder: Path) -> tuple[int, list[int]]:
    """(optimizer steps per epoch, expected snapshot steps): every POSTHOC_EVERY steps plus the last."""
    per_epoch = count_images(image_folder / "train") // BATCH  # full batches only
    total = per_epoch * POSTHOC_EPOCHS
    steps = list(range(POSTHOC_EVERY, total + 1, POSTHOC_EVERY))
    return per_epoch, steps + ([total] if total % POSTHOC_EVERY else [])


def snapshot_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.glob("posthoc-*.pt"))}


@pytest.fixture(scope="module")
def posthoc_run(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("posthoc")
    train_ok(fast(image_folder, out, "--epochs", POSTHOC_EPOCHS, "--model-ema-posthoc",
                  "--posthoc-every", POSTHOC_EVERY, experiment="posthoc"))
    return out / "posthoc"


def test_posthoc_snapshots_are_written_every_n_steps_and_at_the_last_step(posthoc_run, image_folder):
    _, steps = posthoc_steps(image_folder)
    assert steps[-1] % POSTHOC_EVERY  # the data gives an off-interval last step: exercised
    expected = {f"posthoc-{s:09d}-s{sigma:.6f}.pt" for s in steps for sigma in (0.05, 0.10)}
    files = snapshot_files(posthoc_run / "posthoc")
    assert set(files) == expected
    snap = torch.load(files[f"posthoc-{steps[-1]:09d}-s0.050000.pt"], weights_only=True)
    assert snap["step"] == steps[-1] and snap["dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in snap["state_dict"].values() if v.is_floating_point())
    ckpt = load(posthoc_run / "last.pth.tar")
    assert ckpt["posthoc_ema"]["step"] == steps[-1] and ckpt["posthoc_ema"]["sigma_rels"] == [0.05, 0.1]


def test_posthoc_footprint_is_logged_before_and_after_and_the_sweep_command_at_the_end(posthoc_run, image_folder):
    _, steps = posthoc_steps(image_folder)
    log = (posthoc_run / "train.log").read_text()
    assert f"projected footprint {len(steps)} snapshots x 2 profiles x" in log
    used = int(re.search(r"MiB on disk \((\d+) bytes", log).group(1))
    assert used == sum(p.stat().st_size for p in snapshot_files(posthoc_run / "posthoc").values())
    assert (f"python validate.py {image_folder} --checkpoint {posthoc_run / 'last.pth.tar'} "
            "--posthoc-sigma-rel 0.02,0.05,0.08,0.15") in log


def test_resume_prunes_snapshots_after_the_checkpoint_and_continues_identically(posthoc_run, image_folder,
                                                                                tmp_path):
    per_epoch, steps = posthoc_steps(image_folder)
    resumed = tmp_path / "resumed"
    # A run that crashed during epoch 1: its last checkpoint is epoch 0 (a real last.pth.tar:
    # only last carries the post-hoc state, checkpoint-N files leave it out), and its folder
    # already holds snapshots after that step (the straight run's, and a stray later one).
    train_ok(fast(image_folder, tmp_path, "--epochs", 1, "--model-ema-posthoc", "--posthoc-every", POSTHOC_EVERY,
                  experiment="resumed"))
    for name, path in snapshot_files(posthoc_run / "posthoc").items():
        if int(name.split("-")[1]) > per_epoch:
            shutil.copy(path, resumed / "posthoc" / name)
    shutil.copy(posthoc_run / "posthoc" / f"posthoc-{steps[0]:09d}-s0.050000.pt",
                resumed / "posthoc" / "posthoc-000000999-s0.050000.pt")
    train_ok(fast(image_folder, tmp_path, "--epochs", POSTHOC_EPOCHS, "--model-ema-posthoc",  # interval from the ckpt
                  "--resume", resumed / "last.pth.tar", experiment="resumed"))
    pruned = sum(1 for s in steps if s > per_epoch) * 2 + 1
    assert f"deleted {pruned} snapshot file(s) newer than the resumed step {per_epoch}" in \
        (resumed / "train.log").read_text()
    straight, again = snapshot_files(posthoc_run / "posthoc"), snapshot_files(resumed / "posthoc")
    assert set(again) == set(straight)  # the first leg's off-interval final snapshot is gone too
    for name in straight:
        assert_tensors_equal(torch.load(straight[name], weights_only=True)["state_dict"],
                             torch.load(again[name], weights_only=True)["state_dict"], name)


def test_resuming_with_other_sigma_rels_exits_2_with_one_line_and_writes_nothing(posthoc_run, image_folder,
                                                                                 tmp_path, run_train):
    code, _, err = run_train(fast(image_folder, tmp_path, "--epochs", POSTHOC_EPOCHS + 1, "--model-ema-posthoc",
                                  "--posthoc-sigma-rels", "0.07", "--resume", posthoc_run / "last.pth.tar",
                                  experiment="other"))
    assert code == 2 and err.count("train.py: error:") == 1, err
    assert "post-hoc EMA" in err and "--posthoc-sigma-rels 0.05,0.1" in err
    assert not (tmp_path / "other").exists()


def test_validate_sweeps_the_posthoc_run_and_the_last_snapshot_is_the_checkpoints_power_ema(
        posthoc_run, image_folder, capsys):
    import validate
    from emakit.posthoc import reconstruct

    code = validate.main([str(image_folder), "--checkpoint", str(posthoc_run / "last.pth.tar"),
                          "--posthoc-sigma-rel", "0.05,0.08", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    _, rows = read_summary(posthoc_run / "posthoc_sweep.csv")
    assert [float(r["sigma_rel"]) for r in rows] == [0.05, 0.08]
    assert {int(r["samples"]) for r in rows} == {count_images(image_folder / "val")}
    # sigma_rel 0.05 is tracked: reconstructing it at the last step returns that snapshot,
    # which must hold the power EMA saved in last.pth.tar (up to fp16 storage).
    tracked = load(posthoc_run / "last.pth.tar")["posthoc_ema"]["profiles"][0]
    rebuilt = reconstruct(posthoc_run / "posthoc", 0.05)
    for k, v in tracked.items():
        if v.is_floating_point():
            torch.testing.assert_close(rebuilt[k].float(), v.half().float(), rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- post-hoc budget (issue 12)
def test_extending_a_posthoc_run_thins_old_snapshots_to_stay_within_the_budget(posthoc_run, image_folder, tmp_path):
    per_epoch, steps = posthoc_steps(image_folder)
    files = snapshot_files(posthoc_run / "posthoc")
    per_step = sum(p.stat().st_size for n, p in files.items() if n.startswith(f"posthoc-{steps[0]:09d}-"))
    budget = int(5.25 * per_step)  # room for 5 snapshot steps of both profiles
    resumed = tmp_path / "extended"
    shutil.copytree(posthoc_run, resumed)
    epochs = 2 * POSTHOC_EPOCHS
    train_ok(fast(image_folder, tmp_path, "--epochs", epochs, "--model-ema-posthoc", "--posthoc-budget", budget,
                  "--resume", resumed / "last.pth.tar", experiment="extended"))
    total = per_epoch * epochs
    # The resumed interval 2 would give ceil(total / 2) > 5 steps: it doubles to 4 and the old
    # snapshots off it (steps 2, 6 and the first run's last step 9) go at once.
    assert (per_epoch, total, POSTHOC_EVERY) == (3, 18, 2)
    log = (resumed / "train.log").read_text()
    assert "18 planned steps fit the budget at one snapshot every 4 steps (not 2); deleted 6 older snapshot " \
           "file(s) off that interval" in log
    kept = snapshot_files(resumed / "posthoc")
    assert sorted({int(n.split("-")[1]) for n in kept}) == [4, 8, 12, 16, 18]
    used = sum(p.stat().st_size for p in kept.values())
    assert used <= budget
    assert f"on disk ({used} bytes" in log
    # What was kept from the first run is untouched.
    for name in (n for n in kept if int(n.split("-")[1]) <= 9):
        assert kept[name].read_bytes() == files[name].read_bytes()


def test_two_sweeps_in_a_row_keep_both_sets_of_rows(posthoc_run, image_folder, tmp_path, capsys):
    import validate

    run = tmp_path / "run"
    shutil.copytree(posthoc_run, run)
    (run / "posthoc_sweep.csv").unlink(missing_ok=True)
    for sigmas in ("0.05,0.08", "0.03"):
        assert validate.main([str(image_folder), "--checkpoint", str(run / "last.pth.tar"),
                              "--posthoc-sigma-rel", sigmas, "--no-progress"]) == 0, capsys.readouterr().err
    _, rows = read_summary(run / "posthoc_sweep.csv")
    assert [float(r["sigma_rel"]) for r in rows] == [0.05, 0.08, 0.03]
    assert rows[0]["sweep_id"] == rows[1]["sweep_id"] != rows[2]["sweep_id"]
    assert [r["best"] for r in rows].count("True") == 2  # one best per sweep
    assert png_size(run / "posthoc_sweep.png") == (600, 400)


@pytest.mark.parametrize("argv, message", [
    (["--model-ema-posthoc", "--posthoc-budget", "lots"], "--posthoc-budget must be a size such as 512MiB"),
    (["--model-ema-posthoc", "--posthoc-budget", "1KiB"], "--posthoc-budget 1KiB (1.0 KiB) holds 0 snapshot step(s)"),
    (["--label-noise", "1"], "argument --label-noise: invalid value '1' (too large); give a rate in [0, 1)"),
    (["--sched", "cosinus"], "; try cosine, step, multistep, plateau, poly, tanh, none"),
])
def test_posthoc_budget_label_noise_and_sched_mistakes_exit_2_with_one_line_and_leave_nothing(
        argv, message, image_folder, tmp_path, run_train):
    code, _, err = run_train(fast(image_folder, tmp_path, *argv, experiment="bad"))
    assert code == 2 and err.count("train.py: error:") == 1 and message in err, err
    assert not (tmp_path / "bad").exists()


def test_sched_none_keeps_the_lr_constant_after_warmup_and_flips_the_asked_labels(image_folder, tmp_path):
    train_ok(fast(image_folder, tmp_path, "--epochs", 3, "--sched", "none", "--warmup-epochs", 1,
                  "--warmup-lr", "1e-4", "--lr", "0.02", "--label-noise", "0.5", experiment="const"))
    _, rows = read_summary(tmp_path / "const" / "summary.csv")
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-4, 0.02, 0.02])
    n_train = count_images(image_folder / "train")
    assert f"label noise: {n_train // 2} of {n_train} training labels (50%) flipped" in \
        (tmp_path / "const" / "train.log").read_text()


# --------------------------------------------------------------------------- BN recalibration
RECAL = ["-b", "24", "--no-aug", "--epochs", "2"]  # one batch = the 24 training images, no randomness in it


@pytest.fixture(scope="module")
def recal_runs(image_folder, tmp_path_factory):
    """(run with --model-ema-bn-recal, run without, EMA state dicts seen by evaluate in the first)."""
    from emakit.training import evaluation as run_module

    seen: list[dict[str, torch.Tensor]] = []
    evaluate_many = run_module.evaluate_many  # one pass evaluates the raw weights and every EMA

    def spy(targets, *args, **kwargs):
        for target in targets:
            if target.label == " (EMA)":
                seen.append({k: v.clone() for k, v in target.module.state_dict().items()})
        return evaluate_many(targets, *args, **kwargs)

    out = tmp_path_factory.mktemp("recal")
    run_module.evaluate_many = spy
    try:
        train_ok(fast(image_folder, out, *RECAL, "--model-ema-bn-recal", "50", experiment="recal"))
    finally:
        run_module.evaluate_many = evaluate_many
    train_ok(fast(image_folder, out, *RECAL, experiment="plain"))
    return out / "recal", out / "plain", seen


def is_bn_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_bn_recal_changes_only_bn_buffers_during_eval_and_leaves_the_ema_as_without_it(recal_runs):
    recal, plain, seen = recal_runs
    with_recal, without = load(recal / "last.pth.tar"), load(plain / "last.pth.tar")
    assert_tensors_equal(with_recal["state_dict_ema"], without["state_dict_ema"], "averaging is unchanged")
    assert_tensors_equal(with_recal["state_dict"], without["state_dict"], "training is unchanged")
    at_eval, averaged = seen[-1], with_recal["state_dict_ema"]
    assert at_eval.keys() == averaged.keys()
    for k in averaged:
        if not is_bn_stat(k):
            assert torch.equal(at_eval[k], averaged[k]), k
    means = [k for k in averaged if k.endswith("running_mean")]
    assert means and all(not torch.equal(at_eval[k], averaged[k]) for k in means)
    stored = with_recal["ema_bn_recal"]
    assert stored["num_batches"] == 50 and len(stored["buffers"]) == 1
    assert_tensors_equal(stored["buffers"][0], {k: v for k, v in at_eval.items() if is_bn_stat(k)}, "ema_bn_recal")


def test_bn_recal_metrics_equal_evaluating_an_independently_recalibrated_copy(recal_runs, image_folder, tmp_path,
                                                                               capsys):
    import timm
    import validate
    from PIL import Image
    from torchvision.transforms import functional as F

    recal, _, _ = recal_runs
    ckpt = load(recal / "last.pth.tar")
    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(ckpt["state_dict_ema"])
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]  # what train.py normalises with
    images = torch.stack([F.normalize(F.to_tensor(Image.open(p).convert("RGB")), mean, std)
                          for p in sorted((image_folder / "train").rglob("*.jpg"))])
    torch.optim.swa_utils.update_bn([images], model)  # torch's own cumulative BN estimate, one batch of all 24
    copy = tmp_path / "recalibrated.pth.tar"
    torch.save({"arch": "test_resnet", "epoch": ckpt["epoch"], "args": ckpt["args"],
                "state_dict": ckpt["state_dict"], "state_dict_ema": model.state_dict()}, copy)
    results = tmp_path / "results.json"
    assert validate.main([str(image_folder), "--checkpoint", str(copy), "--use-ema", "--no-progress",
                          "--results-file", str(results)]) == 0, capsys.readouterr().err
    got = json.loads(results.read_text())[0]
    logged = ckpt["metrics"]
    assert got["top1"] == pytest.approx(logged["ema_eval_top1"], abs=1e-9)
    assert got["loss"] == pytest.approx(logged["ema_eval_loss"], rel=1e-4)
    _, rows = read_summary(recal / "summary.csv")
    assert float(rows[-1]["ema_eval_top1"]) == logged["ema_eval_top1"]
