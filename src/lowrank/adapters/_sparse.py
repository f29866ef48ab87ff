"""y = s · B A x + S x for a sparse S with a fixed support: SLTrain's layer as one autograd function.

S is held as its sorted flat indices (row-major) plus values.  The CSR index structures of S
and Sᵀ are derived from the indices once and cached (the support never changes).  With x as
(T, in) rows and dy as (T, out) rows:

    forward    h = x Aᵀ (T, r);   y = s · h Bᵀ + (S xᵀ)ᵀ                       (T, out)
    backward   g = s · dy B (T, r)
               dB = s · dyᵀ h,   dA = gᵀ x                                     low-rank, dense GEMMs
               dx = g A + (Sᵀ dyᵀ)ᵀ                                           (T, in)
               dS_ij = Σ_t dy_ti x_tj  on the support only                     sampled matmul (SDDMM)

Memory scales with nnz, never with out · in: no dense S and no dense weight exist at any point,
and a layer saves for backward what a two-factor layer saves (x, or the same bytes as xᵀ, and h).
Layers that read one input (q/k/v, gate/up) run as one autograd node
(:func:`lowrank_plus_sparse_shared`): one GEMM gives all their A-gradients and one the low-rank
part of their summed input gradient.

Layout is what decides the speed on a CPU: activations are token-major, (T, features).

* Token-major kernels (``_LowRankPlusSparseTokenMajor``, the default on the CPU): numba kernels
  (``_sparse_cpu.py``) add x Sᵀ and dy S straight into the (T, features) GEMM outputs and compute
  the value gradient, each transposing only a tile of tokens inside the cache.  A layer group
  runs as one kernel call on its stacked S = [S_1; ...; S_n] (:func:`stacked`).
* torch's CSR kernels (``_LowRankPlusSparse``: other devices, no numba, or ``token_major=False``):
  CSR @ dense runs as one contiguous axpy per non-zero only when the dense operand is
  (features, T) row-major.  So the low-rank GEMMs write their results in that layout, the sparse
  products accumulate onto them there, and one transposed copy per direction brings the sum back
  (forward: xᵀ in, y out; backward: dyᵀ in, dx out).  Every gradient reaches autograd in the
  ordinary row-major layout (a transposed-layout gradient makes each downstream elementwise
  backward op strided, which costs more than the sparse products).  xᵀ is made once per input
  tensor and saved instead of x; a layer group transposes its summed input gradient once.  The
  other (features, T) intermediates live only inside one call, in a per-thread scratch
  (:func:`release_scratch` frees it).

:func:`lowrank_plus_sparse_dense` is the reference implementation's formulation (Han et al.):
a transient dense W = s · B A + scatter(S) per call, one GEMM on the activations, and the value
gradient gathered from the dense dW = dyᵀ x.  It is kept for the side-by-side benchmark
(``bench/pretrain_params.py``); on this CPU it is the slower of the two (BENCHMARKS.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import warnings
import weakref

import torch

#: numba is there for the token-major CPU kernels (``_sparse_cpu``, imported on first use: it
#: loads LLVM, about 100 MB, which a process that never runs SLTrain should not pay)
_NUMBA = importlib.util.find_spec("numba") is not None

_scratch = threading.local()


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are re-created on the next SLTrain call)."""
    _scratch.__dict__.pop("buffers", None)
    _TRANSPOSED.ref, _TRANSPOSED.xt = None, None


