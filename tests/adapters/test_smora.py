"""SMoRA: each rank is an expert; top-k gates (renormalised sigmoid scores) sum to k; router-bias balancing evens the load."""

from __future__ import annotations

import pytest
import torch

import lowrank
from _structures import adapter_of, layer, perturb, x_in


def test_topk_rank_gates_sum_to_k_and_forward():
    m = layer(32, 48)
    lowrank.adapt(m, "smora", rank=8, top_k=3)
    perturb(m)
    a = adapter_of(m)
    x = x_in(n=10)
    with torch.no_grad():
        a.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    g, sel = a.gates(x)
    torch.testing.assert_close(g.sum(-1), torch.full((10,), 3.0), atol=1e-5, rtol=0)
    assert ((g > 0).sum(-1) == 3).all(), "exactly top_k ranks active per token"
    s = torch.sigmoid(x @ a.lora_route.weight.T) + a.expert_bias      # the bias is part of the scores
    top, idx = s.topk(3, dim=-1)
    ref = torch.zeros_like(s).scatter(-1, idx, top / top.sum(-1, keepdim=True)) * 3
    torch.testing.assert_close(g, ref, atol=1e-6, rtol=0)
    assert a.scaling == a.alpha / 3 and a.alpha == 16.0                # the reference: lora_alpha / activate_r
    expect = m[0].base_layer(x) + a.scaling * ((x @ a.lora_A.weight.T) * g) @ a.lora_B.weight.T
    torch.testing.assert_close(m(x), expect, atol=1e-5, rtol=0)


def _load_spread(bias_lr: float) -> float:
    """Coefficient of variation of the rank loads accumulated over 200 training forwards."""
    torch.manual_seed(0)
    m = layer(32, 48)
    lowrank.adapt(m, "smora", rank=8, top_k=2, bias_lr=bias_lr)
    a = adapter_of(m)
    with torch.no_grad():  # a router skewed towards ranks 0 and 1
        a.lora_route.weight.normal_(0, 0.3)
        a.lora_route.weight[:2] += 0.3
    x = torch.rand(64, 32, generator=torch.Generator().manual_seed(1)) + 0.5
    m.train()
    total = torch.zeros(8)
    with torch.no_grad():
        for _ in range(200):
            total += torch.bincount(a.gates(x)[1].flatten(), minlength=8).float()
            m(x)
    assert not a.expert_bias.requires_grad and "expert_bias" in dict(a.named_buffers())
    return (total.std() / total.mean()).item()


def test_router_bias_balances_the_load():
    unbalanced, balanced = _load_spread(0.0), _load_spread(0.01)  # a larger rate than the default 1e-5: 200 steps
    assert unbalanced > 1.0, "the skewed router alone overloads two ranks"
    assert balanced < unbalanced / 3


def test_bad_options_and_merge():
    with pytest.raises(lowrank.ConfigError, match="top_k"):
        lowrank.adapt(layer(), "smora", rank=4, top_k=5)
    m = layer()
    lowrank.adapt(m, "smora", rank=4)
    with pytest.raises(lowrank.MergeError):
        lowrank.merge(m)
