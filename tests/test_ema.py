"""Specification of emakit.ModelEMA, checked against closed forms, float64 references and timm."""
from __future__ import annotations

import io
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from emakit import ModelEMA, register_schedule
from emakit.schedules import half_life_to_decay


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def float_items(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def set_weights(model: nn.Module, value_fn) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(value_fn(i, p))


def train_steps(model: nn.Module, steps: int, callback, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for step in range(1, steps + 1):
        x = torch.randn(6, 3, 8, 8, generator=gen)
        y = torch.randint(0, 4, (6,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        callback(step)


# ---------------------------------------------------------------- 2. import hygiene

def test_import_emakit_pulls_in_nothing_beyond_torch():
    code = (
        "import sys, torch; before = set(sys.modules); import emakit; "
        "new = sorted(m for m in set(sys.modules) - before if not m.startswith('emakit')); "
        "heavy = [m for m in ('timm', 'torchvision', 'yaml', 'PIL', 'tqdm', 'sklearn') "
        "if m in sys.modules and m not in before]; "
        "print(repr((new, heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    new, heavy = eval(out)
    assert heavy == [], f"import emakit imported {heavy}"
    assert new == [], f"import emakit imported modules torch does not: {new}"


# ---------------------------------------------------------------- 3. closed form

def test_constant_decay_matches_closed_form():
    d, n = 0.9, 40
    model = nn.Linear(5, 3)
    gen = torch.Generator().manual_seed(0)
    seq = [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(n + 1)]
    set_weights(model, lambda i, p: seq[0][i])
    ema = ModelEMA(model, decay=d)
    for t in range(1, n + 1):
        set_weights(model, lambda i, p: seq[t][i])
        ema.update(model)
    for i, e in enumerate(ema.module.parameters()):
        ref = d ** n * seq[0][i].double()
        ref += sum(d ** (n - t) * (1 - d) * seq[t][i].double() for t in range(1, n + 1))
        torch.testing.assert_close(e.double(), ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- 4. timm equivalence

def test_constant_decay_matches_timm_model_ema_v2():
    from timm.utils import ModelEmaV2

    d = 0.95
    model = small_net()
    ours, theirs = ModelEMA(model, decay=d), ModelEmaV2(model, decay=d)

    def step(_):
        ours.update(model)
        theirs.update(model)

    train_steps(model, 50, step)
    theirs_sd = theirs.module.state_dict()
    for k, v in ours.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, theirs_sd[k], atol=1e-6, rtol=0, msg=k)
        else:  # integer buffers are copied from the model, not averaged as timm V2 does
            assert torch.equal(v, model.state_dict()[k]), k


def test_warmup_schedule_matches_timm_model_ema_v3():
    from timm.utils import ModelEmaV3

    d = 0.999
    model = small_net()
    ours = ModelEMA(model, decay=d, schedule="warmup")
    theirs = ModelEmaV3(model, decay=d, use_warmup=True)

    def step(n):
        ours.update(model)
        theirs.update(model, step=n)

    train_steps(model, 50, step)
    assert ours.num_updates == 50
    theirs_sd = theirs.module.state_dict()
    for k, v in ours.module.state_dict().items():
        torch.testing.assert_close(v, theirs_sd[k], atol=1e-6, rtol=0, msg=k)
    for n in (1, 2, 10, 50, 10_000):
        assert ours.decay_at(n) == pytest.approx(theirs.get_decay(n), abs=1e-12)


# ---------------------------------------------------------------- 5. schedules, half-life, every, after

@pytest.mark.parametrize("step", [1, 2, 7, 100, 5000])
def test_builtin_schedules_match_their_formulas(step):
    model = nn.Linear(2, 2)
    d, k = 0.9995, step - 1  # schedule step = averaging updates before this one
    warm = ModelEMA(model, decay=d, schedule="warmup", inv_gamma=2.0, power=0.75, min_decay=0.1)
    assert warm.decay_at(step) == pytest.approx(max(min(1 - (1 + k / 2.0) ** -0.75, d), 0.1), abs=1e-15)
    thr = ModelEMA(model, decay=d, schedule="threshold")
    assert thr.decay_at(step) == pytest.approx(min(d, (1 + k) / (10 + k)), abs=1e-15)
    ex = ModelEMA(model, decay=d, schedule="exp", beta=10.0, total_steps=5000)
    assert ex.decay_at(step) == pytest.approx(d * (1 - math.exp(-10.0 * k / 5000)), abs=1e-15)
    assert ModelEMA(model, decay=d).decay_at(step) == d


def test_registered_custom_schedule_is_used():
    register_schedule("test_halfway", lambda decay, step, total_steps, scale=0.5: decay * scale, overwrite=True)
    model = nn.Linear(3, 1)
    set_weights(model, lambda i, p: torch.zeros_like(p))
    ema = ModelEMA(model, decay=0.8, schedule="test_halfway", scale=0.25)
    assert ema.decay_at(1) == pytest.approx(0.2)
    set_weights(model, lambda i, p: torch.ones_like(p))
    ema.update(model)  # 0.2 * 0 + 0.8 * 1
    for p in ema.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.8))


@pytest.mark.parametrize(
    "text, kwargs, half_life_batches",
    [("2000ba", {}, 2000.0), ("0.5ep", {"steps_per_epoch": 300}, 150.0),
     ("1.2Mimg", {"global_batch_size": 256}, 1.2e6 / 256), ("30k img", {"global_batch_size": 100}, 300.0)],
)
def test_half_life_strings_give_half_weight_after_one_half_life(text, kwargs, half_life_batches):
    ema = ModelEMA(nn.Linear(2, 2), half_life=text, **kwargs)
    assert ema.decay == pytest.approx(0.5 ** (1 / half_life_batches), rel=1e-12)
    assert ema.decay ** half_life_batches == pytest.approx(0.5, rel=1e-9)


def test_half_life_with_update_every_keeps_the_time_constant():
    ema = ModelEMA(nn.Linear(2, 2), half_life="1000ba", update_every=4)
    assert ema.decay_at(4) == pytest.approx(0.5 ** (4 / 1000), rel=1e-12)


@pytest.mark.parametrize("k", [2, 5])
def test_update_every_k_equals_k_updates_toward_a_constant_target(k):
    model = nn.Linear(4, 4)
    every = ModelEMA(model, decay=0.9, update_every=k)
    single = ModelEMA(model, decay=0.9)
    set_weights(model, lambda i, p: p + 1.0)  # constant new target
    last = [p.clone() for p in every.module.parameters()]
    for call in range(1, 3 * k + 1):
        every.update(model)
        single.update(model)
        if call % k:  # between averaging calls the EMA stands still (so ignoring update_every shows)
            for a, before in zip(every.module.parameters(), last):
                assert torch.equal(a, before)
            continue
        for a, b in zip(every.module.parameters(), single.module.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        last = [p.clone() for p in every.module.parameters()]
    assert every.num_updates == single.num_updates == 3 * k


def test_update_after_step_copies_then_averages():
    model = nn.Linear(3, 3)
    ema = ModelEMA(model, decay=0.9, update_after_step=3)
    for t in range(1, 4):
        set_weights(model, lambda i, p: torch.full_like(p, float(t)))
        ema.update(model)
        for p in ema.module.parameters():
            assert torch.equal(p, torch.full_like(p, float(t)))
    set_weights(model, lambda i, p: torch.full_like(p, 13.0))
    ema.update(model)
    for p in ema.module.parameters():  # 0.9 * 3 + 0.1 * 13
        torch.testing.assert_close(p, torch.full_like(p, 4.0))


def test_buffers_copy_mode_copies_running_stats():
    model = small_net()
    ema = ModelEMA(model, decay=0.99, buffers="copy")
    train_steps(model, 3, lambda n: ema.update(model))
    bn_model, bn_ema = model[1], ema.module[1]
    assert torch.equal(bn_ema.running_mean, bn_model.running_mean)
    assert not torch.equal(bn_ema.weight, bn_model.weight)


# ---------------------------------------------------------------- wrapping

def test_wrapped_models_are_averaged_with_bare_keys(tmp_path):
    import torch.distributed as dist

    model = small_net()
    bare_ema = ModelEMA(model, decay=0.9)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        compiled_ddp = torch.compile(ddp)
        wrapped_ema = ModelEMA(compiled_ddp, decay=0.9)
        assert list(wrapped_ema.module.state_dict()) == list(model.state_dict())
        train_steps(model, 3, lambda n: (bare_ema.update(model), wrapped_ema.update(compiled_ddp)))
    finally:
        dist.destroy_process_group()
    for a, b in zip(bare_ema.module.state_dict().values(), wrapped_ema.module.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_module_is_eval_frozen_and_forwards():
    model = small_net()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    torch.testing.assert_close(ema(x), model(x))


# ---------------------------------------------------------------- 6. precision

def test_fp32_master_weights_track_a_bf16_model_where_a_bf16_ema_stalls():
    d, steps = 0.9998, 2000
    model = nn.Linear(16, 16, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    fp32_ema = ModelEMA(model, decay=d, dtype=torch.float32)
    bf16_ema = ModelEMA(model, decay=d)
    ref = model.weight.double().clone()
    for t in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(1.0 + 0.5 * t / steps)  # slow drift, stored in bf16
        ref.mul_(d).add_(model.weight.double(), alpha=1 - d)
        fp32_ema.update(model)
        bf16_ema.update(model)
    moved = (ref - 1.0).abs().mean().item()
    assert moved > 0.05  # the reference really moved
    assert fp32_ema.module.weight.dtype == torch.float32
    rel_fp32 = ((fp32_ema.module.weight.double() - ref).norm() / ref.norm()).item()
    rel_bf16 = ((bf16_ema.module.weight.double() - ref).norm() / ref.norm()).item()
    assert rel_fp32 < 1e-3
    assert rel_bf16 > 2e-2, f"bf16 EMA was expected to stall, rel err {rel_bf16}"


# ---------------------------------------------------------------- 7. swap

@pytest.mark.parametrize("ema_dtype", [None, torch.float64])
def test_swapped_into_restores_live_weights_bit_exactly_even_on_error(ema_dtype):
    model = small_net()
    ema = ModelEMA(model, decay=0.5, dtype=ema_dtype)
    train_steps(model, 3, lambda n: ema.update(model))
    live = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with pytest.raises(ZeroDivisionError):
        with ema.swapped_into(model) as inner:
            assert inner is model
            for k, v in model.state_dict().items():
                assert torch.equal(v, averaged[k].to(v.dtype)), k
            with pytest.raises(RuntimeError, match="swapped_into"):
                ema.update(model)
            1 / 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, averaged[k]), k
    ema.update(model)  # usable again after the block


def test_copy_to_and_set():
    model = small_net()
    ema = ModelEMA(model, decay=0.5)
    train_steps(model, 2, lambda n: ema.update(model))
    other = small_net(seed=3)
    ema.copy_to(other)
    for a, b in zip(other.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)
    ema.set(model)
    for a, b in zip(model.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- 8. exact resume

def test_resume_from_state_dict_is_bitwise_identical():
    def run(interrupt_at: int | None) -> ModelEMA:
        model = small_net()
        ema = ModelEMA(model, decay=0.99, schedule="warmup", update_every=2)
        holder = {"ema": ema}

        def step(n):
            holder["ema"].update(model)
            if n == interrupt_at:
                buf = io.BytesIO()
                torch.save(holder["ema"].state_dict(), buf)
                buf.seek(0)
                fresh = ModelEMA(small_net(seed=9), decay=0.99, schedule="warmup", update_every=2)
                fresh.load_state_dict(torch.load(buf, weights_only=True))
                holder["ema"] = fresh

        train_steps(model, 21, step)
        return holder["ema"]

    straight, resumed = run(None), run(11)
    assert resumed.num_updates == straight.num_updates == 21
    for a, b in zip(straight.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_state_round_trip_restores_counter():
    model = small_net()
    ema = ModelEMA(model, decay=0.9)
    for _ in range(5):
        ema.update(model)
    state = ema.checkpoint_state()
    assert set(state["state_dict_ema"]) == set(model.state_dict())
    fresh = ModelEMA(small_net(seed=4), decay=0.9)
    fresh.load_checkpoint_state(state["state_dict_ema"], state["ema"])
    assert fresh.num_updates == 5
    for a, b in zip(fresh.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- 9. bad arguments

@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"decay": 1.0}, r"decay=1\.0 is outside \[0, 1\)"),
        ({"decay": -0.1}, r"decay=-0\.1 is outside"),
        ({"schedule": "cosine"}, r"schedule='cosine' is unknown; accepted: .*constant.*warmup"),
        ({"half_life": "2000"}, r"half_life='2000' is malformed.*'2000ba'"),
        ({"half_life": "fast"}, r"half_life='fast' is malformed"),
        ({"half_life": "0ba"}, r"half_life='0ba' must be positive"),
        ({"decay": 0.999, "half_life": "100ba"}, r"decay=0\.999 and half_life='100ba' both"),
        ({"update_every": 0}, r"update_every=0 must be a positive integer"),
        ({"update_every": -3}, r"update_every=-3 must be a positive integer"),
        ({"update_after_step": -1}, r"update_after_step=-1"),
        ({"half_life": "0.5ep"}, r"needs steps_per_epoch"),
        ({"half_life": "1Mimg"}, r"needs global_batch_size"),
        ({"schedule": "exp"}, r"schedule='exp' needs total_steps"),
        ({"schedule": "warmup", "beta": 3.0}, r"unknown argument 'beta' for schedule 'warmup'; accepted: inv_gamma, power"),
        ({"buffers": "ignore"}, r"buffers='ignore' is not accepted; use 'average' or 'copy'"),
        ({"dtype": torch.int64}, r"dtype=torch\.int64 must be a floating dtype"),
        ({"min_decay": 1.5}, r"min_decay=1\.5 is outside"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelEMA(nn.Linear(2, 2), **kwargs)


def test_builtin_schedule_cannot_be_replaced():
    with pytest.raises(ValueError, match="built in"):
        register_schedule("warmup", lambda d, s, t: d)


def test_half_life_to_decay_formula():
    assert half_life_to_decay(100.0, interval=4) == pytest.approx(0.5 ** 0.04)


# ---------------------------------------------------------------- several EMAs in one pass

@pytest.mark.parametrize("extra", [{}, {"schedule": "warmup", "update_every": 2, "update_after_step": 3}])
def test_multi_ema_equals_separate_single_emas(extra):
    from emakit import MultiEMA

    decays = (0.5, 0.9, 0.99)
    model = small_net()
    multi = MultiEMA(model, decays=decays, **extra)
    singles = [ModelEMA(model, decay=d, **extra) for d in decays]

    def step(_):
        multi.update(model)
        for s in singles:
            s.update(model)

    train_steps(model, 12, step)
    assert multi._fused_ok
    for fused, single in zip(multi, singles):
        assert fused.num_updates == single.num_updates == 12
        for k, v in single.module.state_dict().items():
            assert torch.equal(fused.module.state_dict()[k], v), k


def test_multi_ema_with_half_lives_and_bad_arguments():
    from emakit import MultiEMA

    multi = MultiEMA(nn.Linear(2, 2), half_lives=["100ba", "1000ba"])
    assert [e.decay for e in multi] == pytest.approx([0.5 ** (1 / 100), 0.5 ** (1 / 1000)])
    with pytest.raises(ValueError, match="either decays"):
        MultiEMA(nn.Linear(2, 2), decays=[0.9], half_lives=["10ba"])
    with pytest.raises(ValueError, match=r"decay=1\.2 is outside"):
        MultiEMA(nn.Linear(2, 2), decays=[0.9, 1.2])


def test_an_ema_on_another_device_than_the_model_stays_there_through_updates():
    """``device=`` places every EMA tensor (the meta device stands in for a second device on
    a CPU-only machine), and updates from the CPU model keep it there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = ModelEMA(model, decay=0.9, device="meta")
    assert ema.device == torch.device("meta")
    tensors = list(ema.module.parameters()) + list(ema.module.buffers())
    assert len(tensors) == len(list(model.parameters())) + len(list(model.buffers()))
    assert all(t.device.type == "meta" for t in tensors)
    ema.update(model)
    ema.update(model)
    assert ema.num_updates == 2
    assert all(t.device.type == "meta" for t in list(ema.module.parameters()) + list(ema.module.buffers()))
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model was not moved
    assert ModelEMA(model, decay=0.9).module[0].weight.device.type == "cpu"  # default: the model's device

# ---------------------------------------------------------------- power schedule, mixed members

@pytest.mark.parametrize("gamma", [0.0, 6.9372, 16.9722])
def test_power_schedule_is_edm2s_power_profile(gamma):
    from emakit.posthoc import power_beta

    ema = ModelEMA(nn.Linear(2, 2), schedule="power", gamma=gamma)
    assert ema.decay_at(1) == 0.0  # the first update copies
    for t in (2, 3, 10, 1234, 10**6):
        want = (1 - 1 / t) ** (gamma + 1)  # EDM2 Eq. 127, written out here
        assert ema.decay_at(t) == pytest.approx(want, rel=1e-14)
        assert ema.decay_at(t) == power_beta(t, gamma)  # the same bits as posthoc's beta
    if gamma == 0.0:  # gamma 0 is the running mean of all updates
        model = nn.Linear(2, 2)
        mean = ModelEMA(model, schedule="power", gamma=0.0)
        seen = []
        for i in range(5):
            set_weights(model, lambda _, p: torch.full_like(p, float(i * i)))
            seen.append(float(i * i))
            mean.update(model)
        torch.testing.assert_close(mean.module.weight, torch.full((2, 2), sum(seen) / len(seen)))


@pytest.mark.parametrize("kwargs", [{}, {"gamma": -1.0}, {"gamma": float("nan")}])
def test_power_schedule_needs_a_gamma(kwargs):
    with pytest.raises(ValueError, match="schedule='power' needs gamma"):
        ModelEMA(nn.Linear(2, 2), schedule="power", **kwargs)


MIXED = [
    {"decay": 0.9}, {"decay": 0.99},
    {"schedule": "power", "gamma": 6.9372, "dtype": torch.float32},
    {"schedule": "power", "gamma": 16.9722, "dtype": torch.float32},
    {"decay": 0.95, "schedule": "warmup", "update_every": 2, "update_after_step": 3},
    {"decay": 0.8, "buffers": "copy", "copy_first": True},
]


def test_multi_ema_members_with_their_own_schedules_equal_separate_emas():
    from emakit import MultiEMA

    model = small_net()
    multi = MultiEMA(model, members=MIXED)
    singles = [ModelEMA(model, **spec) for spec in MIXED]

    def step(_):
        multi.update(model)
        for s in singles:
            s.update(model)

    train_steps(model, 9, step)
    for fused, single in zip(multi, singles):
        assert fused.schedule == single.schedule and fused.num_updates == 9
        for k, v in single.module.state_dict().items():
            assert torch.equal(fused.module.state_dict()[k], v), k
    # built ModelEMAs can be joined, too, and keep their settings
    joined = MultiEMA(members=singles)
    assert [e.schedule_kwargs for e in joined] == [e.schedule_kwargs for e in singles]


def test_multi_ema_averages_every_due_member_in_one_fused_lerp(monkeypatch):
    """Two classic EMAs and two power profiles (different schedules and kwargs): one
    ``_foreach_lerp_`` per update for their one (device, dtype) group, not one per member."""
    from emakit import MultiEMA

    model = small_net()
    multi = MultiEMA(model, members=MIXED[:4])
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda dst, src, w: (calls.append(len(dst)), real(dst, src, w)))
    n_float = sum(1 for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())
    multi.update(model)  # update 1: the power profiles copy, the classic EMAs average
    assert calls == [2 * n_float]
    calls.clear()
    multi.update(model)
    assert calls == [4 * n_float]


def test_multi_ema_members_keep_their_own_counters_and_take_no_shared_settings():
    from emakit import MultiEMA

    model = nn.Linear(2, 2)
    a, b = ModelEMA(model, schedule="power", gamma=1.0), ModelEMA(model, schedule="power", gamma=1.0)
    ref_a, ref_b = ModelEMA(model, schedule="power", gamma=1.0), ModelEMA(model, schedule="power", gamma=1.0)
    for ema in (a, ref_a):  # a is one update ahead, as after resuming from different checkpoints
        ema.update(model)
    joined = MultiEMA(members=[a, b])
    for value in (1.0, 5.0):
        set_weights(model, lambda _, p: torch.full_like(p, value))
        joined.update(model)
        ref_a.update(model)
        ref_b.update(model)
    assert (a.num_updates, b.num_updates) == (3, 2)
    assert torch.equal(a.module.weight, ref_a.module.weight) and torch.equal(b.module.weight, ref_b.module.weight)
    assert not torch.equal(a.module.weight, b.module.weight)
    with pytest.raises(ValueError, match="takes no shared settings"):
        MultiEMA(members=[b], decay=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        MultiEMA(model, decays=[0.9], members=[{"decay": 0.9}])
    with pytest.raises(ValueError, match="needs the model"):
        MultiEMA(members=[{"decay": 0.9}])


def test_scale_decay_keeps_the_half_life_in_images_when_the_batch_grows():
    """The EMA scaling rule: with kappa-times larger batches, decay**kappa per step halves the
    old average after the same number of images (half-life in steps / kappa)."""
    from emakit import decay_to_half_life, scale_decay

    decay = 0.999
    for kappa in (0.5, 2, 4, 8):
        scaled = scale_decay(decay, kappa)
        assert decay_to_half_life(scaled) * kappa == pytest.approx(decay_to_half_life(decay), rel=1e-12)
    assert scale_decay(decay, 1) == decay
    for bad in ((1.0, 2), (-0.1, 2), (0.9, 0), (0.9, -1)):
        with pytest.raises(ValueError):
            scale_decay(*bad)
