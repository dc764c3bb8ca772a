"""Every bad input a user can give train.py: one clear line on stderr, exit status 2, and
no output folder (nothing half-written)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import FAST_ARGS


def fast(data, out: Path, *extra) -> list:
    return ([data] if data is not None else []) + FAST_ARGS + ["--epochs", "1", "--output", out,
                                                            "--experiment", "run", *extra]


def assert_clean_failure(code: int, err: str, out: Path, *needles: str) -> str:
    """Exit 2, exactly one line on stderr containing every needle, no run folder."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("train.py: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (out / "run").exists()
    return lines[0]


@pytest.fixture(scope="module")
def trained_checkpoint(image_folder, tmp_path_factory) -> Path:
    """last.pth.tar of a one-epoch test_resnet run on the shared ImageFolder."""
    import train

    out = tmp_path_factory.mktemp("ckpt")
    assert train.main([str(a) for a in fast(image_folder, out)]) == 0
    return out / "run" / "last.pth.tar"


def test_missing_data_path(run_train, tmp_path):
    code, _, err = run_train(fast(tmp_path / "nowhere", tmp_path / "out"))
    assert_clean_failure(code, err, tmp_path / "out", "nowhere", "does not exist")


def test_root_without_a_train_folder(run_train, tmp_path, image_folder):
    root = tmp_path / "data"
    shutil.copytree(image_folder / "val", root / "val")
    code, _, err = run_train(fast(root, tmp_path / "out"))
    assert_clean_failure(code, err, tmp_path / "out", str(root), "no train folder train/")


def test_root_without_a_validation_folder(run_train, tmp_path, image_folder):
    root = tmp_path / "data"
    shutil.copytree(image_folder / "train", root / "train")
    code, _, err = run_train(fast(root, tmp_path / "out"))
    assert_clean_failure(code, err, tmp_path / "out", "val/ or validation/")


def test_root_without_class_folders(run_train, tmp_path, image_folder):
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        shutil.copy(next((image_folder / split / "ant").iterdir()), root / split / "loose.jpg")
    code, _, err = run_train(fast(root, tmp_path / "out"))
    assert_clean_failure(code, err, tmp_path / "out", str(root / "train"), "no class folders")


def test_corrupt_image_is_named(run_train, tmp_path, image_folder_copy):
    bad = image_folder_copy / "train" / "bee" / "bee_003.jpg"
    bad.write_bytes(b"GIF89a? no, just garbage")
    code, _, err = run_train(fast(image_folder_copy, tmp_path / "out"))
    assert_clean_failure(code, err, tmp_path / "out", str(bad), "--skip-bad-images")


def test_truncated_image_found_while_training_is_named(run_train, tmp_path, image_folder_copy):
    bad = image_folder_copy / "train" / "cat" / "cat_001.jpg"
    bad.write_bytes(bad.read_bytes()[:-150])  # the header check passes, decoding fails
    code, _, err = run_train(fast(image_folder_copy, tmp_path / "out"))
    assert code == 2
    assert f"train.py: error: cannot read image {bad}" in err and "truncated" in err


def test_skip_bad_images_trains_without_the_bad_file(run_train, tmp_path, image_folder_copy):
    import torch

    bad = image_folder_copy / "val" / "cat" / "cat_001.jpg"
    bad.write_bytes(bad.read_bytes()[:-150])
    code, _, err = run_train(fast(image_folder_copy, tmp_path / "out", "--skip-bad-images"))
    assert code == 0, err
    assert f"skipping unreadable image {bad}" in err
    metrics = torch.load(tmp_path / "out" / "run" / "last.pth.tar", weights_only=True)["metrics"]
    total_val = sum(1 for _ in (image_folder_copy / "val").rglob("*.jpg"))
    assert metrics["eval_samples"] == total_val - 1


def test_unknown_model_says_how_to_list_models(run_train, tmp_path, image_folder):
    code, _, err = run_train(fast(image_folder, tmp_path / "out", "--model", "resnet18x"))
    assert_clean_failure(code, err, tmp_path / "out", "unknown model 'resnet18x'", "timm.list_models")


def test_a_half_life_without_a_unit_is_refused_when_parsed_even_with_the_ema_off(run_train, tmp_path, image_folder):
    """Checked by its kind at parse time, so also when --model-ema is off (issue 19: a YAML
    ``model_ema_half_life: 0.5`` was accepted silently with EMA off)."""
    for value in ("3parsecs", "0.5"):
        code, _, err = run_train(fast(image_folder, tmp_path / "out", "--no-model-ema", "--model-ema-half-life", value))
        assert_clean_failure(code, err, tmp_path / "out", "--model-ema-half-life", repr(value), "2000ba, 0.5ep")


