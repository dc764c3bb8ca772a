"""Power-function EMA and post-hoc reconstruction (EDM2, Karras et al. 2024), emakit.posthoc.

Expectations are independent of the implementation: closed-form formulas written out
here, float64 explicit weighted averages, a directly tracked power EMA, bytes on disk.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from emakit import posthoc as ph


def _closed_form_sigma_rel(gamma: float) -> float:
    # EDM2 Eq. 123, written out independently of the module.
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def _trajectory(n_steps: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Float64 weights that drift: offset + linear trend + random walk, shape [n_steps, *shape]."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(shape, generator=g, dtype=torch.float64)
    trend = torch.randn(shape, generator=g, dtype=torch.float64)
    walk = (0.01 * torch.randn((n_steps, *shape), generator=g, dtype=torch.float64)).cumsum(0)
    time = torch.linspace(0, 1, n_steps, dtype=torch.float64).view(-1, *[1] * len(shape))
    return offset + trend * time + walk


class _Toy(nn.Module):
    """Linear + BatchNorm: float parameters, float buffers and an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)


def _drive(model: _Toy, weights: torch.Tensor, biases: torch.Tensor, t: int) -> None:
    with torch.no_grad():
        model.fc.weight.copy_(weights[t])
        model.fc.bias.copy_(biases[t])
        model.bn.num_batches_tracked.fill_(t + 1)


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state["fc.weight"].flatten(), state["fc.bias"].flatten()]).double()


# --- sigma_rel <-> gamma, beta -------------------------------------------------------------

@pytest.mark.parametrize("sigma_rel", [0.001, 0.01, 0.05, 0.07, 0.10, 0.2, 0.28, ph.SIGMA_REL_MAX])
def test_sigma_rel_to_gamma_solves_the_closed_form(sigma_rel: float) -> None:
    gamma = ph.sigma_rel_to_gamma(sigma_rel)
    assert gamma >= 0
    assert _closed_form_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert ph.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)


def test_known_gammas_of_the_default_profiles() -> None:
    # EDM2's defaults: sigma_rel 0.05 <-> gamma ~16.97, 0.10 <-> ~6.94; 1/sqrt(12) = uniform.
    assert ph.sigma_rel_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)
    assert ph.sigma_rel_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)
    assert ph.sigma_rel_to_gamma(1 / math.sqrt(12)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0, 6.94, 16.97, 500.0])
def test_gamma_round_trip(gamma: float) -> None:
    assert ph.sigma_rel_to_gamma(ph.gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_power_beta_matches_formula_and_first_update_copies() -> None:
    for gamma in (0.0, 6.94, 16.97):
        assert ph.power_beta(1, gamma) == 0.0
        for t in (2, 10, 1234):
            assert ph.power_beta(t, gamma) == pytest.approx((1 - 1 / t) ** (gamma + 1), rel=1e-15)
    assert ph.power_beta(7, 0.0) == pytest.approx(6 / 7)  # gamma 0: running mean


# --- PowerEMA -------------------------------------------------------------------------------

def test_power_ema_equals_explicit_power_weighted_average() -> None:
    n = 200
    weights, biases = _trajectory(n, (4, 6), seed=0), _trajectory(n, (4,), seed=1)
    model = _Toy()
    ema = ph.PowerEMA(model, (0.05, 0.10))
    for t in range(n):
        _drive(model, weights, biases, t)
        ema.update(model)
    assert ema.step == n
    thetas = torch.cat([weights.flatten(1), biases.flatten(1)], dim=1)  # [n, d] float64
    tau = torch.arange(1, n + 1, dtype=torch.float64)
    for k, gamma in enumerate(ema.gammas):
        got = _flat(ema.profile_state_dict(k))
        # Exact discrete weights: the density (g+1) x^g / t^(g+1) integrated over each step.
        w_exact = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / n ** (gamma + 1)
        assert w_exact.sum().item() == pytest.approx(1.0, rel=1e-12)
        want = w_exact @ thetas
        assert torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want) < 1e-6
        # The defining property, weights proportional to t^gamma, holds up to the O(gamma/n)
        # difference between a step's integral and its right end point.
        w_pow = tau ** gamma / (tau ** gamma).sum()
        approx = w_pow @ thetas
        assert torch.linalg.vector_norm(got - approx) / torch.linalg.vector_norm(approx) < 2e-3


