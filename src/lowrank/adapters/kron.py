"""Kronecker-product adaptation, as in SoKA: SVD on Kronecker Adaptation (2025).

The update is a sum of r Kronecker products of small factors:

    ΔW = (alpha / r) · Σ_k A_k ⊗ B_k,     A_k ∈ R^{m1×n1}, B_k ∈ R^{m2×n2},  out = m1·m2, in = n1·n2

applied without forming ΔW: with X = x reshaped to (n1, n2) row-major, (A ⊗ B) x = vec(A X Bᵀ),
over chunks of tokens in a custom autograd Function that keeps only x and the factors for
backward (the per-token intermediate X B_kᵀ, r·n1·m2 floats, or A_k X when that association is
cheaper, is recomputed chunk by chunk, in cache).
The factor shape (m1, n1) is an option; by default m1 (n1) is the largest divisor of out (in)
not above its square root, so both factors are about sqrt(out) × sqrt(in).

Initialisation (``factor_init=``): ``"lora"`` draws A_k Kaiming-uniform and sets B_k = 0 (starts at W).
``"kpsvd"`` takes the A_k from the Kronecker-product SVD of W (Van Loan's rearrangement
R(W) = Σ σ_k vec(U_k) vec(V_k)ᵀ, A_k = sqrt(σ_k) U_k), B_k = 0: the principal Kronecker
directions of W, still starting at W.  SoKA's residual form (moving the principal components
out of W into the adapter, as PiSSA does) changes W and belongs to the init axis; it is not done here.

Spectrum-aware rank selection (``rank_selection=``), SoKA's per-layer choice of how many
Kronecker terms to keep.  No reference code was found; this is our reading of the abstract
("an adaptive rank selection algorithm uses energy-threshold and elbow-point criteria to prune
negligible components") applied to the KPSVD spectrum σ_1 >= σ_2 >= ... of R(W):

* ``"energy"``: the smallest k with Σ_{i<=k} σ_i² / Σ_i σ_i² >= ``energy_threshold``;
* ``"elbow"``: the k before the sharpest relative drop of the whole spectrum, argmax_k log(σ_k / σ_{k+1});
* ``"energy_elbow"``: the larger of the two, i.e. a term is pruned only when both criteria
  call it negligible (the elbow alone can cut a slowly decaying spectrum to one term);

always clipped to [1, ``rank``]: ``rank`` is the cap r_max.  The layer then has k terms
(``self.rank`` = k, scaling alpha / k as PEFT's per-module ranks); the tensor shapes (k, m1, n1)
carry it in the saved file, and ``load_adapter`` recomputes the same k from the same base weight
(a base whose spectrum selects another k is refused with the key and both shapes).
``trainable_count(in, out, k)`` is exact with the layer's selected k (a layer's shape alone cannot
give the count: k depends on W's values).  ``"fixed"`` (default) keeps ``rank`` terms.

Trainable parameters per layer: r · (m1·n1 + m2·n2), r = rank or the selected k.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._checks import is_finite_real
from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import ConfigError, ShapeError
from ..registry import register_method
from ._shared import backward_as_forward


def _near_sqrt_divisor(n: int) -> int:
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def factor_shapes(in_features: int, out_features: int, a_rows: int = 0, a_cols: int = 0) -> tuple[int, int, int, int]:
    """(m1, n1, m2, n2): A_k is m1 × n1, B_k is m2 × n2."""
    m1 = a_rows or _near_sqrt_divisor(out_features)
    n1 = a_cols or _near_sqrt_divisor(in_features)
    return m1, n1, out_features // m1, in_features // n1


RANK_SELECTIONS = ("fixed", "energy", "elbow", "energy_elbow")


def select_rank(spectrum: torch.Tensor, cap: int, criterion: str, energy_threshold: float = 0.9) -> int:
    """The number of Kronecker terms to keep from a descending KPSVD spectrum (see the module doc)."""
    if criterion == "fixed":
        return cap
    s = spectrum.double()
    if s.numel() == 0 or s[0] <= 0:
        return 1
    chosen = []
    if criterion in ("energy", "energy_elbow"):
        energy = (s * s).cumsum(0) / (s * s).sum()  # fraction of ||W||_F² in the first k terms
        chosen.append(int((energy < energy_threshold - 1e-12).sum()) + 1)  # smallest k reaching it
    if criterion in ("elbow", "energy_elbow"):
        if s.numel() < 2:
            chosen.append(1)
        else:  # over the whole spectrum (then capped); below 1e-7 σ_1 is fp32 SVD noise, not a drop
            logs = s.clamp_min(s[0] * 1e-7).log()
            chosen.append(int((logs[:-1] - logs[1:]).argmax()) + 1)
    return max(1, min(cap, max(chosen)))


def kron_rearrange(weight: torch.Tensor, m1: int, n1: int) -> torch.Tensor:
    """Van Loan's R(W) (m1·n1, m2·n2): row (i1, j1) holds the block W[i1 block, j1 block] flattened."""
    o, i = weight.shape
    m2, n2 = o // m1, i // n1
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


