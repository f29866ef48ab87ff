"""Hydra: parallel branch on x plus sequential branch on the frozen output W x + b (as the reference
code); merges to W' = (I + s B_s A_s) W + s B_p A_p and b' = (I + s B_s A_s) b."""

from __future__ import annotations

import torch

import lowrank
from lowrank.adapters.factorized import plain_state_dict
from _structures import adapter_of, layer, perturb, x_in


def test_parallel_plus_sequential_on_frozen_features_and_merge():
    m = layer(32, 48, bias=True)
    W, bias = m[0].weight.detach().clone(), m[0].bias.detach().clone()
    lowrank.adapt(m, "hydra", rank=4, alpha=8)
    perturb(m)
    a = adapter_of(m)
    s = 2.0
    Bp, Ap, Bs, As = (t.detach() for t in (a.par_B.weight, a.par_A.weight, a.seq_B.weight, a.seq_A.weight))
    x = x_in()
    y = x @ W.T + bias  # the sequential branch sees the frozen layer's whole output, bias included
    expect = y + s * (x @ Ap.T @ Bp.T) + s * (y @ As.T @ Bs.T)
    torch.testing.assert_close(m(x), expect, atol=1e-5, rtol=0)
    with torch.no_grad():
        lowrank.merge(m)
        base = m[0].base_layer
        torch.testing.assert_close(base.weight, W + s * (Bp @ Ap + Bs @ As @ W), atol=1e-5, rtol=0)
        torch.testing.assert_close(base.bias, bias + s * (Bs @ As @ bias), atol=1e-5, rtol=0)
        torch.testing.assert_close(m(x), expect, atol=1e-5, rtol=0)
        lowrank.unmerge(m)
    torch.testing.assert_close(m[0].base_layer.weight, W, atol=1e-5, rtol=0)
    torch.testing.assert_close(m[0].base_layer.bias, bias, atol=1e-5, rtol=0)
    assert sum(p.numel() for _, p in lowrank.trainable_parameters(m)) == 4 * (32 + 48) + 2 * 4 * 48


def test_bias_moves_with_a_second_adapter_and_in_unload():
    """Merged beside another adapter (updates summed against W0, b0) and unloaded, the layer keeps
    its outputs; unmerging gives back the base bias exactly."""
    m = layer(32, 48, bias=True)
    bias = m[0].bias.detach().clone()
    lowrank.adapt(m, "hydra", rank=4, name="h")
    lowrank.adapt(m, "lora", rank=4, name="l")
    lowrank.set_active(m, ["h", "l"])
    perturb(m)
    x = x_in()
    with torch.no_grad():
        want = m(x)
        lowrank.merge(m)
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=0)
        lowrank.unmerge(m)
        assert torch.equal(m[0].base_layer.bias, bias)
        plain = lowrank.unload(m)
        torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=0)


def test_plain_state_dict_carries_the_moved_bias():
    m = layer(32, 48, bias=True)
    fresh = layer(32, 48, bias=True)
    lowrank.adapt(m, "hydra", rank=4)
    perturb(m)
    x = x_in()
    with torch.no_grad():
        want = m(x)
        fresh.load_state_dict(plain_state_dict(m))
        torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=0)
