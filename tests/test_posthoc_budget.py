"""Post-hoc EMA at a bounded cost (issue 12): the disk budget, its default's accuracy,
thinning when a run is extended, and accumulating sweeps."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from conftest import FAST_ARGS
from emakit import posthoc as ph
from emakit.training.averages import PosthocTracker, auto_posthoc_every, posthoc_snapshot_cap
from emakit.training.settings import DEFAULT_POSTHOC_BUDGET

TRACKED = (0.05, 0.10)


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, nbytes, multiple", [
    ("512MiB", 512 * 2**20, None), ("2GiB", 2 * 2**30, None), ("1.5G", int(1.5 * 2**30), None),
    ("500MB", 500 * 10**6, None), ("2gb", 2 * 10**9, None), ("4096", 4096, None), ("10 KiB", 10 * 2**10, None),
    ("8x", None, 8.0), ("16.5X", None, 16.5), ("none", None, None),
])
def test_budget_accepts_sizes_multiples_and_none(text, nbytes, multiple):
    budget = ph.parse_budget(text)
    assert (budget.nbytes, budget.multiple) == (nbytes, multiple)
    assert budget.resolve(1000) == (None if text == "none" else nbytes if multiple is None else int(multiple * 1000))


@pytest.mark.parametrize("text", ["", "0x", "-3x", "12 parsecs", "x", "8xx", "nan", "0"])
def test_budget_refuses_anything_else(text):
    with pytest.raises(ValueError, match="budget must be"):
        ph.parse_budget(text)


def test_model_fp32_bytes_counts_float_state_as_float32_and_integers_as_stored():
    model = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5)).to(torch.float16)
    # weight 50 + bias 5 + BN weight/bias/mean/var 4 x 5 = 75 floats x 4 bytes; num_batches_tracked int64 = 8
    assert ph.model_fp32_bytes(model) == 75 * 4 + 8


def test_a_budget_of_n_times_the_model_holds_n_minus_one_steps_of_two_fp16_profiles():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))  # 263k params: headers < 1%
    budget_bytes, cap = posthoc_snapshot_cap(model, "17x", n_profiles=2, snapshot_dtype="float16")
    assert budget_bytes == 17 * ph.model_fp32_bytes(model)
    assert cap == 16
    _, cap32 = posthoc_snapshot_cap(model, "17x", n_profiles=2, snapshot_dtype="float32")
    assert cap32 == 8
    assert posthoc_snapshot_cap(model, "none", n_profiles=2, snapshot_dtype="float16") == (None, None)
    assert posthoc_snapshot_cap(model, "17x", n_profiles=2, snapshot_dtype="float16", max_snapshots=5)[1] == 5
    with pytest.raises(ValueError, match=r"holds 1 snapshot step\(s\) .* needs at least 2: pass --posthoc-budget 2"):
        posthoc_snapshot_cap(model, "1.5x", n_profiles=2, snapshot_dtype="float16")


# --------------------------------------------------------------------------- trajectories
def noisy_sgd(seed: int = 0, hidden: int = 512):
    """A realistic noisy trajectory: an MLP trained by SGD (momentum, constant lr) on a
    fixed random classification task whose labels are 40% wrong, one minibatch per step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=g)
    y = (x[:, :10].argmax(1) + (torch.rand(512, generator=g) < 0.4) * torch.randint(1, 10, (512,), generator=g)) % 10
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step() -> None:
        idx = torch.randint(0, 512, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, step


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in state.values() if t.is_floating_point()])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def tracked_run(folder, budget: str, total: int, targets, seed: int = 0):
    """Train ``total`` steps with the trainer's tracker at ``budget``; return the tracker
    and the directly tracked power EMAs of ``targets``."""
    model, step = noisy_sgd(seed)
    budget_bytes, cap = posthoc_snapshot_cap(model, budget, n_profiles=2, snapshot_dtype="float16")
    tracker = PosthocTracker(model, sigma_rels=TRACKED, every=auto_posthoc_every(total, cap), snapshot_dtype="float16",
                             max_snapshots=cap, total_steps=total, budget_bytes=budget_bytes)
    tracker.open_folder(str(folder))
    direct = ph.PowerEMA(model, targets)
    for _ in range(total):
        step()
        tracker.update(model)
        direct.update(model)
    tracker.finish()
    return tracker, direct


INSIDE, OUTSIDE = (0.06, 0.075, 0.09), (0.02, 0.15, 0.2)


