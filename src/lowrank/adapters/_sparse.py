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
and a layer saves for backward exactly what a two-factor layer saves (x and h).

Layout is what makes this fast on a CPU.  torch's CSR @ dense runs as one contiguous axpy per
non-zero only when the dense operand is (features, T) row-major, while activations are
(T, features).  So: the low-rank GEMMs write their results in the (features, T) layout, the
sparse products accumulate onto them there, and one transposed copy per direction brings the
sum back (forward: xᵀ in, y out; backward: dyᵀ in, dx out).  Every gradient reaches autograd in
the ordinary row-major layout (a transposed-layout gradient makes each downstream elementwise
backward op strided, which costs more than the sparse products).  xᵀ is made once per input
tensor shared by several layers (q/k/v, gate/up), in forward and again in backward (weak
references + version counters tell that it is the same, unmodified tensor); the SDDMM reads it
row-major.  These (features, T) intermediates live only inside one call, in a per-thread scratch
reused by every layer (at most four blocks of the widest layer's width x T, independent of
depth; :func:`release_scratch` frees it).

:func:`lowrank_plus_sparse_dense` is the reference implementation's formulation (Han et al.):
a transient dense W = s · B A + scatter(S) per call, one GEMM on the activations, and the value
gradient gathered from the dense dW = dyᵀ x.  It is kept for the side-by-side benchmark
(``bench/pretrain_params.py``); on this CPU it is the slower of the two (BENCHMARKS.md).
"""

from __future__ import annotations

import threading
import warnings
import weakref

import torch

_scratch = threading.local()


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are re-created on the next SLTrain call)."""
    _scratch.__dict__.pop("buffers", None)
    for cache in (_FORWARD_T, _BACKWARD_T):
        cache.ref, cache.xt = None, None


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
        self.crow_t = torch.zeros(in_features + 1, dtype=torch.int64, device=dev)
        self.crow_t[1:] = torch.bincount(cols, minlength=in_features).cumsum(0)
        self.crow_t = self.crow_t.to(itype)
        self.col_t = rows[self.perm].to(itype)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        vt = torch.index_select(values, 0, self.perm)
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, vt, (self.shape[1], self.shape[0]), check_invariants=False)


class _LowRankPlusSparse(torch.autograd.Function):
    """s · B A x + S x on x (T, in), gradients for x, A, B and the values in their own layouts.

    Saves only what a plain two-factor layer saves (x and h = A x): xᵀ is rebuilt in scratch
    in backward (once per input shared by several layers) rather than kept.
    """

    @staticmethod
    def forward(ctx, x, A, B, values, pattern: SparsePattern, scaling: float):
        n_out, n_tok = pattern.shape[0], x.shape[0]
        xt = _FORWARD_T.get(x)  # (in, T) scratch
        h = torch.mm(x, A.t())  # (T, r)
        zt = torch.mm(B, h.t(), out=_workspace("out", n_out, n_tok, x))  # (out, T)  B hᵀ
        if scaling != 1.0:
            zt.mul_(scaling)
        zt.addmm_(pattern.matrix(values), xt)  # (out, T)  + S xᵀ
        ctx.pattern, ctx.scaling = pattern, scaling
        ctx.save_for_backward(x, A, B, values, h)
        return zt.t().contiguous()  # (T, out)

    @staticmethod
    def backward(ctx, dy):
        x, A, B, values, h = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        s = ctx.scaling
        need_x, need_A, need_B, need_v = ctx.needs_input_grad[:4]
        dy = dy.contiguous()  # (T, out)
        n_tok, n_in = x.shape
        gx = gA = gB = gv = None
        g = torch.mm(dy, B)  # (T, r)
        if s != 1.0:
            g.mul_(s)
        if need_B:
            gB = torch.mm(dy.t(), h)  # (out, r)
            if s != 1.0:
                gB.mul_(s)
        if need_A:
            gA = torch.mm(g.t(), x)  # (r, in)
        if need_x or need_v:
            dyt = _workspace("out", dy.shape[1], n_tok, dy).copy_(dy.t())  # (out, T)  the one transposed copy of dy
            if need_v:  # dS on the support: rows of dyᵀ against rows of xᵀ
                xt = _BACKWARD_T.get(x)  # (in, T) scratch
                st = pattern.matrix(values.detach())
                gv = torch.sparse.sampled_addmm(st, dyt, xt.t(), beta=0.0).values()  # (nnz,) in S's order
            if need_x:
                gxt = torch.mm(A.t(), g.t(), out=_workspace("in", n_in, n_tok, dy))  # (in, T)  Aᵀ gᵀ
                gxt.addmm_(pattern.matrix_t(values.detach()), dyt)  # + Sᵀ dyᵀ
                gx = gxt.t().contiguous()  # (T, in)
        return gx, gA, gB, gv, None, None


class _Transposed(threading.local):
    """xᵀ (in, T) of the last 2-D input seen, in a scratch buffer of its own role.

    The layers that read the same tensor (q/k/v, gate/up) get it without another copy; a hit
    needs the very same tensor object (weak reference, so the entry never keeps it alive and
    is dropped when it dies) at the same version (no in-place change since).
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self.ref: weakref.ref | None = None
        self.version = -1
        self.xt: torch.Tensor | None = None

    def get(self, x: torch.Tensor) -> torch.Tensor:
        if self.ref is not None and self.ref() is x and x._version == self.version:
            return self.xt
        xt = _workspace(self.role, x.shape[1], x.shape[0], x).copy_(x.t())
        if x.is_inference():  # no version counter: never reused
            self.ref, self.xt = None, None
        else:
            self.ref, self.version, self.xt = weakref.ref(x, self._drop), x._version, xt
        return xt

    def _drop(self, ref: weakref.ref) -> None:
        if self.ref is ref:
            self.ref, self.xt = None, None


class _Inputs2d(threading.local):
    """The same (T, in) view object for every layer called on one input tensor, so that the
    layers sharing it also share the saved tensor (and, in backward, its transposed scratch)."""

    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.version = -1
        self.x2d: torch.Tensor | None = None

    def get(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_inference():
            return x.reshape(-1, x.shape[-1])
        if self.ref is not None and self.ref() is x and x._version == self.version:
            return self.x2d
        x2d = x.reshape(-1, x.shape[-1])
        self.ref, self.version, self.x2d = weakref.ref(x, self._drop), x._version, x2d
        return x2d

    def _drop(self, ref: weakref.ref) -> None:
        if self.ref is ref:
            self.ref, self.x2d = None, None


_FORWARD_T = _Transposed("xf")
_BACKWARD_T = _Transposed("xb")
_INPUTS = _Inputs2d()


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
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, values: torch.Tensor, pattern: SparsePattern
) -> torch.Tensor:
    """s · B A x + S x for x (..., in) -> (..., out), with sparse kernels (no dense S or W).

    torch's CPU CSR kernels take only float32/float64: other dtypes on the CPU go through the
    reference's transient-dense-W kernel (same function, one (out, in) temporary per call).
    """
    if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
        return lowrank_plus_sparse_dense(x, A, B, scaling, values, pattern)
    lead = x.shape[:-1]
    x2d = _INPUTS.get(x) if x.dim() != 2 else x  # (T, in), one object per input tensor
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        y = _LowRankPlusSparse.apply(x2d, A, B, values, pattern, float(scaling))
    return y.reshape(*lead, pattern.shape[0])


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
