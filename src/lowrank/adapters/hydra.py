"""Hydra: Multi-head Low-rank Adaptation (Kim et al., 2024).

A parallel low-rank branch on the input plus a sequential low-rank branch on the frozen
layer's output (a learned linear combination of the pre-trained features):

    h = W x + b + s · B_p A_p x + s · B_s A_s (W x + b),   A_p (r, in), B_p (out, r), A_s (r, out), B_s (out, r)

so ΔW = s (B_p A_p + B_s A_s W) depends on W, and the layer still merges exactly:
W' = (I + s B_s A_s) W + s B_p A_p and b' = (I + s B_s A_s) b.  Both B start at zero.  The
sequential branch reads the base layer's whole output, bias included, as the reference code
(extremebird/Hydra) does, so its merge moves the bias too; on bias-free layers (Llama-style)
the paper's h = W x + B_p A_p x + B_s A_s W x is the same thing.  Unmerging inverts
(I + s B_s A_s) with the Woodbury identity (an r × r solve).
``dropout`` applies to the parallel branch's input only (the reference's NLU code has none; its
VTAB code drops each branch's rank-r hidden state).

Trainable parameters per layer: r · (in + out) + 2 · r · out.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import ShapeError
from ..registry import register_method


@register_method
class Hydra(Adapter):
    name = "hydra"
    reads_base_weight = True
    paper = "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning (Kim et al., 2024), arXiv:2309.06922"
    formula = "h = W x + b + (alpha/r) (B_p A_p x + B_s A_s (W x + b))"
    params_formula = "r * (in + out) + 2 * r * out"

    def __init__(self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        o = self.out_features
        self.par_A = nn.Linear(self.in_features, rank, bias=False)  # A_p (r, in)
        self.par_B = nn.Linear(rank, o, bias=False)  # B_p (out, r)
        self.seq_A = nn.Linear(o, rank, bias=False)  # A_s (r, out)
        self.seq_B = nn.Linear(rank, o, bias=False)  # B_s (out, r)
        for a in (self.par_A, self.seq_A):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.par_B.weight)
        nn.init.zeros_(self.seq_B.weight)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        if rank > min(base.in_features, base.out_features):
            raise ShapeError(f"rank {rank} exceeds the dimensions of {path!r} ({base.out_features}x{base.in_features})")

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        y = base_out.to(x.dtype)  # (..., out)  W x + b
        par = F.linear(F.linear(x, self.par_A.weight), self.par_B.weight)  # (..., out)  B_p A_p x
        seq = F.linear(F.linear(y, self.seq_A.weight), self.seq_B.weight)  # (..., out)  B_s A_s (W x + b)
        return base_out + (self.scaling * (par + seq)).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError("hydra's update depends on W: use merge_into(W) - W")

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.scaling
        par = self.par_B.weight @ self.par_A.weight  # (out, in)
        seq = self.seq_B.weight @ (self.seq_A.weight @ weight)  # (out, in)
        return weight + s * (par + seq)

    def merge_bias_into(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.scaling * (self.seq_B.weight @ (self.seq_A.weight @ bias))  # (I + s B_s A_s) b

    def unmerge_from(self, merged: torch.Tensor) -> torch.Tensor:
        # W = (I + s B_s A_s)^{-1} (W' - s B_p A_p)
        rhs = merged.double() - self.scaling * (self.par_B.weight @ self.par_A.weight).double()
        return self._undo_sequential(rhs).to(merged.dtype)

    def unmerge_bias_from(self, merged: torch.Tensor) -> torch.Tensor:
        return self._undo_sequential(merged.double()[:, None])[:, 0].to(merged.dtype)  # (I + s B_s A_s)^{-1} b'

    def _undo_sequential(self, rhs: torch.Tensor) -> torch.Tensor:
        """(I + U V)^{-1} rhs in float64 for rhs (out, k), U = s B_s (out, r), V = A_s (r, out),
        by Woodbury: (I + U V)^{-1} = I - U (I_r + V U)^{-1} V."""
        U, V = (self.scaling * self.seq_B.weight).double(), self.seq_A.weight.double()
        small = torch.eye(self.rank, dtype=torch.float64, device=U.device) + V @ U  # (r, r)
        return rhs - U @ torch.linalg.solve(small, V @ rhs)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * (in_features + out_features) + 2 * rank * out_features