def test_default_budget_reconstructs_within_one_percent_inside_and_outside_the_tracked_pair(tmp_path):
    """Must-show 2: the default budget (16 snapshot steps for this model) keeps the relative
    L2 error of a reconstruction below the target 1% inside the tracked pair (the bench
    measures <= 0.03% in float16) and, by the same default, below 1% out to 0.02 and 0.20."""
    total = 400
    tracker, direct = tracked_run(tmp_path / "default", DEFAULT_POSTHOC_BUDGET, total, INSIDE + OUTSIDE)
    steps = tracker.stored_steps()
    assert len(steps) == tracker.max_snapshots == 16 and steps[-1] == total
    assert tracker.disk_usage() <= tracker.budget_bytes
    rebuilt = ph.reconstruct_many(tracker.writer.folder, INSIDE + OUTSIDE)
    errors = {s: rel_l2(flat(r), flat(direct.profile_state_dict(k))) for k, (s, r) in enumerate(zip(INSIDE + OUTSIDE,
                                                                                                    rebuilt))}
    assert all(errors[s] < 0.01 for s in INSIDE), errors
    assert all(errors[s] < 0.01 for s in OUTSIDE), errors


def test_the_error_measure_fails_a_budget_too_small_for_the_target(tmp_path):
    """The control for the test above: 2 snapshot steps (a 3x budget) cannot rebuild the
    long EMA outside the pair within 1% (the bench and this trajectory give ~1.5%), so
    that test can fail."""
    tracker, direct = tracked_run(tmp_path / "small", "3x", 400, (0.2,))
    assert tracker.stored_steps() == [200, 400]
    error = rel_l2(flat(ph.reconstruct(tracker.writer.folder, 0.2)), flat(direct.profile_state_dict(0)))
    assert error > 0.01


def test_an_extended_run_thins_old_snapshots_stays_within_the_cap_and_reconstructs(tmp_path):
    """Resume with more steps: old snapshots off the widened interval are deleted up front,
    the folder never holds more than the cap, and the profiles continue exactly."""
    cap, first, total = 8, 100, 200
    model, step = noisy_sgd(1)
    folder = str(tmp_path / "posthoc")
    direct, straight = ph.PowerEMA(model, (0.07,)), ph.PowerEMA(model, TRACKED)

    def advance(tracker: PosthocTracker, steps: int) -> None:
        for _ in range(steps):
            step()
            for ema in (tracker, direct, straight):
                ema.update(model)
            assert len(tracker.stored_steps()) <= cap
        tracker.finish()

    tracker = PosthocTracker(model, sigma_rels=TRACKED, every=auto_posthoc_every(first, cap), snapshot_dtype="float16",
                             max_snapshots=cap, total_steps=first)
    tracker.open_folder(folder)
    advance(tracker, first)
    assert tracker.stored_steps() == [13, 26, 39, 52, 65, 78, 91, 100]

    # "--resume" with a longer run: a new tracker from the checkpointed state.
    state = tracker.state_dict()
    resumed = PosthocTracker(model, sigma_rels=TRACKED, every=state["snapshot_every"], snapshot_dtype="float16",
                             max_snapshots=cap, total_steps=total)
    resumed.load_state_dict(state)
    resumed.open_folder(folder)
    assert resumed.interval == 26 and resumed.stored_steps() == [26, 52, 78]
    advance(resumed, total - first)
    assert resumed.stored_steps() == [26, 52, 78, 104, 130, 156, 182, 200]
    for k in range(len(TRACKED)):
        assert all(torch.equal(a, b) for a, b in zip(resumed.power.profiles[k], straight.profiles[k]))
    error = rel_l2(flat(ph.reconstruct(folder, 0.07)), flat(direct.profile_state_dict(0)))
    assert error < 0.01


def test_a_save_that_overflows_the_cap_thins_and_keeps_the_newest_step(tmp_path):
    model, step = noisy_sgd(2, hidden=8)
    ema = ph.PowerEMA(model, TRACKED)
    writer = ph.SnapshotWriter(tmp_path, 3, max_snapshots=4)  # not planned: the run is longer than it fits
    for _ in range(20):
        step()
        ema.update(model)
        writer.maybe_save(ema)
        steps = sorted({s.step for s in ph.list_snapshots(tmp_path)})
        assert len(steps) <= 4
    assert writer.every == 6 and steps == [6, 12, 18]
    for _ in range(2):
        step()
        ema.update(model)
    writer.save(ema)  # the run's off-interval last step (22)
    assert sorted({s.step for s in ph.list_snapshots(tmp_path)}) == [6, 12, 18, 22]


