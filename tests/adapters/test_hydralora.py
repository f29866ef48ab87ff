"""HydraLoRA: shared A, N heads B_i mixed by a softmax router; differentiable balancing term; no merge."""

from __future__ import annotations

import pytest
import torch

import lowrank
from _structures import adapter_of, layer, perturb, x_in


def test_router_mixture_of_heads():
    m = layer(32, 48)
    lowrank.adapt(m, "hydralora", rank=4, n_heads=3)
    perturb(m)
    a = adapter_of(m)
    x = x_in()
    w = a.route(x)  # (n, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(6), atol=1e-6, rtol=0)
    assert (w > 0).all()
    h = x @ a.lora_A.weight.T
    expect = m[0].base_layer(x) + a.scaling * sum(w[:, i : i + 1] * (h @ a.lora_B[i].T) for i in range(3))
    torch.testing.assert_close(m(x), expect, atol=1e-5, rtol=0)
    assert sum(p.numel() for _, p in lowrank.trainable_parameters(m)) == 4 * 32 + 3 * 4 * 48 + 3 * 32


def test_with_dropout_the_router_reads_the_clean_input():
    """Reference: route = softmax(W_g x), heads B_i A dropout(x) (the same dropout mask here)."""
    m = layer(32, 48)
    lowrank.adapt(m, "hydralora", rank=4, n_heads=3, dropout=0.5)
    perturb(m)
    m.train()
    a, x = adapter_of(m), x_in()
    torch.manual_seed(3)
    out = m(x)
    torch.manual_seed(3)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)
    w = a.route(x)                                             # clean input
    h = xd @ a.lora_A.weight.T
    expect = m[0].base_layer(x) + a.scaling * sum(w[:, i : i + 1] * (h @ a.lora_B[i].T) for i in range(3))
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)
    wrong = m[0].base_layer(x) + a.scaling * sum(a.route(xd)[:, i : i + 1] * (h @ a.lora_B[i].T) for i in range(3))
    assert not torch.allclose(out, wrong, atol=1e-3)


def test_balance_loss_is_differentiable_and_summed_by_lowrank_aux_loss():
    m = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 16))
    lowrank.adapt(m, "hydralora", rank=4, n_heads=4, balance_weight=0.1)
    perturb(m)
    m.eval()
    m(x_in())
    assert lowrank.aux_loss(m) is None  # no balancing term at eval
    m.train()
    m(x_in())
    terms = [layer.adapters["default"].aux_loss() for _, layer in lowrank.adapted_layers(m)]
    total = lowrank.aux_loss(m)
    torch.testing.assert_close(total, terms[0] + terms[1])
    assert total.item() >= 0.1 * 0.999  # N Σ f_i P_i >= 1 (equality when balanced)
    total.backward()
    for _, layer in lowrank.adapted_layers(m):
        g = layer.adapters["default"].lora_route.weight.grad
        assert g is not None and g.abs().sum() > 0, "the balancing term must reach the router"


def test_no_merge_and_bad_options():
    m = layer()
    lowrank.adapt(m, "hydralora", rank=4)
    with pytest.raises(lowrank.MergeError, match="hydralora"):
        lowrank.merge(m)
    assert not m[0].merged
    with pytest.raises(lowrank.ConfigError, match="n_heads"):
        lowrank.adapt(layer(), "hydralora", rank=4, n_heads=0)
    with pytest.raises(lowrank.ConfigError, match="balance_weight"):
        lowrank.adapt(layer(), "hydralora", rank=4, balance_weight=-1.0)