#: tokens per chunk are chosen so one chunk's (tokens, r, n1, m2) intermediate has about this many
#: elements (2 MiB in fp32): it stays in cache, and nothing of that size is kept for backward
CHUNK_ELEMENTS = 1 << 19


def kron_order(shapes: tuple[int, int, int, int], rank: int) -> tuple[bool, int]:
    """(swap, tokens per chunk) for the cheaper association of Σ_k A_k X B_kᵀ.

    X B_kᵀ first costs r·n1·m2·(n2 + m1) multiply-adds per token; A_k X first (computed as the
    transposed problem Yᵀ = Σ_k B_k Xᵀ A_kᵀ) costs r·n2·m1·(n1 + m2).
    """
    m1, n1, m2, n2 = shapes
    swap = n2 * m1 * (n1 + m2) < n1 * m2 * (n2 + m1)
    inner = rank * (n2 * m1 if swap else n1 * m2)  # the per-token intermediate
    return swap, max(1, CHUNK_ELEMENTS // inner)


def _left(L: torch.Tensor) -> torch.Tensor:
    """L (r, a, p) -> L' (a, p·r) with L'[i, (j, k)] = L_k[i, j]."""
    r, a, p = L.shape
    return L.permute(1, 2, 0).reshape(a, p * r)


class _KronApply(torch.autograd.Function):
    """Y_t = Σ_k A_k X_t B_kᵀ over token chunks; saves only x and the factors, recomputes in backward.

    Autograd through the two einsums would keep the (..., r, n1, m2) intermediate X B_kᵀ of every
    token for backward, r·n1·m2 floats per token (8x the layer's output at the anchor shapes).
    Each chunk computes Z_t = Σ_k L_k V_t R_kᵀ: (L, V, R, Z) = (A, X_t, B, Y_t), or with ``swap``
    (B, X_tᵀ, A, Y_tᵀ), whichever association is cheaper.
    """

    @staticmethod
    def forward(ctx, x, A, B, chunk, swap):  # x (..., n1·n2), A (r, m1, n1), B (r, m2, n2)
        r, m1, n1 = A.shape
        _, m2, n2 = B.shape
        X = x.reshape(-1, n1, n2)  # (T, n1, n2)
        L, R = (B, A) if swap else (A, B)  # L (r, a, p), R (r, b, q)
        Lp, Rt = _left(L), R.reshape(-1, R.shape[2]).T  # (a, p r), (q, r b)
        Y = x.new_empty(X.shape[0], m1, m2)
        for s in range(0, X.shape[0], chunk):
            V = X[s : s + chunk].transpose(1, 2) if swap else X[s : s + chunk]  # (c, p, q)
            c, p, q = V.shape
            VR = (V.reshape(c * p, q) @ Rt).view(c, p * r, -1)  # (t, (j, k), m): V_t R_kᵀ
            if swap:  # Z (c, a, b): Σ_{j,k} L_k[i,j] (V_t R_kᵀ)[j,m]
                Y[s : s + chunk] = torch.matmul(Lp, VR).transpose(1, 2)
            else:
                torch.matmul(Lp, VR, out=Y[s : s + chunk])
        ctx.save_for_backward(x, A, B)
        ctx.chunk, ctx.swap = chunk, swap
        return Y.view(*x.shape[:-1], m1 * m2)

    @staticmethod
    def backward(ctx, gy):
        return backward_as_forward(_KronApply._backward, ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        x, A, B = ctx.saved_tensors
        swap = ctx.swap
        r, m1, n1 = A.shape
        _, m2, n2 = B.shape
        X = x.reshape(-1, n1, n2)
        gY = gy.reshape(-1, m1, m2)  # (T, m1, m2)
        L, R = (B, A) if swap else (A, B)
        Lp, Rf = _left(L), R.reshape(-1, R.shape[2])  # (a, p r), (r b, q)
        dx = torch.empty_like(X)
        dLp, dRf = torch.zeros_like(Lp), torch.zeros_like(Rf)
        for s in range(0, X.shape[0], ctx.chunk):
            V = X[s : s + ctx.chunk].transpose(1, 2) if swap else X[s : s + ctx.chunk]  # (c, p, q)
            G = gY[s : s + ctx.chunk].transpose(1, 2) if swap else gY[s : s + ctx.chunk]  # (c, a, b) = dL/dZ
            c, p, q = V.shape
            V2 = V.reshape(c * p, q)
            VR = (V2 @ Rf.T).view(c, p * r, -1)  # recomputed V_t R_kᵀ
            dVR = torch.matmul(Lp.T, G).view(c * p, -1)  # dL/d(V_t R_kᵀ) = L_kᵀ G_t   (c p, r b)
            if swap:  # Σ_k L_kᵀ G_t R_k
                dx[s : s + ctx.chunk] = (dVR @ Rf).view(c, p, q).transpose(1, 2)
            else:
                torch.mm(dVR, Rf, out=dx[s : s + ctx.chunk].view(c * p, q))
            dRf.addmm_(dVR.T, V2)  # Σ_t (L_kᵀ G_t)ᵀ V_t
            dLp += torch.bmm(G, VR.transpose(1, 2)).sum(0)  # Σ_t G_t (V_t R_kᵀ)ᵀ; no transposed copies
        dL = dLp.view(L.shape[1], L.shape[2], r).permute(2, 0, 1)  # Σ_t G_t (V_t R_kᵀ)ᵀ
        dR = dRf.view(R.shape)
        dA, dB = (dR, dL) if swap else (dL, dR)
        return dx.view(x.shape), dA, dB, None, None


@register_method
class Kron(Adapter):
    name = "kron"
    paper = "Singular Value Decomposition on Kronecker Adaptation for Large Language Model (SoKA, 2025)"
    formula = "h = W x + (alpha/r) sum_k (A_k kron B_k) x,  (A kron B) x = vec(A X B^T)"
    params_formula = "r * (m1*n1 + m2*n2),  A_k m1 x n1, B_k m2 x n2"
    INITS = ("lora", "kpsvd")

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        a_rows: int = 0,
        a_cols: int = 0,
        factor_init: str = "lora",
        rank_selection: str = "fixed",
        energy_threshold: float = 0.9,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        m1, n1, m2, n2 = self.shapes = factor_shapes(self.in_features, self.out_features, a_rows, a_cols)
        U = S = None
        if (factor_init == "kpsvd" or rank_selection != "fixed") and base.weight.device.type != "meta":
            with torch.no_grad():
                R = kron_rearrange(base.weight.float(), m1, n1)  # (m1 n1, m2 n2)
                U, S, _ = torch.linalg.svd(R, full_matrices=False)  # KPSVD: W = Σ σ_k U_k ⊗ V_k
        rank = self.rank = select_rank(S, rank, rank_selection, energy_threshold) if S is not None else rank
        self.kron_A = nn.Parameter(torch.empty(rank, m1, n1))  # A_k
        self.kron_B = nn.Parameter(torch.zeros(rank, m2, n2))  # B_k
        if factor_init == "kpsvd" and U is not None:
            with torch.no_grad():
                self.kron_A.copy_((U[:, :rank] * S[:rank].sqrt()).T.reshape(rank, m1, n1))
        else:
            for k in range(rank):
                nn.init.kaiming_uniform_(self.kron_A.data[k], a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def validate(
        cls, base: BaseLayer, rank: int, path: str, a_rows: int = 0, a_cols: int = 0, factor_init: str = "lora",
        rank_selection: str = "fixed", energy_threshold: float = 0.9, **options: Any
    ) -> None:
        if factor_init not in cls.INITS:
            raise ConfigError(f"kron option factor_init={factor_init!r}: choose one of {cls.INITS}")
        if rank_selection not in RANK_SELECTIONS:
            raise ConfigError(f"kron option rank_selection={rank_selection!r}: choose one of {RANK_SELECTIONS}")
        if not is_finite_real(energy_threshold) \
                or not 0 < energy_threshold <= 1:
            raise ConfigError(f"kron option energy_threshold must be in (0, 1], got {energy_threshold!r}")
        if rank_selection != "fixed" and base.weight.device.type == "meta":
            raise ConfigError(
                f"kron rank_selection={rank_selection!r} needs the values of {path!r}'s weight (it is on 'meta')"
            )
        for k, v in (("a_rows", a_rows), ("a_cols", a_cols)):
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"kron option {k} must be a non-negative integer (0 = automatic), got {v!r}")
        i, o = base.in_features, base.out_features
        if a_rows and o % a_rows:
            raise ShapeError(f"kron a_rows={a_rows} does not divide out={o} of {path!r}: A_k ⊗ B_k must be {o}x{i}")
        if a_cols and i % a_cols:
            raise ShapeError(f"kron a_cols={a_cols} does not divide in={i} of {path!r}: A_k ⊗ B_k must be {o}x{i}")
        m1, n1, m2, n2 = factor_shapes(i, o, a_rows, a_cols)
        if rank > min(m1 * n1, m2 * n2):
            raise ShapeError(
                f"kron rank {rank} exceeds the Kronecker rank {min(m1 * n1, m2 * n2)} of {path!r} "
                f"with factors {m1}x{n1} and {m2}x{n2}"
            )

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        swap, chunk = kron_order(self.shapes, self.kron_A.shape[0])
        with torch.autocast(x.device.type, enabled=False):  # the accumulating backward needs one dtype
            y = _KronApply.apply(x, self.scaling * self.kron_A, self.kron_B, chunk, swap)  # vec(Σ_k A_k X B_kᵀ)
        return base_out + y.to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        m1, n1, m2, n2 = self.shapes
        d = torch.einsum("kij,kml->imjl", self.kron_A, self.kron_B)  # (m1, m2, n1, n2)
        return self.scaling * d.reshape(self.out_features, self.in_features)  # (out, in)

    @classmethod
    def trainable_count(
        cls, in_features: int, out_features: int, rank: int, a_rows: int = 0, a_cols: int = 0, **options: Any
    ) -> int:
        """``rank``: the layer's number of Kronecker terms (with ``rank_selection``, its selected k)."""
        m1, n1, m2, n2 = factor_shapes(in_features, out_features, a_rows, a_cols)
        return rank * (m1 * n1 + m2 * n2)
