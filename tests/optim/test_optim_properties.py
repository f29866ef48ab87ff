"""Defining properties of the projection machinery (direct on the transforms, no model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank.optim as lo
from lowrank.optim.projectors import capture, make_projector
from lowrank.optim.projectors.dct import dct_basis
from lowrank.optim.transforms import AdamW, SGDMomentum, make_inner
from lowrank.optim.wrapper import LowRank

from optim_helpers import tiny_llama, batch


def low_rank_plus_noise(m, n, r, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    s = torch.linspace(10, 3, r)          # a clear gap above the noise (top noise sv ~ noise*(sqrt m + sqrt n))
    return U @ torch.diag(s) @ V.T + noise * torch.randn(m, n, generator=g)


def one_update(projector, shape, rank=6, seed=0, **kw):
    tf = LowRank(AdamW(), make_projector(projector, rank), rank=rank, update_gap=10, scale=1.0, **kw)
    p = torch.zeros(shape)
    st = tf.init(p, 1)
    G = low_rank_plus_noise(*shape, 10, seed=seed)
    D = tf.update([G], [st], [p], 1)[0]
    Gp = G.mT if st.transposed else G
    return D.mT if st.transposed else D, tf.projector.basis(st.proj, Gp)


@pytest.mark.parametrize("projector", ["svd", "randomized", "dct", "random", "int4"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_update_lies_in_the_projector_subspace(projector, shape):
    D, Q = one_update(projector, shape)                      # D in the oriented frame (m', d), Q (d, r)
    P = Q @ torch.linalg.pinv(Q)                             # projector onto span(Q), also for Gaussian Q
    assert D.abs().max() > 1e-3
    torch.testing.assert_close(D @ P, D, atol=1e-5, rtol=1e-4)
    # and not trivially: a generic direction is not in the subspace
    X = torch.randn_like(D)
    assert (X @ P - X).norm() > 0.5 * X.norm()


def test_projection_side_follows_galore_torch():
    # m >= n: right side (basis over the n columns); m < n: left side (basis over the m rows)
    for shape, d in (((40, 24), 24), ((24, 40), 24)):
        tf = LowRank(AdamW(), make_projector("svd", 4), rank=4)
        st = tf.init(torch.zeros(shape), 1)
        assert st.proj.Q.shape == (d, 4) and st.inner.m.shape == (40, 4)
        assert st.transposed == int(shape[0] < shape[1])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 32))


@pytest.mark.parametrize("inner, ref", [
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, weight_decay=0.1)),
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.0)),
])
def test_full_rank_equals_the_inner_optimizer(inner, ref):
    ma, mb = _mlp(), _mlp()
    wd = 0.1 if inner == "adamw" else 0.0
    ours = lo.galore(ma, lr=1e-2, rank=32, scale=1.0, inner=inner, targets=["0", "2"], weight_decay=wd)
    assert ours.param_groups[-1]["method"] == "galore" and len(ours.param_groups[-1]["params"]) == 2
    theirs = ref(mb.parameters())
    x = torch.randn(16, 32)
    for _ in range(5):
        for m, o in ((ma, ours), (mb, theirs)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_randomized_spans_nearly_the_exact_subspace():
    r = 8
    Gs = [low_rank_plus_noise(96, 64, r, noise=0.05, seed=s) for s in range(3)]   # batched: same shape
    svd, rnd = make_projector("svd", r), make_projector("randomized", r)   # defaults: p=8, 1 power it.
    S = [svd.init(64, G, i, False) for i, G in enumerate(Gs)]
    R = [rnd.init(64, G, i, False) for i, G in enumerate(Gs)]
    svd.refresh(Gs, S, 1)
    rnd.refresh(Gs, R, 1)
    for G, s, q in zip(Gs, S, R):
        Qs, Qr = svd.basis(s, G), rnd.basis(q, G)
        torch.testing.assert_close(Qr.T @ Qr, torch.eye(r), atol=1e-4, rtol=0)   # orthonormal
        # principal angles: ||Qs^T Qr||_F^2 / r = mean cos^2 of the angles
        assert (Qs.T @ Qr).square().sum() / r > 0.98
        assert capture(G, Qr) > 0.99 * capture(G, Qs)


def test_randomized_captures_95pct_of_exact_energy_on_real_gradients():
    model = tiny_llama(0)
    model(**batch(1)).loss.backward()
    Gs = [p.grad for n, p in model.named_parameters() if p.dim() == 2 and "layers" in n]
    Gs = [G if G.shape[0] >= G.shape[1] else G.mT for G in Gs]
    r = 4
    svd, rnd = make_projector("svd", r), make_projector("randomized", r)
    S = [svd.init(G.shape[1], G, i, False) for i, G in enumerate(Gs)]
    R = [rnd.init(G.shape[1], G, i, False) for i, G in enumerate(Gs)]
    svd.refresh(Gs, S, 1)
    rnd.refresh(Gs, R, 1)
    ratio = [capture(G, rnd.basis(q, G)) / capture(G, svd.basis(s, G)) for G, s, q in zip(Gs, S, R)]
    assert sum(ratio) / len(ratio) >= 0.95 and min(ratio) > 0.85


def test_moment_rotation_preserves_the_projection():
    torch.manual_seed(0)
    tf = LowRank(AdamW(), make_projector("randomized", 4), rank=4, update_gap=2, scale=1.0, rotate_moments=True)
    p = torch.zeros(30, 20)
    st = tf.init(p, 1)
    for t in (1, 2):
        tf.update([low_rank_plus_noise(30, 20, 6, seed=t)], [st], [p], t)
    Q0, m0 = st.proj.Q.clone(), st.inner.m.clone()
    G3 = low_rank_plus_noise(30, 20, 6, seed=99)           # a different subspace
    tf._refresh([G3], [st], 3)
    Q1, m1 = st.proj.Q, st.inner.m
    assert (Q1.T @ Q0).square().sum() < 3.5                 # the basis did change
    # the rotated moment, seen in full space, is the old full-space moment projected on the new basis
    torch.testing.assert_close(m1 @ Q1.T, (m0 @ Q0.T) @ Q1 @ Q1.T, atol=1e-5, rtol=1e-4)


def test_rotation_is_exact_for_both_moments_when_bases_share_directions():
    # DCT bases differ by selecting other columns of the same orthonormal matrix: shared columns
    # must keep their first AND second moments exactly; dropped ones vanish; new ones start at 0.
    tf = LowRank(AdamW(), make_projector("dct", 4), rank=4, update_gap=1, scale=1.0, rotate_moments=True)
    C = dct_basis(16)
    p = torch.zeros(24, 16)
    st = tf.init(p, 1)
    A = torch.randn(24, 4) @ C[:, [1, 3, 5, 7]].T
    tf.update([A], [st], [p], 1)
    idx0, m0, v0 = st.proj.idx.clone(), st.inner.m.clone(), st.inner.v.clone()
    assert idx0.tolist() == [1, 3, 5, 7]
    tf._refresh([torch.randn(24, 4) @ C[:, [3, 7, 9, 11]].T], [st], 2)
    assert st.proj.idx.tolist() == [3, 7, 9, 11]
    torch.testing.assert_close(st.inner.m[:, :2], m0[:, [1, 3]])
    torch.testing.assert_close(st.inner.v[:, :2], v0[:, [1, 3]])
    assert st.inner.m[:, 2:].abs().max() < 1e-6 and st.inner.v[:, 2:].abs().max() < 1e-6


def test_dct_state_is_indices_only_and_picks_aligned_columns():
    C = dct_basis(32)
    G = torch.randn(50, 3) @ C[:, [2, 17, 30]].T + 1e-3 * torch.randn(50, 32)
    pr = make_projector("dct", 3)
    s = pr.init(32, G, 1, False)
    pr.refresh([G], [s], 1)
    assert s.idx.tolist() == [2, 17, 30] and s.idx.dtype == torch.int64
    assert [t.dtype for t in (s.idx,)] == [torch.int64]


def test_random_projector_is_regenerated_from_its_seed():
    pr = make_projector("random", 4, seed=3)
    G = torch.randn(20, 12)
    a, b = pr.init(12, G, 5, False), pr.init(12, G, 5, False)
    pr.refresh([G], [a], 1), pr.refresh([G], [b], 1)
    torch.testing.assert_close(pr.basis(a, G), pr.basis(b, G), rtol=0, atol=0)   # same seed, same matrix
    Q1 = pr.basis(a, G)
    pr.refresh([G], [a], 2)
    assert not torch.allclose(pr.basis(a, G), Q1)                               # a refresh draws anew
    # E[Q Q^T] = I: N(0, 1/r) entries
    assert abs(float(Q1.square().sum(1).mean()) - 1.0) < 0.5


def test_online_pca_tracks_the_gradient_subspace_without_svd():
    r = 4
    pr = make_projector("online_pca", r, pca_lr=0.5)
    G = low_rank_plus_noise(60, 40, r, noise=0.01, seed=1)
    s = pr.init(40, G, 1, False)
    start_basis = torch.randn(40, r, generator=torch.Generator().manual_seed(0))
    s.Q.copy_(torch.linalg.qr(start_basis).Q)                 # start from a random basis, not the answer
    start = capture(G, torch.linalg.qr(s.Q).Q)
    for t in range(300):
        pr.track([G], [s], [G @ s.Q], t + 2)
    Qo = torch.linalg.qr(s.Q).Q
    assert start < 0.3 and capture(G, Qo) > 0.98
    # stays near orthonormal (over twelve random starts the largest deviation after 300 steps was 0.12)
    torch.testing.assert_close(s.Q.T @ s.Q, torch.eye(r), atol=0.15, rtol=0)


def test_int4_codes_and_adaptive_gap():
    pr = make_projector("int4", 4, group_size=16, queue_size=3, cos_threshold=0.4)
    G = low_rank_plus_noise(40, 32, 4, seed=2)
    s = pr.init(32, G, 1, False)
    assert s.codes.dtype == torch.uint8 and s.codes.numel() == 32 * 4 // 2
    pr.refresh([G], [s], 1)
    Q = pr.basis(s, G)
    Qsvd = torch.linalg.svd(G, full_matrices=False).Vh[:4].T
    assert (Q - Qsvd).abs().max() < 0.1 and (Q - Qsvd).abs().max() > 0     # quantized, close
    for t in range(3):                                     # the same subspace 3 more times: gap doubles
        assert s.gap_mult == 1
        pr.refresh([G], [s], t + 2)
    assert s.gap_mult == 2
    tf = LowRank(AdamW(), pr, rank=4, update_gap=5)
    st = tf.init(torch.zeros(40, 32), 1)
    st.proj = s
    tf._refresh([G], [st], 10)
    assert st.next_refresh == 10 + 5 * 4                   # doubled again: similar subspaces, longer gap


def test_flora_compression_is_unbiased_and_transfers_momentum():
    from lowrank.optim.flora import Flora
    x = torch.randn(16, 12)
    from lowrank.optim.projectors.random import gaussian_basis
    rec = sum(x @ gaussian_basis(s, 12, 4, True, x) @ gaussian_basis(s, 12, 4, True, x).T for s in range(3000)) / 3000
    assert (rec - x).norm() / x.norm() < 0.1               # E[B B^T] = I
    f = Flora(4, kappa=2, beta1=0.9)
    p = torch.zeros(16, 12)
    st = f.init(p, 1)
    assert st.C.shape == (16, 4) and st.row.shape == (16,) and st.col.shape == (12,)
    f.update([x], [st], [p], 1)
    seed1, C1 = st.seed, st.C.clone()
    f.update([torch.zeros_like(x)], [st], [p], 2)          # kappa = 2: resample with transfer (u = 0)
    assert st.seed != seed1
    B1, B2 = f._B(seed1, x, False), f._B(st.seed, x, False)
    torch.testing.assert_close(st.C, 0.9 * (C1 @ B1.T @ B2))   # C <- b1 (C B1^T) B2


def test_fira_adds_the_scaled_residual_outside_the_subspace():
    from lowrank.optim.fira import Fira
    tf = Fira(AdamW(), make_projector("svd", 4), rank=4, scale=1.0)
    p = torch.zeros(30, 20)
    st = tf.init(p, 1)
    G = low_rank_plus_noise(30, 20, 8, noise=0.1)
    D = tf.update([G], [st], [p], 1)[0]
    Q = st.proj.Q
    inside, outside = D @ Q @ Q.T, D - D @ Q @ Q.T
    R = G @ Q
    N = R / (R.abs() + 1e-8)                                # Adam's bias-corrected first step
    phi = N.norm(dim=1, keepdim=True) / (R.norm(dim=1, keepdim=True) + 1e-8)
    torch.testing.assert_close(inside, N @ Q.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outside, phi * (G - R @ Q.T), atol=1e-4, rtol=1e-4)
    # the limiter: a 10x larger gradient may grow the residual by at most 1.01x
    n1 = outside.norm()
    D2 = tf.update([10 * G], [st], [p], 2)[0]
    assert (D2 - D2 @ Q @ Q.T).norm() <= 1.01 * n1 * (1 + 1e-5)


def test_apollo_scales_the_raw_gradient_per_channel():
    from lowrank.optim.apollo import Apollo
    tf = Apollo(AdamW(), make_projector("random", 4), rank=4, scale=1.0)
    p = torch.zeros(30, 20)
    st = tf.init(p, 1)
    G = torch.randn(30, 20)
    D = tf.update([G], [st], [p], 1)[0]
    ratio = D / G                                           # one factor per row (channel)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5, rtol=1e-4)
    assert ratio[:, 0].std() > 0
    assert st.proj.seed == 1 and sum(t.numel() for t in [st.extra.prev]) == 1    # no matrix stored


def test_chain_composes_transforms():
    from lowrank.optim.transforms import ClipByRMS, chain
    c = chain(SGDMomentum(0.0), ClipByRMS(1.0))
    p = torch.zeros(5)
    st = c.init(p)
    out = c.update([torch.full((5,), 10.0)], [st], [p], 1)[0]
    torch.testing.assert_close(out, torch.ones(5))
    assert make_inner("lion").update([torch.tensor([2.0, -3.0])], [make_inner("lion").init(torch.zeros(2))],
                                     [torch.zeros(2)], 1)[0].tolist() == [1.0, -1.0]


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_factored_directions_equal_the_dense_update(shape):
    """The edge's factored direction (W -= lr L R in one GEMM) is the same update as ``update``'s."""
    from lowrank.optim.transforms import Factored

    dense_tf, fact_tf = (LowRank(AdamW(), make_projector("svd", 6), rank=6, scale=0.5) for _ in range(2))
    p = torch.zeros(shape)
    s1, s2 = dense_tf.init(p, 1), fact_tf.init(p, 1)
    for t in (1, 2):
        G = low_rank_plus_noise(*shape, 10, seed=t)
        D = dense_tf.update([G], [s1], [p], t)[0]
        F = fact_tf.directions([G], [s2], [p], t)[0]
        assert isinstance(F, Factored) and F.left.shape[1] == 6 == F.right.shape[0]
        torch.testing.assert_close(F.dense(), D, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("factored", [False, True])
def test_online_pca_projects_back_with_the_basis_it_projected_with(factored):
    """OSD: step t uses Q_t both ways, D = (G Q_t) Q_tᵀ, and only then moves Q to Q_{t+1}
    (the reference runs the PCA step after project_back)."""
    torch.manual_seed(0)
    p = torch.zeros(24, 16)
    tf = LowRank(SGDMomentum(momentum=0.0), make_projector("online_pca", 4), rank=4, update_gap=1, scale=1.0)
    st = tf.init(p)
    tf.update([torch.randn(24, 16)], [st], [p], 1)             # step 1: first basis, then a PCA step
    q1 = st.proj.Q.clone()
    g2 = torch.randn(24, 16)
    run = tf.directions if factored else tf.update
    d = run([g2], [st], [p], 2)[0]
    d = d.dense() if factored else d
    torch.testing.assert_close(d, (g2 @ q1) @ q1.T, atol=1e-6, rtol=0)
    assert not torch.allclose(st.proj.Q, q1)                   # the basis did move for step 3
