"""Kronecker adaptation: the merged update is Σ_k kron(A_k, B_k); KPSVD recovers Kronecker structure."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.adapters.kron import _KronApply
from _structures import adapter_of, layer, perturb, x_in


def test_merged_update_equals_torch_kron():
    m = layer(32, 48)
    W = m[0].weight.detach().clone()
    lowrank.adapt(m, "kron", rank=3, alpha=6, a_rows=6, a_cols=4)  # A 6x4, B 8x8
    perturb(m)
    a = adapter_of(m)
    expect = 2.0 * sum(torch.kron(a.kron_A[k], a.kron_B[k]) for k in range(3)).detach()
    x = x_in()
    torch.testing.assert_close(m(x), m[0].base_layer(x) + x @ expect.T, atol=1e-5, rtol=0)
    with torch.no_grad():
        lowrank.merge(m)
    torch.testing.assert_close(m[0].base_layer.weight - W, expect, atol=1e-5, rtol=0)
    assert sum(p.numel() for _, p in lowrank.trainable_parameters(m)) == 3 * (6 * 4 + 8 * 8)


def test_kpsvd_init_finds_the_kronecker_factors_of_w():
    torch.manual_seed(0)
    U, V = torch.randn(6, 4), torch.randn(8, 8)
    m = layer(32, 48)
    with torch.no_grad():
        m[0].weight.copy_(torch.kron(U, V))  # W is exactly one Kronecker product
    lowrank.adapt(m, "kron", rank=1, a_rows=6, a_cols=4, factor_init="kpsvd")
    A = adapter_of(m).kron_A[0].detach()
    cos = (A.flatten() @ U.flatten()).abs() / (A.norm() * U.norm())
    assert cos > 0.9999, "A_1 must be the leading Kronecker factor of W (up to scale)"
    x = x_in()
    torch.testing.assert_close(m(x), m[0].base_layer(x), atol=0, rtol=0)  # B = 0: starts at W


def test_factor_shapes_must_divide():
    with pytest.raises(lowrank.ShapeError, match="a_rows=5.*'0'"):
        lowrank.adapt(layer(32, 48), "kron", rank=2, a_rows=5)
    with pytest.raises(lowrank.ShapeError, match="a_cols=3.*'0'"):
        lowrank.adapt(layer(32, 48), "kron", rank=2, a_cols=3)
    with pytest.raises(lowrank.ShapeError, match="Kronecker rank"):
        lowrank.adapt(layer(32, 48), "kron", rank=2, a_rows=48, a_cols=32)


@pytest.mark.parametrize("chunk", [1, 4, 100])  # several chunks with a ragged last one, and one chunk
def test_chunked_function_gradients_match_explicit_kron(chunk):
    torch.manual_seed(0)
    A = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)  # r=3, A_k 6x4, B_k 8x8
    B = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 48, dtype=torch.float64)
    (_KronApply.apply(x, A, B, chunk) * g).sum().backward()
    A2, B2, x2 = (t.detach().clone().requires_grad_(True) for t in (A, B, x))
    dense = sum(torch.kron(A2[k], B2[k]) for k in range(3))  # (48, 32)
    (x2 @ dense.T * g).sum().backward()
    for got, ref in ((x.grad, x2.grad), (A.grad, A2.grad), (B.grad, B2.grad)):
        torch.testing.assert_close(got, ref)
    assert torch.autograd.gradcheck(lambda x, A, B: _KronApply.apply(x, A, B, 2), (x[:1, :3], A, B))
