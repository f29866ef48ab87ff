"""FlyLoRA: implicit rank-wise mixture of experts (Zou et al., NeurIPS 2025).

Inspired by the fly olfactory circuit: a *frozen* sparse random projection A both projects and
routes.  Each row of A has p = max(1, ⌊ρ·in⌋) non-zeros drawn from N(0, 1/r²) (ρ = k/r by default;
rounded down as the reference's ``flylora.py``); the top-k rank components by magnitude are active
per token, and only their columns of B are used:

    y = A x,   S = top-k of |y + d|,   h = W x + (alpha / r) · B (1_S ⊙ y)

Only B (out × r, zero at init) trains.  Load balancing is bias-based with no router loss: after
every training forward d_i += γ · sign(mean load − load_i) (the reference's update), so
:meth:`aux_loss` is None.  The update depends on the input: ``merge`` raises MergeError.
A and d are saved with the adapter (buffers), so a loaded adapter routes identically.
The default alpha is 2r, as in the reference.  This follows the repository's minimal
``flylora.py``; its PEFT-based experiment code differs (top-k of the signed A x + d, the bias also
updated in eval mode, in // (r/k) non-zeros per row whatever the density).

Trainable parameters per layer: out · r.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import ConfigError
from ..registry import register_method


@register_method
class FlyLoRA(Adapter):
    name = "flylora"
    paper = "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via Implicit Rank-Wise Mixture-of-Experts (Zou et al., NeurIPS 2025); code github.com/gfyddha/FlyLoRA"
    formula = "h = W x + (alpha/r) B (1_topk(|A x + d|) * A x),  A frozen sparse random"
    params_formula = "out * r"
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
        density: float = 0.0,
        bias_lr: float = 1e-3,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.top_k = k = int(top_k) or max(1, rank // 4)
        self.bias_lr = float(bias_lr)
        rho = float(density) or k / rank
        p = max(1, int(rho * self.in_features))  # non-zeros per row of A (rounded down, as the reference)
        A = torch.zeros(rank, self.in_features)
        cols = torch.rand(rank, self.in_features).argsort(dim=-1)[:, :p]  # p random columns per row
        A.scatter_(1, cols, torch.randn(rank, p) / rank)
        self.register_buffer("fly_A", A)  # (r, in), frozen
        self.register_buffer("expert_bias", torch.zeros(rank))  # d, balancing only
        self.lora_B = nn.Linear(rank, self.out_features, bias=False)  # B (out, r), trainable
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def default_alpha(cls, rank: int) -> float:
        return 2.0 * rank

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def validate(
        cls, base: BaseLayer, rank: int, path: str, top_k: int = 0, density: float = 0.0, bias_lr: float = 1e-3,
        **options: Any,
    ) -> None:
        cls.check_rank_fits(base, rank, path)
        if not isinstance(top_k, int) or not 0 <= top_k <= rank:
            raise ConfigError(f"flylora option top_k must be an integer in [1, rank={rank}] (0 = rank // 4), got {top_k!r}")
        if not 0.0 <= density <= 1.0:
            raise ConfigError(f"flylora option density must be in (0, 1] (0 = top_k / rank), got {density!r}")
        if not bias_lr >= 0.0:
            raise ConfigError(f"flylora option bias_lr must be >= 0, got {bias_lr!r}")

    def select(self, y: torch.Tensor) -> torch.Tensor:
        """Indices (..., k) of the active rank components for projections y (..., r)."""
        return torch.topk((y + self.expert_bias).abs(), self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        y = F.linear(x, self.fly_A.to(x.dtype))  # (..., r)   A x  (implicit router)
        sel = self.select(y.detach())  # (..., k)
        mask = torch.zeros_like(y).scatter_(-1, sel, 1.0)
        out = F.linear(y * mask, self.lora_B.weight)  # (..., out)
        if self.training and self.bias_lr > 0:
            with torch.no_grad():
                load = torch.bincount(sel.reshape(-1), minlength=self.rank).to(self.expert_bias.dtype)
                self.expert_bias.add_(self.bias_lr * torch.sign(load.mean() - load))
        return base_out + (self.scaling * out).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        self.check_mergeable()
        raise AssertionError  # unreachable

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return out_features * rank
