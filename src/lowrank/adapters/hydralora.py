"""HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning (Tian et al., NeurIPS 2024).

One shared down-projection A and N up-projection heads B_1..B_N mixed per token by a softmax
router on the input:

    ω(x) = softmax(W_g x) ∈ Δ^N,      h = W x + (alpha / r) · Σ_i ω_i(x) B_i A x

A is Kaiming-uniform, every B_i zero (starts at W), W_g (N, in) like a Linear layer.  With
``dropout``, the heads read dropout(x) and the router the clean x, as in the reference code.  The
update depends on the input, so the layer cannot be merged (``merge`` raises MergeError).

Load balancing: the paper trains the router with the task loss only (``balance_weight=0``,
the default).  With ``balance_weight > 0`` the adapter also exposes the Switch-Transformer
balancing term  w · N · Σ_i f_i P_i  (f_i: share of tokens whose top head is i, P_i: mean router
probability of head i; differentiable through P) via :meth:`aux_loss`; add
``lowrank.aux_loss(model)`` to the training loss.

Trainable parameters per layer: r · in + N · r · out + N · in.
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


def switch_balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """N · Σ_i f_i P_i over tokens: probs (T, N) router probabilities (rows sum to one)."""
    n = probs.shape[-1]
    top = F.one_hot(probs.argmax(-1), n).to(probs.dtype)  # (T, N), no gradient
    return n * (top.mean(0) * probs.mean(0)).sum()


@register_method
class HydraLoRA(Adapter):
    name = "hydralora"
    paper = "HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning (Tian et al., NeurIPS 2024), arXiv:2404.19245"
    formula = "h = W x + (alpha/r) sum_i softmax(W_g x)_i B_i A x   (shared A, N heads B_i)"
    params_formula = "r * in + N * r * out + N * in"
    mergeable = False
    test_options = {"n_heads": 3, "balance_weight": 0.01}

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        n_heads: int = 3,
        balance_weight: float = 0.0,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.n_heads, self.balance_weight = int(n_heads), float(balance_weight)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False)  # A (r, in), shared
        self.lora_B = nn.Parameter(torch.zeros(n_heads, self.out_features, rank))  # B_i (out, r)
        self.lora_route = nn.Linear(self.in_features, n_heads, bias=False)  # W_g (N, in)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        self._aux: torch.Tensor | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def validate(
        cls, base: BaseLayer, rank: int, path: str, n_heads: int = 3, balance_weight: float = 0.0, **options: Any
    ) -> None:
        if not isinstance(n_heads, int) or n_heads < 1:
            raise ConfigError(f"hydralora option n_heads must be a positive integer, got {n_heads!r}")
        if not balance_weight >= 0.0:
            raise ConfigError(f"hydralora option balance_weight must be >= 0, got {balance_weight!r}")
        if rank > min(base.in_features, base.out_features):
            raise ShapeError(f"rank {rank} exceeds the dimensions of {path!r} ({base.out_features}x{base.in_features})")

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights ω(x) (..., N); each row sums to one."""
        return torch.softmax(self.lora_route(x), dim=-1)

    applies_own_dropout = True  # the router reads the clean input, the heads the dropped-out one

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        w = self.route(x)  # (..., N)
        h = F.linear(self.dropout(x), self.lora_A.weight)  # (..., r)       A dropout(x)
        heads = torch.einsum("...r,nor->...no", h, self.lora_B)  # (..., N, out)  B_i A x
        y = torch.einsum("...n,...no->...o", w, heads)  # (..., out)     Σ ω_i B_i A x
        if self.training and self.balance_weight > 0:
            self._aux = self.balance_weight * switch_balance_loss(w.reshape(-1, self.n_heads))
        else:
            self._aux = None
        return base_out + (self.scaling * y).to(base_out.dtype)

    def aux_loss(self) -> torch.Tensor | None:
        return self._aux

    def delta_weight(self) -> torch.Tensor:
        self.check_mergeable()
        raise AssertionError  # unreachable

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, n_heads: int = 3, **options: Any) -> int:
        return rank * in_features + n_heads * rank * out_features + n_heads * in_features
