"""ReLoRA: merge-and-restart keeps the function, resets/prunes optimizer state, jagged LR."""

from __future__ import annotations

import math

import pytest
import torch

import lowrank
from lowrank.errors import CheckpointError
from lowrank.schedules import ReLoRA, load_schedules_state_dict, relora_lr_lambda, schedules_state_dict
from conftest import tiny_llama


def _ids(seed):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def _setup(lr=1e-2):
    model = tiny_llama()
    lowrank.adapt(model, "lora", rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, opt


def _step(model, opt, seed):
    ids = _ids(seed)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("mode", ["reset", "prune", "prune-joint"])
def test_restart_merges_the_effective_weight_and_handles_state(mode):
    model, opt = _setup()
    sched = ReLoRA(every=3, optimizer_reset=mode, prune_ratio=0.9, manage_lr=False)
    sched.attach(model, opt)
    for s in range(3):
        _step(model, opt, s)
        sched.step(model, opt, s)
    assert sched.restarts == 0
    _step(model, opt, 3)
    layers = list(lowrank.adapted_layers(model))
    effective = {p: (l.base.weight + l.adapters["default"].delta_weight()).detach().clone() for p, l in layers}
    ids = _ids(99)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    sched.step(model, opt, 3)  # after the step at index every (3), as the reference: restart
    assert sched.restarts == 1
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for p, l in layers:
        a = l.adapters["default"]
        torch.testing.assert_close(l.base.weight, effective[p], atol=1e-6, rtol=0)
        assert a.B.abs().max() == 0 and a.A.abs().max() > 0  # restarted: B = 0, A re-drawn
        for t in (a.A, a.B):
            st = opt.state[t]
            for key in ("exp_avg", "exp_avg_sq"):
                nonzero = (st[key] != 0).float().mean().item()
                if mode == "reset":
                    assert nonzero == 0
                else:
                    assert 0 < nonzero <= 0.1 + 1e-6, (key, nonzero)
            if mode == "prune-joint":  # one mask: a first moment survives exactly where the second does
                assert torch.equal(st["exp_avg"] != 0, st["exp_avg_sq"] != 0)
    # the rest of the model keeps its optimizer state untouched
    emb = model.get_input_embeddings().weight
    assert not emb.requires_grad or emb not in opt.state or opt.state[emb]["exp_avg"].abs().sum() > 0


def test_many_restarts_reach_beyond_rank_r():
    model, opt = _setup()
    sched = ReLoRA(every=2, optimizer_reset="reset", manage_lr=False)
    sched.attach(model, opt)
    w0 = {p: l.base.weight.detach().clone() for p, l in lowrank.adapted_layers(model)}
    for s in range(8):
        _step(model, opt, s)
        sched.step(model, opt, s)
    p, l = next(iter(lowrank.adapted_layers(model)))
    total = l.base.weight - w0[p]
    assert torch.linalg.matrix_rank(total, atol=1e-5) > 4  # four rank-4 updates merged


def test_jagged_cosine():
    kw = dict(total_steps=100, warmup_steps=10, restart_every=25, restart_warmup_steps=5, min_lr_ratio=0.1)
    f = [relora_lr_lambda(s, **kw) for s in range(100)]
    assert f[0] == 0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert f[25] == 0 and f[50] == 0 and f[75] == 0  # restart: back to zero
    assert f[27] < f[30] and f[30] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 20 / 90)))
    assert f[99] < f[60] < f[40]  # the envelope decays


def test_relora_manages_the_lr():
    model, opt = _setup(lr=1.0)
    sched = ReLoRA(every=4, total_steps=20, warmup_steps=2, restart_warmup_steps=2)
    sched.attach(model, opt)
    seen = [opt.param_groups[0]["lr"]]
    for s in range(8):
        sched.step(model, opt, s)
        seen.append(opt.param_groups[0]["lr"])
    assert seen[0] == 0 and seen[4] == 0 and seen[2] > 0.9 and seen[8] == 0


def test_relora_without_factor_adapters_is_an_error():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(lowrank.ConfigError, match="factor adapters"):
        ReLoRA(every=10).attach(model, opt)
    lowrank.adapt(model, "cola", rank=4)  # a full-weight parameterisation is not something to merge-restart
    with pytest.raises(lowrank.ConfigError, match="factor adapters"):
        ReLoRA(every=10).attach(model, opt)
    with pytest.raises(lowrank.ConfigError, match="every"):
        ReLoRA(every=0)
    with pytest.raises(lowrank.ConfigError, match="optimizer_reset"):
        ReLoRA(every=5, optimizer_reset="sometimes")


def test_resume_restores_and_missing_state_is_an_error():
    model, opt = _setup()
    sched = ReLoRA(every=3, manage_lr=False)
    sched.attach(model, opt)
    for s in range(4):
        _step(model, opt, s)
        sched.step(model, opt, s)
    saved = schedules_state_dict([sched])
    again = ReLoRA(every=3, manage_lr=False)
    load_schedules_state_dict([again], saved)
    assert again.t == 4 and again.restarts == 1
    with pytest.raises(CheckpointError, match="relora"):
        load_schedules_state_dict([ReLoRA(every=3)], {})
    with pytest.raises(CheckpointError, match="restarts"):
        ReLoRA(every=3).load_state_dict({"name": "relora", "t": 3})


@pytest.mark.parametrize("mode", ["prune", "prune-joint", "reset"])
def test_restart_keeps_per_element_step_counts(mode):
    """Under ElementwiseAdamW the step counts are shaped like the parameter: a restart prunes or
    resets the moments only, as with torch's scalar count."""
    from lowrank.optim import ElementwiseAdamW
    from lowrank.schedules.relora import prune_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    lowrank.adapt(model, "lora", rank=4)
    a = model[0].adapters["default"]
    opt = ElementwiseAdamW([a.A, a.B], lr=1e-2)
    x = torch.randn(8, 64)
    for _ in range(5):
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    prune_state(opt, [a.A, a.B], mode, 0.9)
    for p in (a.A, a.B):
        st = opt.state[p]
        assert st["step"].eq(5).all()
        kept = int((st["exp_avg"] != 0).sum())
        assert kept == 0 if mode == "reset" else 0 < kept <= p.numel() // 10 + 1
