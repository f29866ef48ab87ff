"""Full-weight parameterisations for pretraining: lowrank, SLTrain, LOST, CoLA (issue 5).

The conformance suite covers save/load, gradients and counts; here: each paper's defining
property, the pretraining helper, and bad input.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowrank
from functools import partial

from lowrank.adapters._sparse import (
    SparsePattern,
    lowrank_plus_sparse,
    lowrank_plus_sparse_dense,
    lowrank_plus_sparse_shared,
    release_scratch,
    token_major_available,
)
from lowrank.adapters.factorized import parameterise, plain_state_dict
from conftest import tiny_llama


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def _adapters(model, name="default"):
    return [(p, layer.adapters[name]) for p, layer in lowrank.adapted_layers(model)]


def _train(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for s in range(steps):
        ids = _ids(s)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


# ---- SLTrain ------------------------------------------------------------------------------------------
def test_sltrain_support_is_fixed_and_only_values_train():
    model = tiny_llama()
    parameterise(model, "sltrain", rank=4, sparsity=0.1)
    before = {p: (a.sparse_index.clone(), a.sparse_value.detach().clone()) for p, a in _adapters(model)}
    _train(model, steps=3)
    for p, a in _adapters(model):
        idx0, val0 = before[p]
        assert torch.equal(a.sparse_index, idx0), f"{p}: the sparse support moved"
        assert not torch.equal(a.sparse_value, val0), f"{p}: sparse values did not train"
        assert not a.sparse_index.requires_grad
        dense = a.dense_weight() - a.scaling * (a.B @ a.A)
        off = torch.ones(dense.numel(), dtype=torch.bool)
        off[a.sparse_index] = False
        assert dense.flatten()[off].abs().max() == 0, f"{p}: S has entries off its support"


def test_sltrain_holds_indices_plus_values_only():
    model = tiny_llama()
    lowrank.adapt(model, "sltrain", rank=4, sparsity=0.05)
    for p, a in _adapters(model):
        n_in, n_out = a.in_features, a.out_features
        nnz = int(0.05 * n_in * n_out)
        state = a.state_dict()
        assert set(state) == {"lora_A", "lora_B", "sparse_index", "sparse_value"}
        assert state["sparse_index"].shape == (nnz,) and state["sparse_value"].shape == (nnz,)
        assert not state["sparse_index"].is_floating_point()
        # nothing the size of the dense matrix is held anywhere in the module (cached CSR structures
        # included): every tensor scales with nnz, r or the layer widths, never with in x out
        held = list(a.parameters()) + list(a.buffers())
        pat = a.pattern
        held += [pat.crow, pat.col, pat.perm, pat.crow_t, pat.col_t]
        for t in held:
            assert t.numel() <= max(nnz, 4 * (n_in + n_out) + 1, n_out * 4, n_in * 4), f"{p}: a tensor of {t.numel()}"


def _dense_reference(x, A, B, s, values, flat, n_out, n_in):
    S = torch.zeros(n_out * n_in, dtype=values.dtype).index_put((flat,), values).view(n_out, n_in)
    return x @ (s * B @ A + S).t()


_csr = partial(lowrank_plus_sparse, token_major=False)


@pytest.mark.parametrize("kernel", [lowrank_plus_sparse, _csr, lowrank_plus_sparse_dense], ids=["sparse", "csr", "dense"])
def test_sltrain_kernels_match_dense_reference_in_value_and_gradients(kernel):
    torch.manual_seed(0)
    n_out, n_in, r, nnz = 24, 40, 3, 90
    flat = torch.randperm(n_out * n_in)[:nnz].sort().values
    pat = SparsePattern(flat, n_out, n_in)
    leaves = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
              for shape in [(2, 5, n_in), (r, n_in), (n_out, r), (nnz,)]]
    x, A, B, values = leaves
    h = x * 1.5  # a non-leaf input, read by two layers (the shared-input path) then changed in place
    y = kernel(h, A, B, 0.5, values, pat) + kernel(h, A, B, 0.5, values, pat).sin()
    ref = _dense_reference(h, A, B, 0.5, values, flat, n_out, n_in)
    ref = ref + ref.sin()
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, gy, retain_graph=True)
    want = torch.autograd.grad(ref, leaves, gy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with torch.no_grad():  # an input modified in place since the last call is not mistaken for the old one
        h2 = x * 1.5
        first = kernel(h2, A, B, 0.5, values, pat)
        h2.mul_(-2.0)
        torch.testing.assert_close(kernel(h2, A, B, 0.5, values, pat), -2.0 * first)
    release_scratch()  # scratch first made (and grown) under inference mode stays usable for training
    with torch.inference_mode():
        big = torch.randn(3, 7, n_in, dtype=torch.float64)
        torch.testing.assert_close(kernel(big, A, B, 0.5, values, pat),
                                   _dense_reference(big, A, B, 0.5, values, flat, n_out, n_in))
    kernel(x * 1.0, A, B, 0.5, values, pat).sum().backward()
    assert values.grad is not None


def test_token_major_kernels_are_the_default_on_cpu():
    x = torch.randn(3, 8)
    assert token_major_available(x)  # numba is a dependency: the test suite must run the fast path
    assert not token_major_available(x.to(torch.bfloat16))


@pytest.mark.parametrize("token_major", [True, False], ids=["token-major", "csr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sltrain_layer_group_matches_dense_reference(token_major, dtype):
    """Three layers on one input as one node (q/k/v): outputs equal each layer alone, gradients
    match the dense reference, an output left out of the loss contributes nothing.  131 tokens
    and widths that are not multiples of 8 reach the kernels' partial tiles and blocks."""
    torch.manual_seed(1)
    n_in, r = 21, 3
    widths, nnzs, scales = [13, 24, 9], [40, 90, 20], [0.5, 1.0, 2.0]
    pats = [SparsePattern(torch.randperm(o * n_in)[:k].sort().values, o, n_in) for o, k in zip(widths, nnzs)]
    x = torch.randn(131, n_in, dtype=dtype, requires_grad=True)
    params = [[torch.randn(*shape, dtype=dtype, requires_grad=True) for shape in [(r, n_in), (o, r), (k,)]]
              for o, k in zip(widths, nnzs)]
    layers = [(A, B, s, v, p) for (A, B, v), s, p in zip(params, scales, pats)]
    ys = lowrank_plus_sparse_shared(x, layers, token_major=token_major)
    for y, layer in zip(ys, layers):  # forward: the same bits as the layer computed alone
        assert torch.equal(y, lowrank_plus_sparse(x, *layer[:2], layer[2], layer[3], layer[4], token_major=token_major))
    refs = [_dense_reference(x, A, B, s, v, p.flat, *p.shape) for A, B, s, v, p in layers]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    for y, ref in zip(ys, refs):
        torch.testing.assert_close(y, ref, **tol)
    gys = [torch.randn_like(y) for y in ys]
    leaves = [x] + [t for group in params[:2] for t in group]
    loss = (ys[0] * gys[0]).sum() + (ys[1] * gys[1]).sum()  # the third output is unused
    ref_loss = (refs[0] * gys[0]).sum() + (refs[1] * gys[1]).sum()
    got = torch.autograd.grad(loss, leaves + params[2], allow_unused=True)
    want = torch.autograd.grad(ref_loss, leaves + params[2], allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("trainable", ["x", "values"], ids=["frozen-values", "input-without-grad"])
def test_sltrain_group_backward_with_only_some_gradients_needed(trainable):
    """The backward kernel's two other paths: the input gradient without the value gradient
    (frozen values) and the value gradient without the input gradient (x needs none)."""
    torch.manual_seed(3)
    n_in, r = 24, 3
    pats = [SparsePattern(torch.randperm(o * n_in)[:k].sort().values, o, n_in) for o, k in [(16, 50), (40, 120)]]
    x = torch.randn(131, n_in, requires_grad=trainable == "x")
    params = [(torch.randn(r, n_in), torch.randn(p.shape[0], r), torch.randn(p.flat.numel(), requires_grad=trainable == "values"))
              for p in pats]
    layers = [(A, B, 0.5, v, p) for (A, B, v), p in zip(params, pats)]
    leaves = [x] if trainable == "x" else [v for *_, v in params]
    ys = lowrank_plus_sparse_shared(x, layers)
    refs = [_dense_reference(x, A, B, 0.5, v, p.flat, *p.shape) for (A, B, v), p in zip(params, pats)]
    gys = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, leaves, gys)
    want = torch.autograd.grad(refs, leaves, gys)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_token_major_kernels_give_the_same_bits_on_any_thread_count():
    """Each tile owns its outputs and the value gradient's partial sums are reduced in a fixed
    order, so one thread and two give identical results (300 tokens: two whole tiles, one partial)."""
    torch.manual_seed(2)
    n_in, r = 40, 4
    pats = [SparsePattern(torch.randperm(o * n_in)[:k].sort().values, o, n_in) for o, k in [(48, 150), (16, 60)]]
    x = torch.randn(300, n_in, requires_grad=True)
    params = [[torch.randn(*shape, requires_grad=True) for shape in [(r, n_in), (p.shape[0], r), (p.flat.numel(),)]]
              for p in pats]
    layers = [(A, B, 0.5, v, p) for (A, B, v), p in zip(params, pats)]
    leaves = [x] + [t for group in params for t in group]
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ys = lowrank_plus_sparse_shared(x, layers)
            grads = torch.autograd.grad(sum((y * y).sum() for y in ys), leaves)
            results.append([*ys, *grads])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_sltrain_layer_group_runs_as_one_node_in_a_model():
    """In a Llama, q/k/v and gate/up share one autograd node each (learnt from the call order),
    with the same outputs as the layers computed alone and gradients equal up to rounding."""
    from lowrank.core import shared_input

    model = tiny_llama()
    parameterise(model, "sltrain", rank=4, sparsity=0.1)
    ids = _ids()
    shared_input.learn(model, input_ids=ids)
    out = model(input_ids=ids, labels=ids)
    names = set()
    stack, seen = [out.loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add((type(fn).__name__, len(fn.next_functions)))
        stack.extend(f for f, _ in fn.next_functions)
    # tensor inputs: x, then (A, B, values) per layer: 3 layers for q/k/v, 2 for gate/up
    assert ("_LowRankPlusSparseTokenMajorBackward", 1 + 3 * 3) in names, names
    assert ("_LowRankPlusSparseTokenMajorBackward", 1 + 2 * 3) in names, names
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    alone = tiny_llama()
    parameterise(alone, "sltrain", rank=4, sparsity=0.1)
    alone.load_state_dict(model.state_dict())
    for m in alone.modules():
        if hasattr(m, "sparse_value"):
            m.kernel = "csr"  # a different kernel class: no layer joins a group with another
            m.fuse_group = None
    out_alone = alone(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_alone.logits, out.logits, rtol=1e-5, atol=1e-5)
    out_alone.loss.backward()
    for n, p in alone.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_sltrain_runs_in_bfloat16_on_cpu():
    model = tiny_llama()
    parameterise(model, "sltrain", rank=4, sparsity=0.1)
    model.to(torch.bfloat16)  # CPU CSR kernels have no bf16: the dense-W kernel computes the same function
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    _, a = _adapters(model)[0]
    assert a.sparse_value.grad is not None and a.sparse_value.grad.dtype == torch.bfloat16


def test_released_base_weights_stay_released_through_model_to():
    from lowrank.core.layers import is_released

    model = tiny_llama()
    parameterise(model, "lowrank", rank=4)
    layers = [layer for _, layer in lowrank.adapted_layers(model)]
    assert all(is_released(layer.base_layer.weight) for layer in layers)
    ids = _ids()
    before = model(input_ids=ids).logits
    model.to(torch.float64)
    for layer in layers:
        w = layer.base_layer.weight
        assert is_released(w) and w.dtype == torch.float64 and w.shape == layer.base.weight.shape
    torch.testing.assert_close(model(input_ids=ids).logits, before.double(), rtol=1e-5, atol=1e-5)
    for fails_on in (2, 0):                 # a failing conversion (of a weight, of the scalar) leaves it in place
        with pytest.raises(RuntimeError):
            model._apply(lambda t: (_ for _ in ()).throw(RuntimeError("boom")) if t.dim() == fails_on else t)
        assert all(is_released(layer.base_layer.weight) for layer in layers)


# ---- LOST -------------------------------------------------------------------------------------------------
def test_lost_splits_the_init_spectrum():
    model = tiny_llama()
    W0 = {p: m.weight.detach().clone() for p, m in model.named_modules() if isinstance(m, nn.Linear) and p != "lm_head"}
    lowrank.adapt(model, "lost", rank=4, sparsity=0.25)
    for p, a in _adapters(model):
        w0 = W0[p]
        S = torch.linalg.svdvals(w0)
        lr = a.scaling * (a.B @ a.A)
        # the low-rank part is the best rank-r approximation of the init (Eckart-Young)
        err = (w0 - lr).norm() ** 2
        torch.testing.assert_close(err, (S[4:] ** 2).sum(), rtol=1e-4, atol=1e-5)
        # on the selected channels the layer equals its init; those are the residual's strongest ones
        w = a.dense_weight()
        c = a.sparse_channels
        torch.testing.assert_close(w[:, c], w0[:, c], rtol=0, atol=1e-5)
        res_norm = (w0 - lr).norm(dim=0)
        others = torch.ones(a.in_features, dtype=torch.bool)
        others[c] = False
        assert res_norm[c].min() >= res_norm[others].max() - 1e-6


# ---- CoLA / lowrank ---------------------------------------------------------------------------------------
def test_cola_is_a_nonlinear_bottleneck_and_lowrank_has_rank_r():
    model = tiny_llama()
    lowrank.adapt(model, "cola", rank=3)
    path, a = _adapters(model)[0]
    layer = model.get_submodule(path)
    x = torch.randn(4, a.in_features)
    with torch.no_grad():
        y1, y2 = layer(x), layer(2 * x)
    assert not torch.allclose(y2, 2 * y1, atol=1e-4), "CoLA's activation must make the layer nonlinear"
    with pytest.raises(lowrank.MergeError):
        lowrank.merge(model)

    model = tiny_llama()
    lowrank.adapt(model, "lowrank", rank=3)
    for _, a in _adapters(model):
        assert torch.linalg.matrix_rank(a.dense_weight()) == 3


def test_cola_init_is_the_reference_scale():
    """A, B ~ N(0, r^-1/2 (in + out)^-1/2): B A has entries of std (in + out)^-1/2 (ColaLayer)."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(256, 384, bias=False))
    lowrank.adapt(layer, "cola", rank=64)
    a = layer[0].adapters["default"]
    std = (64 * (256 + 384)) ** -0.25
    for t in (a.cola_A, a.cola_B):
        assert abs(t.std().item() / std - 1) < 0.02 and abs(t.mean().item()) < 5 * std / t.numel() ** 0.5
    assert abs((a.cola_B @ a.cola_A).std().item() * (256 + 384) ** 0.5 - 1) < 0.03


# ---- the pretraining helper ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lowrank", "sltrain", "lost"])
def test_parameterise_trains_everything_else_frees_dense_and_saves_plain(method):
    model = tiny_llama()
    dense_bytes = sum(m.weight.numel() for p, m in model.named_modules() if isinstance(m, nn.Linear) and p != "lm_head")
    parameterise(model, method, rank=4)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names and "model.norm.weight" in names
    assert not any(n.endswith("base_layer.weight") for n in names)
    for _, layer in lowrank.adapted_layers(model):
        assert layer.base_layer.weight.untyped_storage().nbytes() <= 8  # freed: a zero-stride view
    held = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert held < sum(p.numel() for p in tiny_llama().parameters())
    assert dense_bytes > 0
    _train(model, steps=2)
    ids = _ids(9)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    fresh = tiny_llama(seed=5)
    fresh.load_state_dict(plain_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, out, atol=1e-5, rtol=0)


def test_plain_state_dict_of_stacked_updates_matches_the_forward():
    """Each live update is taken against W0 and added, as in forward (DoRA's update depends on W0)."""
    model = tiny_llama()
    lowrank.adapt(model, "lora", rank=2)
    lowrank.adapt(model, "dora", rank=2, name="second")
    lowrank.set_active(model, ["default", "second"])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, p in lowrank.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        ids = _ids(3)
        out = model(input_ids=ids).logits
    fresh = tiny_llama(seed=5)
    fresh.load_state_dict(plain_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, out, atol=1e-5, rtol=0)


# ---- bad input -------------------------------------------------------------------------------------------
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "method,opts,err",
    [
        ("sltrain", {"sparsity": 0.0}, lowrank.ConfigError),
        ("sltrain", {"sparsity": 1.0}, lowrank.ConfigError),
        ("sltrain", {"sparsity": -0.1}, lowrank.ConfigError),
        ("sltrain", {"sparsity": 1e-6}, lowrank.ConfigError),  # no entry left in a 32x32 layer
        ("lost", {"sparsity": 1.5}, lowrank.ConfigError),
        ("cola", {"activation": "softmax"}, lowrank.ConfigError),
        ("sltrain", {"rank": 33}, lowrank.ShapeError),
        ("lowrank", {"rank": 0}, lowrank.ConfigError),
    ],
)
def test_bad_options_raise_and_leave_model_unchanged(method, opts, err):
    model = tiny_llama()
    before = _snapshot(model)
    opts = dict(opts)
    rank = opts.pop("rank", 4)
    with pytest.raises(err) as e:
        lowrank.adapt(model, method, rank=rank, **opts)
    msg = str(e.value)
    assert any(k in msg for k in ("sparsity", "activation", "rank")), msg
    assert not any(isinstance(m, lowrank.AdaptedLayer) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_parameterise_refuses_an_update_method():
    with pytest.raises(lowrank.ConfigError, match="lora"):
        parameterise(tiny_llama(), "lora", rank=4)
