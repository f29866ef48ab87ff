"""WaRA: Wavelet Low Rank Adaptation (Heidari et al., 2025).

The low-rank factorisation lives in the 2-D wavelet domain of the update; the update itself is
its inverse transform:

    C = B A  (wavelet coefficients, out × in, rank r),   ΔW = (alpha / r) · IDWT2(C) = H_outᵀ C H_in

with H_n the orthonormal Haar analysis matrix of ``levels`` levels (a 2-D separable DWT of a
matrix M is H_out M H_inᵀ; the subband layout is [approximation | details] along each axis).
In activation space ΔW x = IDWT(B A DWT(x)); as the transforms are fixed and orthonormal they
are folded into the factors once per call (A H_in, H_outᵀ B: O(r (in + out))), so the per-token
cost is exactly LoRA's and ΔW is never formed.  A is Kaiming-uniform, B zero.

Only the Haar wavelet is implemented (orthonormal, so the transform pair is exact); both
dimensions must be divisible by 2^levels.

Faithfulness: this follows the paper's (v1) abstract, a low-rank factorisation of the weight
update in the wavelet domain.  The v1 overview figure instead transforms the input embedding
(half-size factors on the subbands), and the v2 paper reshapes patch tokens into a spatial grid
with one shared adapter: those mix neighbouring tokens and cannot be merged into W.  The reference
code was not available to settle it, so neither variant is implemented.

Trainable parameters per layer: r · (in + out).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import ConfigError, ShapeError
from ..registry import register_method

_S = 1.0 / math.sqrt(2.0)


def haar(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Orthonormal multi-level Haar DWT along the last axis: [a_L | d_L | ... | d_1]."""
    n = x.shape[-1]
    out = x
    for _ in range(levels):
        head, tail = out[..., :n], out[..., n:]
        even, odd = head[..., 0::2], head[..., 1::2]
        out = torch.cat([(even + odd) * _S, (even - odd) * _S, tail], dim=-1)
        n //= 2
    return out


def ihaar(y: torch.Tensor, levels: int) -> torch.Tensor:
    """Inverse of :func:`haar` along the last axis."""
    n = y.shape[-1] >> levels
    out = y
    for _ in range(levels):
        a, d, tail = out[..., :n], out[..., n : 2 * n], out[..., 2 * n :]
        head = torch.stack([(a + d) * _S, (a - d) * _S], dim=-1).flatten(-2)  # interleave even/odd
        out = torch.cat([head, tail], dim=-1)
        n *= 2
    return out


@register_method
class WaRA(Adapter):
    name = "wara"
    paper = "WaRA: Wavelet Low Rank Adaptation (Heidari et al., 2025); code github.com/moeinheidari7829/WaRA"
    formula = "h = W x + (alpha/r) IDWT2(B A) x = W x + (alpha/r) H_out^T B A H_in x  (Haar)"
    params_formula = "r * (in + out)"
    WAVELETS = ("haar",)

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        levels: int = 1,
        wavelet: str = "haar",
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.levels = int(levels)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False)  # A (r, in), wavelet domain
        self.lora_B = nn.Linear(rank, self.out_features, bias=False)  # B (out, r), wavelet domain
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def validate(
        cls, base: BaseLayer, rank: int, path: str, levels: int = 1, wavelet: str = "haar", **options: Any
    ) -> None:
        if wavelet not in cls.WAVELETS:
            raise ConfigError(f"wara option wavelet={wavelet!r}: implemented wavelets are {cls.WAVELETS}")
        if not isinstance(levels, int) or levels < 1:
            raise ConfigError(f"wara option levels must be a positive integer, got {levels!r}")
        i, o = base.in_features, base.out_features
        if i % (1 << levels) or o % (1 << levels):
            raise ShapeError(f"wara with levels={levels} needs both dimensions of {path!r} ({o}x{i}) divisible by {1 << levels}")
        if rank > min(i, o):
            raise ShapeError(f"rank {rank} exceeds the dimensions of {path!r} ({o}x{i})")

    def coefficients(self) -> torch.Tensor:
        """The low-rank wavelet-domain update C = (alpha/r) B A (out, in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        # H_outᵀ B A H_in x with the fixed transforms folded into the factors (O(r (in + out)) per
        # call, not per token): A H_in = rows of A inverse-transformed, H_outᵀ B = columns of B
        a = ihaar(self.lora_A.weight, self.levels)  # (r, in)    A H_in
        b = ihaar(self.lora_B.weight.T, self.levels).T  # (out, r)   H_outᵀ B
        y = F.linear(F.linear(x, a), b)  # (..., out)  H_outᵀ B A H_in x
        return base_out + (self.scaling * y).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        c = self.coefficients()  # (out, in)
        return ihaar(ihaar(c, self.levels).T, self.levels).T  # H_outᵀ C H_in

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * (in_features + out_features)
