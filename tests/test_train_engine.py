"""train_one_epoch / evaluate: when the EMA is updated, and what evaluation counts."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from emakit import ModelEMA
from emakit.training.averages import Averages
from emakit.training.engine import AmpSettings, TrainOptions, evaluate, train_one_epoch
from emakit.training.settings import OptimSettings

CPU = torch.device("cpu")


def linear_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4))


def batches(n: int, size: int = 2, seed: int = 0, bad: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(size, 3, 2, 2, generator=gen)
        if i == bad:
            x[0, 0, 0, 0] = float("inf")  # inf activations -> inf/nan gradients
        out.append((x, torch.randint(0, 4, (size,), generator=gen)))
    return out


@pytest.mark.parametrize("num_batches, accum", [(10, 4), (8, 4), (3, 1), (5, 8)])
def test_ema_is_updated_once_per_optimizer_step_under_gradient_accumulation(num_batches, accum):
    model = linear_net()
    ema = ModelEMA(model, decay=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = train_one_epoch(0, model, batches(num_batches), opt, nn.CrossEntropyLoss(), device=CPU,
                          opts=TrainOptions(optim=OptimSettings(grad_accum_steps=accum)), averages=Averages(ema))
    steps = math.ceil(num_batches / accum)
    assert out["optimizer_steps"] == steps
    assert ema.num_updates == steps
    assert int(opt.state[model[1].weight]["step"]) == steps  # AdamW counts its own steps


def test_accumulating_k_micro_batches_equals_one_step_on_their_concatenation():
    data = batches(4, size=2)
    accumulated, single = linear_net(), linear_net()
    opt_a = torch.optim.SGD(accumulated.parameters(), lr=0.5)
    opt_s = torch.optim.SGD(single.parameters(), lr=0.5)
    train_one_epoch(0, accumulated, data, opt_a, nn.CrossEntropyLoss(), device=CPU,
                    opts=TrainOptions(optim=OptimSettings(grad_accum_steps=4)))
    big = [(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))]
    train_one_epoch(0, single, big, opt_s, nn.CrossEntropyLoss(), device=CPU, opts=TrainOptions())
    for a, s in zip(accumulated.parameters(), single.parameters()):
        torch.testing.assert_close(a, s, rtol=1e-5, atol=1e-6)


def test_a_step_skipped_by_the_fp16_grad_scaler_is_not_an_ema_update():
    # A huge initial scale overflows the fp16 gradients (the loss stays finite) until the
    # scaler has halved it enough: those steps are the scaler's skips, not divergence.
    init_scale = 2.0**20
    model = linear_net()
    ema = ModelEMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = AmpSettings(enabled=True, dtype=torch.float16, scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    seen = []
    original_update = ema.update

    def spy(m):
        seen.append(copy.deepcopy(m[1].weight.detach()))
        original_update(m)

    ema.update = spy
    out = train_one_epoch(0, model, batches(8), opt, nn.CrossEntropyLoss(), device=CPU,
                          opts=TrainOptions(amp=amp), averages=Averages(ema))
    skipped, steps = out["skipped_steps"], out["optimizer_steps"]
    assert skipped >= 1 and steps >= 1 and skipped + steps == 8 and out["nonfinite_steps"] == 0
    assert ema.num_updates == steps and len(seen) == steps
    assert all(torch.isfinite(w).all() for w in seen)
    assert amp.scaler.get_scale() == init_scale / 2**skipped  # halved once per skipped step


def test_evaluate_matches_a_direct_computation_of_loss_top1_top5():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10)).eval()  # 10 classes: top-5 is not everything
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(8, 3, 2, 2, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(5)]
    metrics = evaluate(model, data, nn.CrossEntropyLoss(), device=CPU)
    x = torch.cat([b for b, _ in data])
    y = torch.cat([t for _, t in data])
    with torch.no_grad():
        logits = model(x)
    # top-5 by hand: the label's rank among the logits (how many classes score higher)
    rank = (logits > logits.gather(1, y[:, None])).sum(1)
    top1, top5 = 100.0 * (rank == 0).double().mean().item(), 100.0 * (rank < 5).double().mean().item()
    assert metrics["samples"] == 40
    assert top1 < top5 < 100.0  # the figures below can tell top-5 from top-1 and from 100%
    assert metrics["top1"] == pytest.approx(top1)
    assert metrics["top5"] == pytest.approx(top5)
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_evaluate_restores_training_mode():
    model = linear_net().train()
    evaluate(model, batches(1), nn.CrossEntropyLoss(), device=CPU)
    assert model.training


def test_pretrained_backbone_weights_come_from_the_local_file(tmp_path):
    import timm

    from emakit.training.build import build_model

    torch.manual_seed(123)
    source = timm.create_model("test_resnet", num_classes=3)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    torch.manual_seed(0)
    model = build_model("test_resnet", 3, CPU, pretrained_path=str(tmp_path / "weights.pth"))
    head = model.default_cfg["classifier"]  # timm re-initialises the classifier for fine-tuning
    for key, value in source.state_dict().items():
        if not key.startswith(head + "."):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.state_dict()[head + ".weight"].shape == source.state_dict()[head + ".weight"].shape


# --------------------------------------------------------------------------- the optimizer's kernel
def test_sgd_adam_adamw_use_torchs_fused_kernel_unless_turned_off_or_sharded():
    import timm

    from emakit.training.build import build_optimizer
    from emakit.training.config import parse_settings
    from emakit.training.settings import OptimSettings

    model = timm.create_model("test_resnet", num_classes=3)
    for opt in ("sgd", "momentum", "adam", "adamw"):
        fused = build_optimizer(OptimSettings(opt=opt), model, 0.1)
        assert all(g["fused"] is True for g in fused.param_groups), opt
        loop = build_optimizer(OptimSettings(opt=opt, fused=False), model, 0.1)
        assert not any(g.get("fused") for g in loop.param_groups), opt
    assert not any(g.get("fused") for g in build_optimizer(OptimSettings(), model, 0.1, sharded=True).param_groups)
    lamb = build_optimizer(OptimSettings(opt="lamb"), model, 0.1)  # timm's own class: no fused kernel, no error
    assert type(lamb).__name__ == "Lamb" and not lamb.defaults.get("fused")
    assert parse_settings([]).optim.fused is True
    assert parse_settings(["--no-opt-fused"]).optim.fused is False


def test_the_fused_sgd_step_is_nesterov_sgd_with_weight_decay():
    """Against the update written out in float64: g += wd p; b = m b + g; p -= lr (g + m b)."""
    import timm

    from emakit.training.build import build_optimizer
    from emakit.training.settings import OptimSettings

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    optimizer = build_optimizer(OptimSettings(weight_decay=0.01), model, 0.05)
    assert all(g["fused"] for g in optimizer.param_groups)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert set(decays.values()) == {0.0, 0.01}  # timm: no decay for biases and norms
    params = list(model.parameters())
    ref = [p.detach().double().clone() for p in params]
    bufs = [None] * len(params)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double() + decays[id(p)] * ref[i]
            bufs[i] = g.clone() if bufs[i] is None else 0.9 * bufs[i] + g
            ref[i] -= 0.05 * (g + 0.9 * bufs[i])
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)


def test_a_resumed_optimizer_keeps_this_runs_kernel_choice():
    import timm

    from emakit.training.build import build_optimizer
    from emakit.training.resume import load_optimizer_state
    from emakit.training.settings import OptimSettings

    model = timm.create_model("test_resnet", num_classes=3)
    for before, after in ((True, False), (False, True)):
        saved_by = build_optimizer(OptimSettings(fused=before), model, 0.1)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        saved_by.step()
        resumed = build_optimizer(OptimSettings(fused=after), model, 0.1)
        load_optimizer_state(model, resumed, saved_by.state_dict())
        assert all(bool(g.get("fused")) is after for g in resumed.param_groups)
        assert len(resumed.state) == len(saved_by.state)  # the momentum buffers came along
