"""SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining
(Han et al., NeurIPS 2024), arXiv:2406.02214.

    W = s · B A + S,     h = s · B (A x) + S x + b

S has a *random, fixed* support of δ · out · in entries (δ = ``sparsity``); only its values
train.  As in the reference implementation (github.com/andyjm3/SLTrain): A Kaiming-uniform,
B = 0, S values U(-1/√in, 1/√in), support drawn by a random permutation and sorted,
s = alpha / r.  S is stored as sorted flat indices (int64 buffer, saved) plus values (the
trainable parameter).  The default alpha = r gives s = 1; the reference's layer defaults to
lora_alpha = 1 (s = 1/r) and its scripts set other values (16 at r = 256 for the 130M model):
pass ``alpha`` to reproduce a run.

The layer is one autograd function (``_sparse.py``); layers that read one input (q/k/v,
gate/up) run as one.  The reference builds a transient dense W = B A + scatter(S) per call and
runs one GEMM on the activations (its dW = dyᵀ x is gathered at the support for the value
gradient).  Here the low-rank part runs in activation space and S x, dy S and the sampled value
gradient run as sparse kernels, so no dense (out, in) matrix exists in forward or backward.  On
the CPU these are numba kernels that read activations in their own token-major layout
(``_sparse_cpu.py``); torch's CSR kernels (``kernel = "csr"`` on an instance; the fallback
without numba, and on other devices) need feature-major copies of every activation, which cost
more than the products.  All compute the same function; measured side by side in BENCHMARKS.md
(``kernel = "dense"`` selects the reference's).  CPU dtypes without these kernels (bf16, fp16)
fall back to the reference's kernel.

Trainable parameters per layer: r · (in + out) + ⌊δ · in · out⌋.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn

from .._checks import is_finite_real
from ..core.layers import BaseLayer
from ..errors import ConfigError
from ..registry import register_method
from ..core.adapter import Adapter
from ._sparse import (
    SparsePattern,
    lowrank_plus_sparse,
    lowrank_plus_sparse_dense,
    lowrank_plus_sparse_shared,
    random_support,
)
from .factorized import FactorizedWeight

_KERNELS = {
    "sparse": lowrank_plus_sparse,  # token-major CPU kernels where numba is installed, else torch CSR
    "csr": partial(lowrank_plus_sparse, token_major=False),  # torch CSR on feature-major copies
    "dense": lowrank_plus_sparse_dense,  # the reference's transient dense W
}


def sparse_count(in_features: int, out_features: int, sparsity: float) -> int:
    return int(sparsity * in_features * out_features)


@register_method
class SLTrain(FactorizedWeight):
    name = "sltrain"
    paper = "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining (Han et al., NeurIPS 2024), arXiv:2406.02214"
    formula = "h = s B A x + S x + b,  S with a fixed random support of density delta"
    params_formula = "r * (in + out) + floor(delta * in * out)"
    test_options = {"sparsity": 0.1}
    #: implementation only (the same function): "sparse", "csr" (torch's CSR kernels on
    #: feature-major copies) or "dense" (the reference's transient-W kernel); set on an instance
    kernel = "sparse"
    fuses_base = True  # computes the whole layer anyway (replaces_base): forward_fused is forward
    fuse_group = "sltrain"  # q/k/v and gate/up run as one node (shared xᵀ, one transposed dx)

    def __init__(
        self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0, sparsity: float = 0.03
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.sparsity = float(sparsity)
        nnz = sparse_count(self.in_features, self.out_features, self.sparsity)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        index = random_support(self.out_features, self.in_features, nnz).to(self.lora_A.device)
        self.register_buffer("sparse_index", index)  # (nnz,) flat row-major positions, never changes
        bound = 1.0 / math.sqrt(self.in_features)
        self.sparse_value = nn.Parameter(torch.empty(nnz).uniform_(-bound, bound))  # (nnz,)
        self._pattern: tuple[int, int, SparsePattern] | None = None

    @property
    def pattern(self) -> SparsePattern:
        # derived once from the (fixed) support; rebuilt only if the buffer is replaced or loaded
        idx = self.sparse_index
        key = (id(idx), idx._version)
        if self._pattern is None or self._pattern[:2] != key or self._pattern[2].col.device != idx.device:
            self._pattern = (*key, SparsePattern(idx, self.out_features, self.in_features))
        return self._pattern[2]

    def forward(self, x: torch.Tensor, base_out: None, base: BaseLayer) -> torch.Tensor:
        # s B (A x) + S x, one autograd function (no dense S or W with the default kernel)
        y = _KERNELS[self.kernel](x, self.lora_A, self.lora_B, self.scaling, self.sparse_value, self.pattern)
        return self.add_bias(y, base)  # (..., out)

    def forward_fused(self, x: torch.Tensor, xa: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        return self.forward(xa, None, base)

    @classmethod
    def forward_fused_shared(cls, x: torch.Tensor, members: list[tuple[Adapter, BaseLayer]]) -> list[torch.Tensor]:
        kernels = {a.kernel for a, _ in members}
        if len(kernels) > 1 or "dense" in kernels:
            return [a.forward(x, None, base) for a, base in members]
        ys = lowrank_plus_sparse_shared(
            x, [(a.lora_A, a.lora_B, a.scaling, a.sparse_value, a.pattern) for a, _ in members],
            token_major=kernels == {"sparse"},
        )
        return [a.add_bias(y, base) for y, (a, base) in zip(ys, members)]

    def sparse_dense(self) -> torch.Tensor:
        """S as a dense (out, in) matrix (analysis and merging only)."""
        s = torch.zeros(self.out_features * self.in_features, dtype=self.sparse_value.dtype, device=self.sparse_value.device)
        s = s.index_put((self.sparse_index,), self.sparse_value)
        return s.view(self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A) + self.sparse_dense()

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, sparsity: float = 0.03, **options: Any) -> int:
        return rank * (in_features + out_features) + sparse_count(in_features, out_features, sparsity)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, sparsity: float = 0.03, **options: Any) -> None:
        if not is_finite_real(sparsity) or not 0.0 < float(sparsity) < 1.0:
            raise ConfigError(f"sltrain option 'sparsity' must be in (0, 1), got {sparsity!r} (module {path!r})")
        if sparse_count(base.in_features, base.out_features, sparsity) < 1:
            raise ConfigError(
                f"sltrain option 'sparsity'={sparsity} leaves no sparse entry in {path!r} "
                f"({base.out_features}x{base.in_features})"
            )
        cls.check_rank(rank, base, path)
