"""Kronecker adaptation: the merged update is Σ_k kron(A_k, B_k); KPSVD recovers Kronecker structure."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.adapters.kron import _KronApply
from _structures import adapter_of, check_runs_under_autocast, layer, perturb, x_in


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


@pytest.mark.parametrize("swap", [False, True])  # X B_kᵀ first, or A_k X first (the transposed problem)
@pytest.mark.parametrize("chunk", [1, 4, 100])  # several chunks with a ragged last one, and one chunk
def test_chunked_function_gradients_match_explicit_kron(chunk, swap):
    torch.manual_seed(0)
    A = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)  # r=3, A_k 6x4, B_k 8x8
    B = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 48, dtype=torch.float64)
    (_KronApply.apply(x, A, B, chunk, swap) * g).sum().backward()
    A2, B2, x2 = (t.detach().clone().requires_grad_(True) for t in (A, B, x))
    dense = sum(torch.kron(A2[k], B2[k]) for k in range(3))  # (48, 32)
    (x2 @ dense.T * g).sum().backward()
    for got, ref in ((x.grad, x2.grad), (A.grad, A2.grad), (B.grad, B2.grad)):
        torch.testing.assert_close(got, ref)
    assert torch.autograd.gradcheck(lambda x, A, B: _KronApply.apply(x, A, B, 2, swap), (x[:1, :3], A, B))


def _kron_weight(sigmas, noise=1e-4, seed=0):
    """A 48x32 weight Σ_k σ_k U_k ⊗ V_k (U_k 6x4, V_k 8x8 orthonormal in the Frobenius sense) + noise."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(24, len(sigmas), generator=g))[0].T.reshape(-1, 6, 4)
    V = torch.linalg.qr(torch.randn(64, len(sigmas), generator=g))[0].T.reshape(-1, 8, 8)
    W = sum(s * torch.kron(U[k], V[k]) for k, s in enumerate(sigmas))
    return W + noise * torch.randn(48, 32, generator=g)


def _adapt_on(W, **opts):
    m = layer(32, 48)
    with torch.no_grad():
        m[0].weight.copy_(W)
    lowrank.adapt(m, "kron", a_rows=6, a_cols=4, **opts)
    return m, adapter_of(m)


def test_rank_selection_finds_the_number_of_significant_kronecker_terms():
    W = _kron_weight([3.0, 2.0, 1.5])  # three significant terms, the other 21 are noise
    for crit in ("elbow", "energy_elbow"):
        _, a = _adapt_on(W, rank=8, rank_selection=crit, factor_init="kpsvd")
        assert a.rank == 3 and a.kron_A.shape == (3, 6, 4) and a.kron_B.shape == (3, 8, 8), crit
    # energy: σ² = 9, 4, 2.25 -> cumulative 0.59, 0.86, 1.0: the smallest k reaching the threshold
    for tau, k in ((0.5, 1), (0.6, 2), (0.8, 2), (0.9, 3), (1.0, 8)):  # tau 1.0 needs the noise too: cap 8
        _, a = _adapt_on(W, rank=8, rank_selection="energy", energy_threshold=tau)
        assert a.rank == k, (tau, a.rank)
    _, a = _adapt_on(W, rank=2, rank_selection="elbow")  # never above the cap
    assert a.rank == 2


def test_energy_selection_is_the_smallest_k_reaching_the_threshold():
    from lowrank.adapters.kron import kron_rearrange, select_rank

    W = torch.randn(48, 32, generator=torch.Generator().manual_seed(4))  # a slowly decaying spectrum
    s = torch.linalg.svdvals(kron_rearrange(W, 6, 4)).double()
    energy = (s * s).cumsum(0) / (s * s).sum()
    for tau in (0.3, 0.6, 0.9):
        k = select_rank(s, 24, "energy", tau)
        assert energy[k - 1] >= tau and (k == 1 or energy[k - 2] < tau)
    _, a = _adapt_on(W, rank=24, rank_selection="energy", energy_threshold=0.6)
    assert a.rank == select_rank(s, 24, "energy", 0.6)


def test_per_layer_selected_ranks_count_and_save_load(tmp_path):
    def mlp():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 48)).eval()
        with torch.no_grad():
            m[0].weight.copy_(_kron_weight([3.0, 2.0, 1.5], seed=1))
            m[4].weight.copy_(_kron_weight([4.0, 1.0, 0.8, 0.7, 0.6], seed=2))
        return m

    model = mlp()
    opts = dict(a_rows=6, a_cols=4, rank_selection="elbow", factor_init="kpsvd")
    lowrank.adapt(model, "kron", rank=8, targets=["0", "4"], **opts)
    layers = dict(lowrank.adapted_layers(model))
    ranks = {p: layers[p].adapters["default"].rank for p in ("0", "4")}
    assert ranks == {"0": 3, "4": 5}, ranks  # each layer keeps its own number of significant terms
    cls = lowrank.get_method("kron")
    expect = sum(cls.trainable_count(32, 48, r, **opts) for r in ranks.values())
    assert sum(p.numel() for _, p in lowrank.trainable_parameters(model)) == expect == 8 * (24 + 64)
    perturb(model)
    x = x_in()
    with torch.no_grad():
        before = model(x)
    lowrank.save_adapter(model, tmp_path / "k")
    fresh = mlp()
    lowrank.load_adapter(fresh, tmp_path / "k")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), before, atol=1e-6, rtol=0)
    assert {p: l.adapters["default"].rank for p, l in lowrank.adapted_layers(fresh)} == ranks
    other = mlp()  # a base whose spectrum selects another k: refused, naming the key, model untouched
    with torch.no_grad():
        other[4].weight.copy_(_kron_weight([4.0, 1.0], seed=3))
    with pytest.raises(lowrank.AdapterLoadError, match=r"4\.kron_A.*\(5, 6, 4\).*\(2, 6, 4\)"):
        lowrank.load_adapter(other, tmp_path / "k")
    assert not list(lowrank.adapted_layers(other))


def test_rank_selection_options_are_checked():
    with pytest.raises(lowrank.ConfigError, match="rank_selection"):
        lowrank.adapt(layer(32, 48), "kron", rank=2, rank_selection="knee")
    with pytest.raises(lowrank.ConfigError, match="energy_threshold"):
        lowrank.adapt(layer(32, 48), "kron", rank=2, rank_selection="energy", energy_threshold=1.5)


def test_runs_under_autocast():  # the chunked Function accumulates its gradients in one dtype
    check_runs_under_autocast("kron", "kron_B", rank=2, a_rows=6, a_cols=4)
