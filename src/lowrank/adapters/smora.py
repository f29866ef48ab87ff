"""SMoRA: Single-ranked Mixture of Experts LoRA (Zhao et al., 2025).

Every rank of a LoRA is an expert: a router scores the r rank-one experts B_{:,i} A_{i,:} per
token, the top-k are activated and mixed with their renormalised scores (as the reference code,
StyxXuan/smora, ``SRMoLELinear.forward``):

    s(x) = sigmoid(W_g x) + β ∈ R^r,   S = top-k of s(x),   g_i = k · s_i / Σ_{j∈S} s_j  (i ∈ S, else 0)
    h = W x + (alpha / k) · B (g ⊙ A x)          (= alpha · B (ĝ ⊙ A x), ĝ summing to one)

Load balancing is by the router bias β, without an auxiliary loss (DeepSeek-V3's loss-free
balancing): after every training forward β_i += γ · sign(mean load − load_i), so under-used
ranks are selected more often; β is a buffer (no gradient) and, as in the reference, it is part
of the selected scores.  :meth:`aux_loss` is therefore None.  Defaults as the reference: γ = 1e-5,
alpha = 16.  A is Kaiming-uniform, B zero, W_g (r, in); router, A and B all read dropout(x).
The update depends on the input: ``merge`` raises MergeError.

Trainable parameters per layer: r · (2 · in + out).
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


@register_method
class SMoRA(Adapter):
    name = "smora"
    paper = "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-task Learning (Zhao et al., 2025), arXiv:2501.15103"
    formula = "h = W x + (alpha/k) B (g(x) * A x),  g = k * top-k of sigmoid(W_g x) + bias, renormalised"
    params_formula = "r * (2 * in + out)"
    mergeable = False
    test_options = {"top_k": 2}

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        top_k: int = 0,
        bias_lr: float = 1e-5,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.top_k = int(top_k) or max(1, rank // 4)
        self.bias_lr = float(bias_lr)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False)  # A (r, in)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False)  # B (out, r)
        self.lora_route = nn.Linear(self.in_features, rank, bias=False)  # W_g (r, in)
        self.register_buffer("expert_bias", torch.zeros(rank))  # β, balancing only (no gradient)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def default_alpha(cls, rank: int) -> float:
        return 16.0  # the reference's lora_alpha

    @property
    def scaling(self) -> float:
        return self.alpha / self.top_k

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, top_k: int = 0, bias_lr: float = 1e-5, **options: Any) -> None:
        if not isinstance(top_k, int) or not 0 <= top_k <= rank:
            raise ConfigError(f"smora option top_k must be an integer in [1, rank={rank}] (0 = rank // 4), got {top_k!r}")
        if not bias_lr >= 0.0:
            raise ConfigError(f"smora option bias_lr must be >= 0, got {bias_lr!r}")
        if rank > min(base.in_features, base.out_features):
            raise ShapeError(f"rank {rank} exceeds the dimensions of {path!r} ({base.out_features}x{base.in_features})")

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, selected): rank gates (..., r), zero off the top-k, summing to k; top-k indices."""
        s = torch.sigmoid(self.lora_route(x)) + self.expert_bias  # (..., r)  scores, balancing bias in them
        top, sel = torch.topk(s, self.top_k, dim=-1)  # (..., k)
        g = torch.zeros_like(s).scatter(-1, sel, top)  # (..., r)
        return g / g.sum(-1, keepdim=True) * self.top_k, sel

    @torch.no_grad()
    def _balance(self, selected: torch.Tensor) -> None:
        load = torch.bincount(selected.reshape(-1), minlength=self.rank).to(self.expert_bias.dtype)
        self.expert_bias.add_(self.bias_lr * torch.sign(load.mean() - load))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        g, sel = self.gates(x)  # (..., r)
        h = F.linear(x, self.lora_A.weight) * g  # (..., r)    g ⊙ A x
        y = F.linear(h, self.lora_B.weight)  # (..., out)
        if self.training and self.bias_lr > 0:
            self._balance(sel)
        return base_out + (self.scaling * y).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        self.check_mergeable()
        raise AssertionError  # unreachable

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * (2 * in_features + out_features)
