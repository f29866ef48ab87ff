"""LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy et al., 2024).

    h = W x + s · B R A x,    B ∈ R^{out×r}, A ∈ R^{r×in} frozen (buffers),  R ∈ R^{r×r} trainable

Default init (the paper's): the truncated SVD of W, B = U_r, A = S_r V_r^T, and R = 0, so the
model is unchanged at step 0 (the reference draws R ~ N(0, 1e-5²); zero is the same to fp32 noise
and keeps the output exact).  Trainable parameters per layer: r².  LoRA-SB (``init="lora-sb"``)
replaces B, A, R by its gradient-derived init.

This file also defines the three-factor protocol :class:`CoreAdapter` (update = s · B · core · A,
shared with SLoRA/NLoRA) and :class:`LowRankFactors`, the interface an init may ``require`` to
accept both two-factor (:class:`FactorAdapter`) and three-factor methods.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter, FactorAdapter
from ..core.layers import BaseLayer
from ..errors import ShapeError
from ..registry import register_method


class CoreAdapter(Adapter):
    """An adapter whose update is ``scaling * B @ core @ A``: A (r, in), core (r, r), B (out, r).

    The outer factors are stored as ``lora_A`` and ``lora_B`` (parameters or frozen buffers);
    each method names its core.
    """

    @property
    def A(self) -> torch.Tensor:  # (r, in)
        return self.lora_A

    @property
    def B(self) -> torch.Tensor:  # (out, r)
        return self.lora_B

    @property
    def core(self) -> torch.Tensor:  # (r, r)
        raise NotImplementedError

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        h = F.linear(F.linear(x, self.A), self.core)  # (..., r)  core A x
        delta = F.linear(h, self.B)  # (..., out)
        return base_out + (self.scaling * delta).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.core @ self.A)  # (out, in)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        if rank > min(base.in_features, base.out_features):
            raise ShapeError(f"rank {rank} exceeds the dimensions of {path!r} ({base.out_features}x{base.in_features})")


class LowRankFactors(abc.ABC):
    """Interface marker: A (r, in) and B (out, r), with (CoreAdapter) or without (FactorAdapter) a core."""

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        return issubclass(other, (FactorAdapter, CoreAdapter))


@register_method
class LoRAXS(CoreAdapter):
    name = "lora-xs"
    paper = "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy et al., 2024), arXiv:2405.17604"
    formula = "h = W x + s B R A x  (B = U_r, A = S_r V_r^T frozen; R trainable, 0 at init)"
    params_formula = "r * r"

    def __init__(self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        with torch.no_grad():
            w = base.weight.detach()
            w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
            if w.device.type == "meta":
                u = torch.empty(self.out_features, rank, device="meta")
                a = torch.empty(rank, self.in_features, device="meta")
            else:
                u_full, s, vh = torch.linalg.svd(w, full_matrices=False)
                u, a = u_full[:, :rank], s[:rank, None] * vh[:rank]
        self.register_buffer("lora_A", a.float().contiguous())  # (r, in)  S_r V_r^T, frozen
        self.register_buffer("lora_B", u.float().contiguous())  # (out, r) U_r, frozen
        self.lora_R = nn.Parameter(torch.zeros(rank, rank))  # (r, r) trainable core

    @property
    def core(self) -> torch.Tensor:
        return self.lora_R

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * rank
