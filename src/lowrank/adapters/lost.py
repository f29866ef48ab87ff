"""LOST: Low-rank and Sparse pre-Training for large language models (Li et al., 2025), arXiv:2508.02668.

    W₀ = U Σ Vᵀ  (the layer's fresh random init)
    B = U_r Σ_r^½,  A = Σ_r^½ V_rᵀ                       dominant part → low-rank factors
    R = U_{>r} Σ_{>r} V_{>r}ᵀ = W₀ − B A                  the complementary singular values
    c = the ⌈ρ · in⌉ input channels (columns) of R with the largest norms
    S = R[:, c]  (out, k), trainable;  c fixed
    h = B (A x) + S x[..., c] + b

Each layer starts as the best rank-r approximation of its init plus the strongest channels of
what that approximation leaves out, so the whole spectrum of W₀ is split between the two
components rather than the sparse part starting from an independent random draw (SLTrain).
The sparse part is *channel-wise* (whole input columns), so S x is a dense (out, k) matmul on
gathered inputs: no sparse kernel.

Faithfulness note (searched again for issue 5, 2026-11-24): the paper names its code
(github.com/JiaxiLi1/LOST-Low-rank-and-Sparse-Training-for-Large-Language-Models), but neither
that repository nor the paper's method section could be read here: the code index has no file
of it, and the stored arXiv/OpenReview/alphaXiv pages yield only the abstract.  What is
implemented is therefore only what the abstract states -- SVD of the weight, the dominant
singular triplets to the low-rank factors, the remaining singular values to a channel-wise
sparse part -- and NOT verified against the reference.  Unverified choices of this file: the
channel score (column L2 norm of the residual), columns (input channels) rather than rows, no
mixing coefficient between the two parts, and a linear low-rank path.  A second-hand summary
(a third-party research note, not the paper) says LOST also places a nonlinearity inside the
low-rank factorisation, as CoLA does; that could not be checked and is not implemented.

Trainable parameters per layer: r · (in + out) + out · ⌈ρ · in⌉.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import is_finite_real
from ..core.layers import BaseLayer
from ..errors import ConfigError
from ..registry import register_method
from .factorized import FactorizedWeight


def channel_count(in_features: int, sparsity: float) -> int:
    return max(1, math.ceil(sparsity * in_features))


@register_method
class LOST(FactorizedWeight):
    name = "lost"
    paper = "LOST: Low-rank and Sparse Pre-training for Large Language Models (Li et al., 2025), arXiv:2508.02668"
    formula = "h = B A x + S x[c] + b;  B A = top-r SVD of W0, S = strongest channels c of the residual"
    params_formula = "r * (in + out) + out * ceil(rho * in)"
    test_options = {"sparsity": 0.1}

    def __init__(
        self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0, sparsity: float = 0.05
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.sparsity = float(sparsity)
        k = channel_count(self.in_features, self.sparsity)
        self.register_buffer("sparse_channels", torch.zeros(k, dtype=torch.int64))  # (k,) input channels
        self.sparse_value = nn.Parameter(torch.zeros(self.out_features, k))  # (out, k)
        self._split(base.weight)

    @torch.no_grad()
    def _split(self, weight: torch.Tensor) -> None:
        if weight.device.type == "meta":
            return
        w = weight.detach().float()
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        r, s = self.rank, self.scaling
        root = S[:r].sqrt()
        self.lora_B.copy_(U[:, :r] * root / math.sqrt(s))  # s · B A = U_r Σ_r V_rᵀ
        self.lora_A.copy_(root[:, None] * Vh[:r] / math.sqrt(s))
        residual = (U[:, r:] * S[r:]) @ Vh[r:]  # (out, in)  W₀ − U_r Σ_r V_rᵀ
        k = self.sparse_channels.numel()
        channels = residual.norm(dim=0).topk(k).indices.sort().values
        self.sparse_channels.copy_(channels)
        self.sparse_value.copy_(residual[:, channels])

    def forward(self, x: torch.Tensor, base_out: None, base: BaseLayer) -> torch.Tensor:
        y = self.low_rank(x)  # (..., out)  s B A x
        xc = x.index_select(-1, self.sparse_channels)  # (..., k)
        y = y + F.linear(xc, self.sparse_value)  # + S x[c]
        return self.add_bias(y, base)

    def dense_weight(self) -> torch.Tensor:
        w = self.scaling * (self.lora_B @ self.lora_A)
        return w.index_add(1, self.sparse_channels, self.sparse_value)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, sparsity: float = 0.05, **options: Any) -> int:
        return rank * (in_features + out_features) + out_features * channel_count(in_features, sparsity)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, sparsity: float = 0.05, **options: Any) -> None:
        if not is_finite_real(sparsity) or not 0.0 < float(sparsity) < 1.0:
            raise ConfigError(f"lost option 'sparsity' must be in (0, 1), got {sparsity!r} (module {path!r})")
        cls.check_rank(rank, base, path)