def test_an_unbounded_writer_deletes_nothing(tmp_path):
    model, step = noisy_sgd(3, hidden=8)
    ema = ph.PowerEMA(model, TRACKED)
    writer = ph.SnapshotWriter(tmp_path, 2)
    for _ in range(9):
        step()
        ema.update(model)
        writer.maybe_save(ema)
    writer.save(ema)
    assert writer.plan(1000) == 2
    assert sorted({s.step for s in ph.list_snapshots(tmp_path)}) == [2, 4, 6, 8, 9]


def test_projected_footprint_counts_the_interval_multiples_and_the_last_step(tmp_path):
    model, _ = noisy_sgd(0, hidden=64)
    tracker = PosthocTracker(model, sigma_rels=TRACKED, every=7, snapshot_dtype="float16", max_snapshots=None,
                             total_steps=100)
    assert tracker.projected_footprint().n_snapshots == math.ceil(100 / 7) == 15


def test_a_tracker_given_the_runs_emas_updates_them_and_the_profiles_in_one_fused_pass(tmp_path, monkeypatch):
    """One engine: the run's MultiEMA members and the two power profiles take one
    ``_foreach_lerp_`` per step, end bitwise equal to updating them apart, and keep their
    checkpoint state (the EMAs' keys, the tracker's ``posthoc_ema`` keys)."""
    from emakit import MultiEMA
    from emakit.training.averages import ema_checkpoint_state

    model, step = noisy_sgd(4, hidden=16)
    run_emas, apart = MultiEMA(model, decays=(0.9, 0.99)), MultiEMA(model, decays=(0.9, 0.99))
    tracker = PosthocTracker(model, sigma_rels=TRACKED, every=5, snapshot_dtype="float16", max_snapshots=None,
                             total_steps=12, ema=run_emas)
    alone = PosthocTracker(model, sigma_rels=TRACKED, every=5, snapshot_dtype="float16", max_snapshots=None,
                           total_steps=12)
    assert tracker.owns_ema and not alone.owns_ema
    tracker.open_folder(str(tmp_path / "one"))
    calls = []
    real = torch._foreach_lerp_
    for _ in range(12):
        step()
        monkeypatch.setattr(torch, "_foreach_lerp_", lambda d, s, w: (calls.append(len(d)), real(d, s, w)))
        tracker.update(model)
        monkeypatch.setattr(torch, "_foreach_lerp_", real)
        apart.update(model)
        alone.update(model)
    n_float = len(list(model.parameters()))
    assert calls == [2 * n_float] + [4 * n_float] * 11  # step 1: the profiles copy, the EMAs average
    assert run_emas.num_updates == tracker.power.step == 12
    assert tracker.stored_steps() == [5, 10]
    mine, theirs = ema_checkpoint_state(run_emas), ema_checkpoint_state(apart)
    assert list(mine) == ["state_dict_ema", "ema", "state_dict_ema_1", "ema_1"] == list(theirs)
    for key in ("state_dict_ema", "state_dict_ema_1"):
        assert all(torch.equal(mine[key][k], theirs[key][k]) for k in theirs[key])
    state, ref = tracker.state_dict(), alone.state_dict()
    assert list(state) == list(ref) and state["step"] == 12
    for a, b in zip(state["profiles"], ref["profiles"]):
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in b)