def _workspace(role: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) scratch view for `role`, reused across calls (contents undefined)."""
    store = _scratch.__dict__.setdefault("buffers", {})
    key = (role, like.dtype, like.device)
    buf = store.get(key)
    if buf is None or buf.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor, writable inside and outside inference mode
            buf = torch.empty(rows * cols, dtype=like.dtype, device=like.device)
        store[key] = buf
    return buf[: rows * cols].view(rows, cols)


class SparsePattern:
    """CSR structures of S (out, in) and Sᵀ for a fixed, sorted flat support.

    Index arrays are int32 when the shape allows (what the CPU sparse BLAS takes without a
    per-call conversion); ``flat`` keeps the int64 flat positions.
    """

    def __init__(self, flat_index: torch.Tensor, out_features: int, in_features: int):
        flat = flat_index.to(torch.int64)
        rows = torch.div(flat, in_features, rounding_mode="floor")
        cols = flat - rows * in_features
        dev = flat.device
        itype = torch.int32 if max(out_features, in_features, flat.numel()) < 2**31 - 1 else torch.int64
        self.shape = (out_features, in_features)
        self.flat = flat
        self.crow = torch.zeros(out_features + 1, dtype=torch.int64, device=dev)
        self.crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
        self.crow = self.crow.to(itype)
        self.col = cols.to(itype)
        # Sᵀ: the entries in column-major order; `perm` maps Sᵀ's value order to S's
        self.perm = torch.argsort(cols * out_features + rows)
        self.perm_inv = torch.argsort(self.perm)  # S's value order from Sᵀ's
        self.crow_t = torch.zeros(in_features + 1, dtype=torch.int64, device=dev)
        self.crow_t[1:] = torch.bincount(cols, minlength=in_features).cumsum(0)
        self.crow_t = self.crow_t.to(itype)
        self.col_t = rows[self.perm].to(itype)
        self._stack = None  # (patterns, stacked pattern) of the last group this pattern led
        if dev.type == "cpu":  # numpy views for the token-major CPU kernels
            self.crow_np, self.col_np = self.crow.numpy(), self.col.numpy()
            self.crow_t_np, self.col_t_np = self.crow_t.numpy(), self.col_t.numpy()

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        vt = torch.index_select(values, 0, self.perm)  # Sᵀ's value order
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                self.crow_t, self.col_t, vt, (self.shape[1], self.shape[0]), check_invariants=False
            )


def _scaled_h(x: torch.Tensor, A: torch.Tensor, s: float) -> torch.Tensor:
    """s · x Aᵀ (T, r): the scaling applied on the narrow side, once; saved for dB = dyᵀ (s h)."""
    h = torch.mm(x, A.t())
    return h.mul_(s) if s != 1.0 else h


def _save(ctx, first, params, hs, patterns, scalings) -> None:
    ctx.patterns, ctx.scalings = patterns, scalings
    ctx.save_for_backward(first, *params, *hs)


def _saved(ctx):
    """What both kernels save: (x or xᵀ, [A_i, B_i, v_i, ...], [s_i h_i, ...], patterns, scalings)."""
    first, *rest = ctx.saved_tensors
    n = len(ctx.patterns)
    return first, rest[: 3 * n], rest[3 * n:], ctx.patterns, ctx.scalings


def _low_rank_grads(dys, x_rows, params, hs, scalings, need_params):
    """The low-rank half of both kernels' backward, for n layers on one x.

    dys: each layer's output gradient (T, out_i) or None; x_rows: x as (T, in) (any strides);
    hs: the saved s_i h_i (T, r); need_params: needs_input_grad of (A_i, B_i, v_i), flattened.
    g_i = s_i dy_i B_i of every live layer side by side in one (T, Σr) tensor: one GEMM then
    gives all the A-gradients (gᵀ x) and one the low-rank part of dx (Σ_i g_i A_i, through
    ``a_cat``).  Returns (live layers, contiguous dys, g, a_cat, grads with dA_i and dB_i set).
    """
    live = [i for i, dy in enumerate(dys) if dy is not None]  # outputs that got a gradient
    grads: list[torch.Tensor | None] = [None] * len(need_params)
    if not live:
        return live, {}, None, None, grads
    ranks = [params[3 * i].shape[0] for i in live]
    g = x_rows.new_empty(x_rows.shape[0], sum(ranks))  # (T, Σr)
    dys_c: dict[int, torch.Tensor] = {}
    col = 0
    for i, r in zip(live, ranks):
        B = params[3 * i + 1]
        dy = dys_c[i] = dys[i].contiguous()  # (T, out)
        torch.addmm(g[:, col: col + r], dy, B, beta=0, alpha=scalings[i], out=g[:, col: col + r])  # (T, r)
        col += r
        if need_params[3 * i + 1]:
            grads[3 * i + 1] = torch.mm(dy.t(), hs[i])  # (out, r)  dyᵀ (s h)
    if any(need_params[3 * i] for i in live):
        gA = torch.mm(g.t(), x_rows)  # (Σr, in)  gᵀ x, each layer's rows contiguous
        row = 0
        for i, r in zip(live, ranks):
            if need_params[3 * i]:
                grads[3 * i] = gA[row: row + r]
            row += r
    a_cat = torch.cat([params[3 * i] for i in live]) if len(live) > 1 else params[3 * live[0]]  # (Σr, in)
    return live, dys_c, g, a_cat, grads


class _LowRankPlusSparse(torch.autograd.Function):
    """y_i = s_i · B_i A_i x + S_i x for n layers on one x (T, in): q/k/v or gate/up as one node
    (n = 1 for a layer alone); gradients for x, A_i, B_i and the values in their own layouts.

    Saves xᵀ (in, T) in place of x (the same bytes: the A-gradient reads x as xᵀ's transposed
    view, and the sampled value gradient reads xᵀ's rows), plus each h_i = A_i x.  The input
    gradient of all n layers is summed in the (in, T) layout and transposed once.
    """

    @staticmethod
    def forward(ctx, x, xt, patterns: tuple, scalings: tuple, *params):  # params: A_i (r, in), B_i (out, r), v_i (nnz,)
        n_tok = x.shape[0]
        ys, hs = [], []
        for i, (pattern, s) in enumerate(zip(patterns, scalings)):
            A, B, values = params[3 * i: 3 * i + 3]
            h = _scaled_h(x, A, s)  # (T, r)
            zt = torch.mm(B, h.t(), out=_workspace("out", pattern.shape[0], n_tok, x))  # (out, T)  s B hᵀ
            zt.addmm_(pattern.matrix(values.detach()), xt)  # (out, T)  + S xᵀ
            ys.append(zt.t().contiguous())  # (T, out)
            hs.append(h)
        _save(ctx, xt, params, hs, patterns, scalings)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        xt, params, hs, patterns, scalings = _saved(ctx)
        need = ctx.needs_input_grad  # x, xt, patterns, scalings, then A_i, B_i, v_i
        live, dys_c, g, a_cat, grads = _low_rank_grads(dys, xt.t(), params, hs, scalings, need[4:])
        n_in, n_tok = xt.shape
        gxt = None
        if need[0] and live:
            gxt = torch.mm(a_cat.t(), g.t(), out=_workspace("in", n_in, n_tok, xt))  # (in, T)  Σ_i A_iᵀ g_iᵀ
        for i in live:
            if not (need[0] or need[6 + 3 * i]):
                continue
            pattern, values, dy = patterns[i], params[3 * i + 2].detach(), dys_c[i]
            dyt = _workspace("out", dy.shape[1], n_tok, dy).copy_(dy.t())  # (out, T)  the one transposed copy of dy
            if need[6 + 3 * i]:  # dS on the support: rows of dyᵀ against rows of xᵀ
                grads[3 * i + 2] = torch.sparse.sampled_addmm(pattern.matrix(values), dyt, xt.t(), beta=0.0).values()
            if gxt is not None:
                gxt.addmm_(pattern.matrix_t(values), dyt)  # (in, T)  + S_iᵀ dy_iᵀ
        gx = gxt.t().contiguous() if gxt is not None else None  # (T, in)
        return (gx, None, None, None, *grads)


class _LowRankPlusSparseTokenMajor(torch.autograd.Function):
    """The same n-layer function on the CPU with the token-major kernels of ``_sparse_cpu``:
    no transposed copy of any activation, no scratch; saves x and s_i h_i, like a two-factor
    layer.  Dense products are torch GEMMs written straight in the (T, features) layout; the
    sparse parts of all n layers run as one kernel call on their stacked S (one x tile
    transposed per tile, the group's input gradient summed inside the tile)."""

    @staticmethod
    def forward(ctx, x, patterns: tuple, scalings: tuple, *params):  # params: A_i (r, in), B_i (out, r), v_i (nnz,)
        ys, hs = [], []
        for i, s in enumerate(scalings):
            A, B = params[3 * i: 3 * i + 2]
            h = _scaled_h(x, A, s)  # (T, r)
            ys.append(torch.mm(h, B.t()))  # (T, out_i)  s B A x
            hs.append(h)
        stack = stacked(patterns)
        values = _stacked_values(params, len(patterns))
        _cpu().add_x_st(x.detach().numpy(), stack.crow_np, stack.col_np, values.numpy(), [y.numpy() for y in ys])  # + x S_iᵀ
        _save(ctx, x, params, hs, patterns, scalings)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        x, params, hs, patterns, scalings = _saved(ctx)
        need = ctx.needs_input_grad  # x, patterns, scalings, then A_i, B_i, v_i
        live, dys_c, g, a_cat, grads = _low_rank_grads(dys, x, params, hs, scalings, need[3:])
        gx = torch.mm(g, a_cat) if need[0] and live else None  # (T, in)  Σ_i g_i A_i
        need_v = [need[5 + 3 * i] and i in dys_c for i in range(len(patterns))]
        if gx is None and not any(need_v):
            return (gx, None, None, *grads)
        stack = stacked(patterns)
        vt = torch.index_select(_stacked_values(params, len(patterns)), 0, stack.perm)  # Sᵀ's value order
        gv = _cpu().add_dy_s(
            [(dys_c[i].numpy() if i in dys_c else None, p.shape[0]) for i, p in enumerate(patterns)],
            x.detach().numpy(), stack.crow_t_np, stack.col_t_np, vt.numpy(), None if gx is None else gx.numpy(),
            any(need_v),
        )  # gx += Σ_i dy_i S_i;  gv: dyᵀ x at the stacked support, in Sᵀ's order
        if gv is not None:
            gv = torch.index_select(torch.from_numpy(gv), 0, stack.perm_inv)  # S's order
            parts = gv.split([p.flat.numel() for p in patterns]) if len(patterns) > 1 else (gv,)
            for i, part in enumerate(parts):
                if need_v[i]:
                    grads[3 * i + 2] = part.clone() if len(patterns) > 1 else part  # (nnz_i,)
        return (gx, None, None, *grads)


def stacked(patterns: tuple[SparsePattern, ...]) -> SparsePattern:
    """The patterns of layers that read one x, stacked as the rows of one (Σ out_i, in) pattern
    (built once: kept on the first pattern, for the last group it led)."""
    first = patterns[0]
    if len(patterns) == 1:
        return first
    hit = first._stack
    if hit is not None and len(hit[0]) == len(patterns) and all(a is b for a, b in zip(hit[0], patterns)):
        return hit[1]
    n_in, flats, row = first.shape[1], [], 0
    for p in patterns:
        flats.append(p.flat + row * n_in)  # row-major flat positions shift by whole rows
        row += p.shape[0]
    stack = SparsePattern(torch.cat(flats), row, n_in)
    first._stack = (patterns, stack)
    return stack


def _stacked_values(params, n: int) -> torch.Tensor:
    """The value vectors of n layers in the stacked pattern's order (data only)."""
    values = [params[3 * i + 2].detach() for i in range(n)]
    return torch.cat(values) if n > 1 else values[0]


class _Transposed(threading.local):
    """xᵀ (in, T) of the last input seen, as a tensor of its own (it is saved for backward).

    Layers called one by one on the same tensor (q/k/v, gate/up outside a fused run) get it
    without another copy, and save the same storage; a hit needs the very same tensor object
    (weak reference, so the entry never keeps it alive and is dropped when it dies) at the same
    version (no in-place change since).
    """

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.version = -1
        self.xt: torch.Tensor | None = None

    def get(self, x: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
        if self.ref is not None and self.ref() is x and x._version == self.version:
            return self.xt
        xt = x2d.detach().t().contiguous()  # (in, T)  data only: the node computes its gradients itself
        if x.is_inference():  # no version counter: never reused
            self.ref, self.xt = None, None
        else:
            self.ref, self.version, self.xt = weakref.ref(x, self._drop), x._version, xt
        return xt

    def _drop(self, ref: weakref.ref) -> None:
        if self.ref is ref:
            self.ref, self.xt = None, None


_TRANSPOSED = _Transposed()


class _DenseWeightLowRankPlusSparse(torch.autograd.Function):
    """The reference kernel's formulation: a transient dense W = s · B A + S, one GEMM on x."""

    @staticmethod
    def _weight(A, B, values, pattern: SparsePattern, scaling: float) -> torch.Tensor:
        w = torch.mm(B, A)  # (out, in)  transient
        if scaling != 1.0:
            w.mul_(scaling)
        w.view(-1).index_put_((pattern.flat,), values, accumulate=True)  # + S (scatter of the values)
        return w

    @staticmethod
    def forward(ctx, x, A, B, values, pattern: SparsePattern, scaling: float):
        ctx.pattern, ctx.scaling = pattern, scaling
        ctx.save_for_backward(x, A, B, values)
        return torch.mm(x, _DenseWeightLowRankPlusSparse._weight(A, B, values, pattern, scaling).t())  # (T, out)

    @staticmethod
    def backward(ctx, dy):
        x, A, B, values = ctx.saved_tensors
        pattern, s = ctx.pattern, ctx.scaling
        dy = dy.contiguous()
        gx = gA = gB = gv = None
        if ctx.needs_input_grad[0]:  # W recomputed rather than kept from forward (as the reference)
            gx = torch.mm(dy, _DenseWeightLowRankPlusSparse._weight(A, B, values, pattern, s))  # (T, in)
        gw = torch.mm(dy.t(), x)  # (out, in)  transient dW
        if ctx.needs_input_grad[1]:
            gA = torch.mm(B.t(), gw).mul_(s)  # (r, in)
        if ctx.needs_input_grad[2]:
            gB = torch.mm(gw, A.t()).mul_(s)  # (out, r)
        if ctx.needs_input_grad[3]:
            gv = gw.view(-1).index_select(0, pattern.flat)  # (nnz,)  gather on the support
        return gx, gA, gB, gv, None, None


def lowrank_plus_sparse(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, values: torch.Tensor, pattern: SparsePattern,
    token_major: bool = True,
) -> torch.Tensor:
    """s · B A x + S x for x (..., in) -> (..., out), with sparse kernels (no dense S or W).

    On the CPU the token-major kernels run when numba is installed (``token_major=False`` forces
    torch's CSR kernels on feature-major copies).  torch's CPU CSR kernels take only
    float32/float64: other dtypes on the CPU go through the reference's transient-dense-W kernel
    (same function, one (out, in) temporary per call).
    """
    (y,) = lowrank_plus_sparse_shared(x, [(A, B, scaling, values, pattern)], token_major=token_major)
    return y


def sparse_kernel_supports(x: torch.Tensor) -> bool:
    """The sparse kernels run on x's dtype and device (torch's CPU CSR products: fp32/fp64)."""
    return x.device.type != "cpu" or x.dtype in (torch.float32, torch.float64)


def token_major_available(x: torch.Tensor) -> bool:
    """The token-major CPU kernels can run on x (a CPU fp32/fp64 tensor, numba installed)."""
    return _NUMBA and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _cpu():
    return importlib.import_module("lowrank.adapters._sparse_cpu")


def lowrank_plus_sparse_shared(
    x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, SparsePattern]],
    token_major: bool = True,
) -> list[torch.Tensor]:
    """s_i · B_i A_i x + S_i x for several layers (A_i, B_i, s_i, values_i, pattern_i) that read
    the same x (..., in), as one autograd node (one input gradient for all of them)."""
    if not sparse_kernel_supports(x):
        return [lowrank_plus_sparse_dense(x, A, B, s, v, pat) for A, B, s, v, pat in layers]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])  # (T, in)
    params = [t for A, B, _, v, _ in layers for t in (A, B, v)]
    patterns, scalings = tuple(pat for *_, pat in layers), tuple(float(s) for _, _, s, _, _ in layers)
    if token_major and token_major_available(x):
        _cpu().use_threads(torch.get_num_threads())
        ys = _LowRankPlusSparseTokenMajor.apply(x2d.contiguous(), patterns, scalings, *params)
    else:
        ys = _LowRankPlusSparse.apply(x2d, _TRANSPOSED.get(x, x2d), patterns, scalings, *params)
    return [y.view(*lead, pat.shape[0]) for y, pat in zip(ys, patterns)]


def lowrank_plus_sparse_dense(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, values: torch.Tensor, pattern: SparsePattern
) -> torch.Tensor:
    """The same function through a transient dense weight (the reference implementation's kernel)."""
    lead = x.shape[:-1]
    y = _DenseWeightLowRankPlusSparse.apply(x.reshape(-1, x.shape[-1]), A, B, values, pattern, float(scaling))
    return y.reshape(*lead, pattern.shape[0])


def random_support(out_features: int, in_features: int, nnz: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`nnz` distinct flat positions of an (out, in) matrix, uniformly at random, sorted."""
    total = out_features * in_features
    idx = torch.randperm(total, generator=generator)[:nnz]
    return torch.sort(idx).values
