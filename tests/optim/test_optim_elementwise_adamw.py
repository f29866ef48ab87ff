"""ElementwiseAdamW: torch's AdamW to the bit while no count is reset; a reset element restarts
exactly as a fresh Adam would (the property SwitchLoRA's reference optimizer exists for)."""

from __future__ import annotations

import copy

import pytest
import torch

from lowrank.errors import ConfigError
from lowrank.optim import ElementwiseAdamW


def _grads(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("elementwise", [False, True])
def test_equals_torch_adamw_to_the_bit_without_resets(elementwise):
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = ElementwiseAdamW([{"params": a[:1]}, {"params": a[1:], "lr": 0.05}], lr=0.1, betas=(0.8, 0.99),
                            eps=1e-6, weight_decay=0.1, elementwise_step=elementwise)
    ref = torch.optim.AdamW([{"params": b[:1]}, {"params": b[1:], "lr": 0.05}], lr=0.1, betas=(0.8, 0.99),
                            eps=1e-6, weight_decay=0.1, foreach=False)
    for g1, g2 in zip(_grads(6, (5, 3)), _grads(6, (7,), seed=1)):
        for ps in (a, b):
            ps[0].grad, ps[1].grad = g1.clone(), g2.clone()
        ours.step()
        ref.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert ours.state[a[0]]["step"].shape == ((5, 3) if elementwise else ())


def test_a_reset_row_restarts_as_a_fresh_adam_while_the_others_continue():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = ElementwiseAdamW([p], lr=0.1, weight_decay=0.0)
    gs = _grads(10, (4, 6))
    for g in gs[:5]:
        p.grad = g.clone()
        opt.step()
    st = opt.state[p]
    for k in ("exp_avg", "exp_avg_sq", "step"):
        st[k][1] = 0  # row 1 restarts
    row = torch.nn.Parameter(p.detach()[1].clone())
    fresh = torch.optim.AdamW([row], lr=0.1, weight_decay=0.0, foreach=False)
    rest = [torch.nn.Parameter(p.detach().clone())]
    for g in gs[5:]:
        p.grad = g.clone()
        opt.step()
        row.grad = g[1].clone()
        fresh.step()
    torch.testing.assert_close(p.detach()[1], row.detach(), atol=1e-6, rtol=0)
    assert st["step"][1].eq(5).all() and st["step"][0].eq(10).all()
    # torch's AdamW cannot do this: with its one (large) count the restarted row's first step is
    # (1 - b1) / sqrt(1 - b2) ~ 3.2x a fresh Adam's first step (lr in every entry)
    t = torch.nn.Parameter(rest[0].detach().clone())
    tor = torch.optim.AdamW([t], lr=0.1, weight_decay=0.0, foreach=False)
    t.grad = gs[0].clone()
    tor.step()
    tor.state[t]["step"].fill_(5000.0)
    tor.state[t]["exp_avg"][1] = 0
    tor.state[t]["exp_avg_sq"][1] = 0
    before = t.detach()[1].clone()
    t.grad = gs[5].clone()
    tor.step()
    assert ((t.detach()[1] - before).abs() / 0.1).min() > 3.0


def test_bad_settings_and_bad_state_are_refused_before_anything_changes():
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ConfigError, match="betas"):
        ElementwiseAdamW([p], betas=(0.9, 1.5))
    with pytest.raises(ConfigError, match="lr"):
        ElementwiseAdamW([p], lr=-1.0)
    with pytest.raises(ConfigError, match="elementwise_step"):
        ElementwiseAdamW([p], elementwise_step="yes")
    opt = ElementwiseAdamW([p], lr=0.1)
    p.grad = torch.ones(3, 2)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.zeros(5)
    opt.load_state_dict(sd)
    before = p.detach().clone()
    with pytest.raises(ConfigError, match="step count of shape"):
        opt.step()
    assert torch.equal(p, before)
    opt.param_groups[0]["eps"] = float("nan")
    with pytest.raises(ConfigError, match="eps"):
        opt.step()
    assert torch.equal(p, before)


def test_state_dict_round_trip_resumes_bit_identically():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    q = torch.nn.Parameter(p.detach().clone())
    o1 = ElementwiseAdamW([p], lr=0.1)
    gs = _grads(6, (4, 3))
    for g in gs[:3]:
        p.grad = g.clone()
        o1.step()
    q.data.copy_(p.detach())
    o2 = ElementwiseAdamW([q], lr=0.1)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # state_dict() shares its tensors
    for g in gs[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.equal(p, q)


def test_loads_a_torch_adamw_state_and_continues_it_exactly():
    """A torch AdamW state dict (scalar counts, no elementwise_step key) loads; with per-element
    counts the run continues exactly as torch's would."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    q = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([p], lr=0.1, foreach=False)
    gs = _grads(6, (4, 3))
    for g in gs[:3]:
        p.grad = g.clone()
        ref.step()
    q.data.copy_(p.detach())
    ours = ElementwiseAdamW([q], lr=0.1)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    for g in gs[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert torch.equal(p, q)
    assert ours.state[q]["step"].shape == (4, 3) and ours.param_groups[0]["elementwise_step"]
    bad = torch.optim.AdamW([p], lr=0.1, amsgrad=True)
    ours.load_state_dict(copy.deepcopy(bad.state_dict()) | {"state": {}})
    with pytest.raises(ConfigError, match="amsgrad"):
        ours.step()


def test_a_sparse_gradient_is_refused_before_any_parameter_moves():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = ElementwiseAdamW([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3).to_sparse()
    before = a.detach().clone()
    with pytest.raises(ConfigError, match="sparse"):
        opt.step()
    assert torch.equal(a, before) and not opt.state


@pytest.mark.parametrize("dims, shape", [((0,), (4, 1)), ((1,), (1, 6)), ((-1,), (1, 6))])
def test_counts_per_row_or_column_match_per_element_counts(dims, shape):
    """elementwise_step=(0,) keeps one count per row (a (rows, 1) tensor): resetting whole rows, it
    computes exactly what per-element counts compute."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6))
    q = torch.nn.Parameter(p.detach().clone())
    full = ElementwiseAdamW([p], lr=0.1)
    compact = ElementwiseAdamW([q], lr=0.1, elementwise_step=dims)
    gs = _grads(8, (4, 6))
    axis = dims[0] % 2
    for k, g in enumerate(gs):
        p.grad, q.grad = g.clone(), g.clone()
        full.step()
        compact.step()
        if k == 3:  # restart slice 1 along the counted dimension, in both
            for opt, t in ((full, p), (compact, q)):
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    opt.state[t][key].index_fill_(axis, torch.tensor([1]), 0)
    assert torch.equal(p, q)
    assert tuple(compact.state[q]["step"].shape) == shape
    with pytest.raises(ConfigError, match="elementwise_step"):
        ElementwiseAdamW([torch.nn.Parameter(torch.randn(3))], elementwise_step=(1,))