@pytest.mark.parametrize("flags, needle", [
    (["--model-ema-decay", "1.5"], "decay=1.5 is outside [0, 1)"),
    (["--model-ema-every", "0"], "update_every=0 must be a positive integer"),
    (["--model-ema-schedule", "cosine"], "schedule='cosine' is unknown"),
    (["--model-ema-dtype", "int8"], "must be a floating dtype"),
])
def test_invalid_ema_settings_show_the_ema_error(run_train, tmp_path, image_folder, flags, needle):
    code, _, err = run_train(fast(image_folder, tmp_path / "out", *flags))
    assert_clean_failure(code, err, tmp_path / "out", "invalid EMA settings", needle)


def test_resume_file_missing(run_train, tmp_path, image_folder):
    code, _, err = run_train(fast(image_folder, tmp_path / "out", "--resume", tmp_path / "gone.pth.tar"))
    assert_clean_failure(code, err, tmp_path / "out", "--resume", "not found", "gone.pth.tar")


def test_resume_file_truncated(run_train, tmp_path, image_folder, trained_checkpoint):
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(trained_checkpoint.read_bytes()[:5000])
    code, _, err = run_train(fast(image_folder, tmp_path / "out", "--resume", cut))
    assert_clean_failure(code, err, tmp_path / "out", "--resume", "truncated", str(cut))


def test_resume_file_of_another_architecture(run_train, tmp_path, image_folder, trained_checkpoint):
    code, _, err = run_train(fast(image_folder, tmp_path / "out", "--resume", trained_checkpoint,
                                  "--model", "test_efficientnet"))
    assert_clean_failure(code, err, tmp_path / "out", "checkpoint of test_resnet", "--model is test_efficientnet",
                         "pass --model test_resnet")


def test_resume_file_with_another_class_count(run_train, tmp_path, image_folder, trained_checkpoint):
    code, _, err = run_train(fast(image_folder, tmp_path / "out", "--resume", trained_checkpoint,
                                  "--num-classes", "7"))
    assert_clean_failure(code, err, tmp_path / "out", "shape mismatch")


def test_output_folder_not_writable(run_train, tmp_path, image_folder):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = run_train(fast(image_folder, blocker / "out"))
    line = assert_clean_failure(code, err, blocker / "out", "cannot write to output folder", "--output")
    assert str(blocker / "out") in line


def test_unknown_flag(run_train, tmp_path):
    code, _, err = run_train(["--epocs", "1", "--output", tmp_path / "out"])
    assert_clean_failure(code, err, tmp_path / "out", "unrecognized arguments: --epocs")


def test_the_process_exit_status_is_2_with_a_single_stderr_line(train_subprocess, tmp_path):
    proc = train_subprocess(fast(tmp_path / "nowhere", tmp_path / "out"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"train.py: error: data folder {tmp_path / 'nowhere'} does not exist "
        "(omit it to train on the embedded digits dataset)"]
    assert proc.stdout == ""


def test_unknown_torchcompile_backend(run_train, tmp_path, image_folder):
    code, _, err = run_train(fast(image_folder, tmp_path / "out", "--torchcompile", "warp_drive"))
    assert_clean_failure(code, err, tmp_path / "out", "--torchcompile warp_drive", "unknown backend", "inductor")


def test_pretrained_path_missing(run_train, tmp_path, image_folder):
    code, _, err = run_train(fast(image_folder, tmp_path / "out", "--pretrained", "--pretrained-path",
                                  tmp_path / "weights.pth"))
    assert_clean_failure(code, err, tmp_path / "out", "weights.pth", "no such file")


# --------------------------------------------------------------------------- print_error under torchrun
def test_print_error_on_rank_0_prints_at_once(monkeypatch, capsys):
    import emakit.training as training

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(training.time, "sleep", lambda s: pytest.fail("rank 0 must not wait"))
    training.print_error("train.py", training.UsageError("bad flag\n  fix it"))
    assert capsys.readouterr().err == "train.py: error: bad flag fix it\n"


def test_print_error_on_another_rank_waits_then_names_the_rank(monkeypatch, capsys):
    """The error rank 0 did not meet is still printed, after the grace period."""
    import emakit.training as training

    waited = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(training.time, "sleep", waited.append)
    training.print_error("train.py", "only this rank saw it")
    assert waited == [training.PEER_ERROR_GRACE_S]
    assert capsys.readouterr().err == "train.py: error: rank 1: only this rank saw it\n"


def test_print_error_on_another_rank_stopped_while_waiting_prints_nothing(monkeypatch, capsys):
    """torchrun's SIGTERM once rank 0 has exited (StopSignals raises it as an interrupt)."""
    import emakit.training as training

    def stopped(seconds):
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(training.time, "sleep", stopped)
    training.print_error("train.py", "the same error rank 0 printed")
    assert capsys.readouterr().err == ""