# --------------------------------------------------------------------------- sweeps accumulate
def test_sweep_table_keeps_every_sweep_and_the_plot_draws_each(tmp_path, monkeypatch):
    from emakit.training import validation
    from emakit.training.validation import ResultRecord, SweepRow

    drawn = []
    monkeypatch.setattr(validation, "plot_sweeps", lambda sweeps, out, title: drawn.append(sweeps))

    def sweep(sigmas, top1s):
        rows = [SweepRow(s, 90, 0.9, 10.0, ResultRecord("m", "c", f"posthoc:{s:g}", t, 99.0, 0.5, 1.0, 32, 1.0,
                                                        "bilinear", 360, posthoc={"sigma_rel": s}))
                for s, t in zip(sigmas, top1s)]
        return validation.write_sweep_outputs(rows, validation.pick_best(rows), str(tmp_path), "csv")

    sweep([0.02, 0.05], [80.0, 81.0])
    sweep([0.1, 0.2, 0.05], [83.0, 82.0, 81.5])
    with open(tmp_path / "posthoc_sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["sigma_rel"]) for r in rows] == [0.02, 0.05, 0.1, 0.2, 0.05]
    ids = [r["sweep_id"] for r in rows]
    assert ids[0] == ids[1] != ids[2] == ids[3] == ids[4] and all(r["sweep_time"] for r in rows)
    assert [r["best"] for r in rows] == ["False", "True", "True", "False", "False"]
    assert [len(d) for d in drawn] == [1, 2]
    assert [s[1] for s in drawn[1]] == [[0.02, 0.05], [0.1, 0.2, 0.05]] and [s[3] for s in drawn[1]] == [1, 0]


# --------------------------------------------------------------------------- noisy labels
def test_flip_labels_changes_exactly_the_asked_fraction_to_other_classes_reproducibly():
    from emakit.training.data import ImageListDataset, flip_labels

    clean = [i % 10 for i in range(1000)]
    ds = ImageListDataset([None] * 1000, clean)
    flipped = flip_labels(ds, 0.4, 10, seed=7)
    changed = [i for i in range(1000) if ds.targets[i] != clean[i]]
    assert changed == flipped and len(changed) == 400
    assert all(0 <= t < 10 for t in ds.targets)
    counts = [sum(1 for i in changed if (ds.targets[i] - clean[i]) % 10 == k) for k in range(1, 10)]
    assert min(counts) > 20  # every other class is a possible new label
    again = ImageListDataset([None] * 1000, clean)
    assert flip_labels(again, 0.4, 10, seed=7) == flipped and again.targets == ds.targets
    assert flip_labels(ImageListDataset([None] * 1000, clean), 0.4, 10, seed=8) != flipped


def test_label_noise_flips_the_training_split_only(image_folder):
    from emakit.training.build import load_data
    from emakit.training.data import build_datasets
    from emakit.training.settings import DataSettings

    noisy, _ = load_data(DataSettings(path=str(image_folder), workers=0, label_noise=0.5), seed=3)
    clean = build_datasets(str(image_folder))
    assert noisy.val.targets == clean.val.targets
    assert sum(a != b for a, b in zip(noisy.train.targets, clean.train.targets)) == len(clean.train) // 2


@pytest.mark.slow
def test_train_py_updates_its_emas_and_the_posthoc_profiles_in_one_fused_pass(image_folder, tmp_path, run_train,
                                                                              monkeypatch):
    """With --model-ema-posthoc the run's EMAs join the post-hoc engine: the EMAs are never
    updated on their own (one MultiEMA pass per step for EMAs + profiles), and their weights
    are bitwise those of a run without post-hoc EMA."""
    from emakit import ModelEMA, MultiEMA

    calls = {"ema": 0, "engine": 0}
    real_ema, real_multi = ModelEMA.update, MultiEMA.update

    def ema_update(self, model):
        calls["ema"] += 1
        return real_ema(self, model)

    def multi_update(self, model):
        calls["engine"] += 1
        return real_multi(self, model)

    monkeypatch.setattr(ModelEMA, "update", ema_update)
    monkeypatch.setattr(MultiEMA, "update", multi_update)
    argv = [str(image_folder), *FAST_ARGS, "--model-ema-decay", "0.9,0.99", "--epochs", "1", "--output",
            str(tmp_path)]
    code, _, err = run_train(argv + ["--experiment", "posthoc", "--model-ema-posthoc"])
    assert code == 0, err
    steps = torch.load(tmp_path / "posthoc" / "last.pth.tar", weights_only=False)["metrics"]["optimizer_steps"]
    assert steps >= 2 and calls == {"ema": 0, "engine": steps}  # one fused pass per step, nothing else
    calls.update(ema=0, engine=0)
    code, _, err = run_train(argv + ["--experiment", "plain"])
    assert code == 0, err
    assert calls == {"ema": 0, "engine": steps}  # two EMAs: one MultiEMA pass per step
    fused = torch.load(tmp_path / "posthoc" / "last.pth.tar", weights_only=False)
    plain = torch.load(tmp_path / "plain" / "last.pth.tar", weights_only=False)
    for key in ("state_dict_ema", "state_dict_ema_1"):
        assert fused[key].keys() == plain[key].keys()
        for name, value in plain[key].items():
            assert torch.equal(fused[key][name], value), (key, name)