def test_power_ema_copies_non_float_buffers_and_averages_float_ones() -> None:
    model = _Toy()
    ema = ph.PowerEMA(model, (0.10,))
    for t in range(5):
        with torch.no_grad():
            model.bn.running_mean.fill_(float(t))
            model.bn.num_batches_tracked.fill_(100 + t)
        ema.update(model)
    state = ema.profile_state_dict(0)
    assert state["bn.num_batches_tracked"].dtype == torch.int64
    assert state["bn.num_batches_tracked"].item() == 104
    assert state["bn.running_mean"].dtype == torch.float32
    assert 0.0 < state["bn.running_mean"][0].item() < 4.0  # an average, not a copy


def test_power_ema_keeps_fp32_for_a_bf16_model() -> None:
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = ph.PowerEMA(model, (0.10,))
    for _ in range(3):
        ema.update(model)
    assert ema.profile_state_dict(0)["weight"].dtype == torch.float32
    torch.testing.assert_close(ema.profile_state_dict(0)["weight"], model.weight.float())


class _CompiledLike(nn.Module):
    """Stands in for a torch.compile result: the real module under ``_orig_mod``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_power_ema_unwraps_dataparallel_and_compile_in_any_order() -> None:
    model = _Toy()
    wrapped = nn.DataParallel(_CompiledLike(model))
    ema = ph.PowerEMA(wrapped)
    assert ema.keys == list(model.state_dict().keys())
    ema.update(wrapped)
    ema.update(_CompiledLike(nn.DataParallel(model)))
    assert ema.step == 2


def test_power_ema_state_dict_resumes_exactly(tmp_path) -> None:
    n, cut = 40, 17
    weights, biases = _trajectory(n, (4, 6), seed=2), _trajectory(n, (4,), seed=3)
    model = _Toy()
    straight = ph.PowerEMA(model)
    first = ph.PowerEMA(model)
    for t in range(n):
        _drive(model, weights, biases, t)
        straight.update(model)
        if t < cut:
            first.update(model)
        if t == cut - 1:
            torch.save(first.state_dict(), tmp_path / "ema.pt")
            resumed = ph.PowerEMA(_Toy())
            resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
        if t >= cut:
            resumed.update(model)
    assert resumed.step == straight.step == n
    for k in range(2):
        for a, b in zip(resumed.profiles[k], straight.profiles[k]):
            assert torch.equal(a, b)


def test_power_ema_rejects_a_different_model() -> None:
    ema = ph.PowerEMA(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="structure the EMA was created from"):
        ema.update(_Toy())


# --- snapshots and reconstruction ------------------------------------------------------------

def _run(tmp_path, n: int, every: int, dtype: torch.dtype, direct=(0.07,), max_snapshots=None):
    """Train a toy for n steps: PowerEMA(0.05, 0.10) + snapshots, and directly tracked profiles."""
    weights, biases = _trajectory(n, (4, 6), seed=4), _trajectory(n, (4,), seed=5)
    model = _Toy()
    stored = ph.PowerEMA(model, (0.05, 0.10))
    tracked = ph.PowerEMA(model, direct)
    writer = ph.SnapshotWriter(tmp_path / "posthoc", every, dtype=dtype, max_snapshots=max_snapshots)
    history = {}
    for t in range(n):
        _drive(model, weights, biases, t)
        stored.update(model)
        tracked.update(model)
        writer.maybe_save(stored)
        history[stored.step] = [_flat(tracked.profile_state_dict(k)) for k in range(len(direct))]
    return stored, tracked, writer, history, (weights, biases)


def test_reconstruction_matches_a_directly_tracked_power_ema(tmp_path) -> None:
    n = 800
    _, tracked, writer, history, (weights, biases) = _run(tmp_path, n, 10, torch.float16,
                                                          direct=(0.07, 0.15))
    final = torch.cat([weights[-1].flatten(), biases[-1].flatten()])
    for k, sigma_rel in enumerate(tracked.sigma_rels):
        rec = _flat(ph.reconstruct(writer.folder, sigma_rel))
        direct = _flat(tracked.profile_state_dict(k))
        err = (torch.linalg.vector_norm(rec - direct) / torch.linalg.vector_norm(direct)).item()
        # Stricter: the error relative to how far the EMA lags the final weights.
        err_lag = (torch.linalg.vector_norm(rec - direct) / torch.linalg.vector_norm(direct - final)).item()
        print(f"sigma_rel={sigma_rel}: relative L2 error {err:.2e} (of the lag: {err_lag:.2e})")
        assert err < 1e-2
        assert err_lag < 2e-2
    # At an earlier snapshot step, too.
    rec = _flat(ph.reconstruct(writer.folder, 0.07, step=400))
    direct = history[400][0]
    assert torch.linalg.vector_norm(rec - direct) / torch.linalg.vector_norm(direct) < 1e-2


def test_reconstructing_a_stored_profile_at_its_own_step_is_exact(tmp_path) -> None:
    stored, _, writer, _, _ = _run(tmp_path, 300, 10, torch.float32)
    snaps = ph.list_snapshots(writer.folder)
    coefs = ph.solve_posthoc_coefficients([s.step for s in snaps], [s.sigma_rel for s in snaps],
                                          300, 0.10)
    one_hot = np.array([[1.0 if (s.step, s.sigma_rel) == (300, 0.10) else 0.0] for s in snaps])
    np.testing.assert_allclose(coefs, one_hot, atol=1e-9)
    for k, sigma_rel in enumerate(stored.sigma_rels):
        rec = ph.reconstruct(writer.folder, sigma_rel)
        for key, want in stored.profile_state_dict(k).items():
            torch.testing.assert_close(rec[key], want, rtol=0, atol=1e-5)


def test_reconstruction_takes_non_float_tensors_from_the_latest_snapshot(tmp_path) -> None:
    _, _, writer, _, _ = _run(tmp_path, 60, 20, torch.float16)
    rec = ph.reconstruct(writer.folder, 0.08, step=40)
    assert rec["bn.num_batches_tracked"].dtype == torch.int64
    assert rec["bn.num_batches_tracked"].item() == 40
    assert rec["fc.weight"].dtype == torch.float32


def test_coefficients_are_normalised_to_unit_response() -> None:
    steps = [100, 200, 300, 100, 200, 300]
    sigmas = [0.05, 0.05, 0.05, 0.10, 0.10, 0.10]
    coefs = ph.solve_posthoc_coefficients(steps, sigmas, 300, [0.02, 0.07, 0.2])
    assert coefs.shape == (6, 3)
    np.testing.assert_allclose(coefs.sum(axis=0), 1.0, rtol=1e-12)


def test_correlation_matches_numerical_integral() -> None:
    ga, gb, ta, tb = 6.94, 16.97, 70.0, 100.0
    x = np.linspace(0, ta, 2_000_001)  # p_a is zero beyond t_a
    pa = (ga + 1) * x ** ga / ta ** (ga + 1)
    pb = (gb + 1) * x ** gb / tb ** (gb + 1)
    y = pa * pb
    numeric = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))
    assert ph.power_function_correlation(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-6)
    assert ph.power_function_correlation(tb, gb, ta, ga) == pytest.approx(numeric, rel=1e-6)


def test_snapshot_files_load_weights_only_with_metadata(tmp_path) -> None:
    stored, _, writer, _, _ = _run(tmp_path, 30, 10, torch.float16)
    snaps = ph.list_snapshots(writer.folder)
    assert [(s.step, s.sigma_rel) for s in snaps] == [(st, sr) for st in (10, 20, 30) for sr in (0.05, 0.10)]
    assert not [f for f in os.listdir(writer.folder) if f.startswith(".tmp")]
    obj = torch.load(snaps[-1].path, weights_only=True)
    assert obj["step"] == 30 and obj["sigma_rel"] == 0.10 and obj["dtype"] == "float16"
    assert obj["gamma"] == pytest.approx(ph.sigma_rel_to_gamma(0.10))
    assert obj["state_dict"]["fc.weight"].dtype == torch.float16
    assert obj["state_dict"]["bn.num_batches_tracked"].dtype == torch.int64
    assert list(obj["state_dict"]) == stored.keys


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_footprint_estimate_matches_bytes_on_disk(tmp_path, dtype) -> None:
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(20)], nn.BatchNorm1d(16))
    ema = ph.PowerEMA(model)
    ema.update(model)
    writer = ph.SnapshotWriter(tmp_path, 1, dtype=dtype)
    paths = writer.save(ema)
    actual = os.path.getsize(paths[0])
    est = ph.estimate_footprint(model, n_snapshots=1, n_profiles=2, dtype=dtype)
    n_tensors = len(ema.keys)
    # Stated bound: torch.save's zip padding/headers vary by < 48 bytes per tensor.
    assert abs(est.bytes_per_file - actual) <= 48 * n_tensors + 512
    assert writer.disk_usage() == sum(os.path.getsize(p) for p in paths)
    projected = writer.footprint(ema, total_steps=1000)
    assert projected.n_snapshots == 1000 and projected.bytes_per_file == actual
    assert projected.total_bytes == 1000 * 2 * actual
    assert "snapshots" in str(projected)


def test_max_snapshots_thins_and_stays_bounded(tmp_path) -> None:
    stored, tracked, writer, _, _ = _run(tmp_path, 400, 5, torch.float16, max_snapshots=16)
    steps = sorted({s.step for s in ph.list_snapshots(writer.folder)})
    assert len(steps) <= 16
    assert len(steps) == ph.snapshot_count(400, 5, 16)
    assert steps == list(range(writer.every, 401, writer.every))
    rec = _flat(ph.reconstruct(writer.folder, 0.07))
    direct = _flat(tracked.profile_state_dict(0))
    assert torch.linalg.vector_norm(rec - direct) / torch.linalg.vector_norm(direct) < 1e-2


def test_writer_resumes_its_thinned_interval_and_prunes_newer_snapshots(tmp_path) -> None:
    _, _, writer, _, _ = _run(tmp_path, 100, 5, torch.float16, max_snapshots=6)
    again = ph.SnapshotWriter(writer.folder, 5, max_snapshots=6)
    assert again.every == writer.every > 5
    last = max(s.step for s in ph.list_snapshots(writer.folder))
    assert again.prune_after(last - 1) == 2  # both profiles of the last step
    assert max(s.step for s in ph.list_snapshots(writer.folder)) < last


# --- classic decay / half-life mapping --------------------------------------------------------

def test_decay_to_sigma_rel_matches_the_geometric_profile_std() -> None:
    decay, step = 0.99, 10_000
    age = np.arange(0, 20_000, dtype=np.float64)
    w = (1 - decay) * decay ** age
    mean = np.sum(w * age)
    std = math.sqrt(np.sum(w * (age - mean) ** 2))
    assert ph.decay_to_sigma_rel(decay, step) == pytest.approx(std / step, rel=1e-9)
    assert ph.decay_to_sigma_rel(0.9998, 100_000) == pytest.approx(0.05, rel=1e-3)


@pytest.mark.parametrize("sigma_rel,step", [(0.05, 100_000), (0.10, 500), (0.2, 7)])
def test_sigma_rel_to_decay_inverts(sigma_rel: float, step: int) -> None:
    decay = ph.sigma_rel_to_decay(sigma_rel, step)
    assert 0 < decay < 1
    assert ph.decay_to_sigma_rel(decay, step) == pytest.approx(sigma_rel, rel=1e-9)


def test_half_life_conversions() -> None:
    assert ph.decay_to_half_life(0.5) == pytest.approx(1.0)
    h = ph.decay_to_half_life(0.9998)
    assert 0.9998 ** h == pytest.approx(0.5, rel=1e-12)
    assert ph.half_life_to_decay(h) == pytest.approx(0.9998, rel=1e-12)
    s = ph.half_life_to_sigma_rel(2000, 50_000)
    assert ph.sigma_rel_to_half_life(s, 50_000) == pytest.approx(2000, rel=1e-9)


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.0, -0.1, 0.29, 0.5, float("nan"), float("inf")])
def test_bad_sigma_rel_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="sigma_rel"):
        ph.sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="sigma_rels"):
        ph.PowerEMA(nn.Linear(2, 2), (0.05, bad))


def test_bad_scalars_name_the_argument() -> None:
    with pytest.raises(ValueError, match="gamma"):
        ph.gamma_to_sigma_rel(-0.5)
    with pytest.raises(ValueError, match="step"):
        ph.power_beta(0, 1.0)
    with pytest.raises(ValueError, match="decay"):
        ph.decay_to_sigma_rel(1.0, 10)
    with pytest.raises(ValueError, match="half.life"):
        ph.half_life_to_decay(0)
    with pytest.raises(ValueError, match="every"):
        ph.SnapshotWriter("unused", 0)
    with pytest.raises(ValueError, match="sigma_rels"):
        ph.PowerEMA(nn.Linear(2, 2), (0.05, 0.05))
    with pytest.raises(ValueError, match="n_snapshots"):
        ph.estimate_footprint(nn.Linear(2, 2), -1)


def test_reconstruct_errors_are_one_line_and_name_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="snapshot_dir .* is not a directory"):
        ph.reconstruct(tmp_path / "missing", 0.05)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no post-hoc snapshots"):
        ph.reconstruct(tmp_path / "empty", 0.05)
    _, _, writer, _, _ = _run(tmp_path, 30, 10, torch.float16)
    with pytest.raises(ValueError, match=r"step=40 is beyond the last snapshot step 30") as info:
        ph.reconstruct(writer.folder, 0.05, step=40)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"step=15 is not a snapshot step; nearest: 10, 20"):
        ph.reconstruct(writer.folder, 0.05, step=15)
    with pytest.raises(ValueError, match="sigma_rel"):
        ph.reconstruct(writer.folder, 0.3)


# --- one engine: PowerEMA is ModelEMAs with the power schedule --------------------------------

def test_power_ema_profiles_are_power_schedule_model_emas_in_one_multi_ema() -> None:
    from emakit import ModelEMA, MultiEMA

    model = _Toy()
    ema = ph.PowerEMA(model, (0.05, 0.10))
    assert isinstance(ema.engine, MultiEMA) and len(ema.engine) == 2
    lone = ModelEMA(model, **ph.power_profile(0.10))  # the same profile, tracked on its own
    for t in range(30):
        with torch.no_grad():
            model.fc.weight.normal_()
        ema.update(model)
        lone.update(model)
    for member, gamma in zip(ema.members, ema.gammas):
        assert member.schedule == "power" and member.schedule_kwargs == {"gamma": gamma}
        assert member.decay_at(30) == ph.power_beta(30, gamma)
    for key, value in lone.module.state_dict().items():
        assert torch.equal(ema.profile_state_dict(1)[key], value), key


class _WithNonPersistent(_Toy):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_power_ema_state_is_the_models_state_dict_and_an_old_format_dict_loads(tmp_path) -> None:
    """Keys = the model's state_dict keys (no non-persistent buffer), float32 floats, int64
    counters; a dict in the checkpoint format written before the engine change (built here by
    hand: step, sigma_rels, one plain state dict per profile) restores exactly."""
    model = _WithNonPersistent()
    ema = ph.PowerEMA(model, (0.05, 0.10))
    state = ema.state_dict()
    assert set(state) == {"step", "sigma_rels", "profiles"}
    for profile in state["profiles"]:
        assert list(profile) == list(model.state_dict()) and "table" not in profile
    g = torch.Generator().manual_seed(0)
    old = {"step": 7, "sigma_rels": [0.05, 0.10],
           "profiles": [{k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else torch.tensor(7))
                         for k, v in model.state_dict().items()} for _ in range(2)]}
    torch.save(old, tmp_path / "old.pt")
    resumed = ph.PowerEMA(_WithNonPersistent(), (0.05, 0.10))
    resumed.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    assert resumed.step == 7 and all(m.num_updates == 7 for m in resumed.members)
    for k in range(2):
        for key, want in old["profiles"][k].items():
            assert torch.equal(resumed.profile_state_dict(k)[key], want.to(resumed.profile_state_dict(k)[key].dtype))
    target = _WithNonPersistent()
    resumed.copy_to(target, 1)
    assert torch.equal(target.fc.weight, old["profiles"][1]["fc.weight"])


def test_posthoc_module_has_no_foreach_no_private_module_attributes_and_imports_without_numpy() -> None:
    import ast
    import subprocess
    import sys

    source = open(ph.__file__).read()
    tree = ast.parse(source)
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not [a for a in attrs if a.startswith("_foreach")]
    private = {"_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", "_orig_mod"}
    assert not attrs & private
    top_imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_imports if "numpy" in ast.dump(n)]
    # With numpy unimportable, the module and the tracking side still import.
    code = "import sys; sys.modules['numpy'] = None; import emakit.posthoc as ph; print(ph.power_beta(3, 1.0))"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx((2 / 3) ** 2)
