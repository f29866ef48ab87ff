"""FlyLoRA: a frozen sparse random A routes implicitly; only top-k rank columns of B act; only B trains."""

from __future__ import annotations


import pytest
import torch

import lowrank
from _structures import adapter_of, layer, perturb, x_in


def test_frozen_sparse_router_and_topk_experts():
    m = layer(32, 48)
    lowrank.adapt(m, "flylora", rank=8, top_k=2)
    perturb(m)
    a = adapter_of(m)
    A = a.fly_A
    assert "fly_A" in dict(a.named_buffers()) and not A.requires_grad
    assert [n for n, _ in lowrank.trainable_parameters(m)] == ["0.adapters.default.lora_B.weight"]
    nnz = (A != 0).sum(-1)
    assert (nnz == int(2 / 8 * 32)).all(), "each row of A has ρ·in non-zeros (ρ = k/r)"
    x = x_in(n=10)
    y = x @ A.T  # (n, r)
    top = y.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(y).scatter_(-1, top, 1.0)
    expect = m[0].base_layer(x) + a.scaling * (y * mask) @ a.lora_B.weight.T
    torch.testing.assert_close(m(x), expect, atol=1e-5, rtol=0)
    assert a.scaling == 2.0  # default alpha = 2r


def test_bias_update_without_router_loss():
    m = layer(32, 48)
    lowrank.adapt(m, "flylora", rank=8, top_k=2, bias_lr=0.05)
    a = adapter_of(m)
    m.train()
    m(x_in(n=40))
    assert a.expert_bias.abs().sum() > 0, "training forwards update the balancing bias"
    assert lowrank.aux_loss(m) is None
    with pytest.raises(lowrank.ConfigError, match="top_k"):
        lowrank.adapt(layer(), "flylora", rank=4, top_k=9)
    with pytest.raises(lowrank.ConfigError, match="density"):
        lowrank.adapt(layer(), "flylora", rank=4, density=1.5)
    with pytest.raises(lowrank.MergeError):
        lowrank.merge(m)
