"""LaMDA: fine-tuning via spectrally decomposed low-dimensional adaptation (Azizi et al., EMNLP 2024 Findings).

    h = W x + (alpha/r) B S A x,   A (r, in) frozen ("PMA"),  S (r, r) trainable core,
                                   B (out, r) trainable ("PMB"), frozen after ``freeze_b_steps``

As in the reference code, A is LoRA's Kaiming-uniform A (frozen), S is initialised like an
nn.Linear (Kaiming-uniform) and B is zero (so ΔW = 0 at init).  ``projection_init="svd"`` instead takes
A = V_r^T and B = U_r from W's top-r singular vectors with S = 0 (the "spectral" variant).
The paper freezes PMB gradually early in training.  t counts this adapter's training-mode
forward passes (a saved buffer; ``set_step`` sets it); ``freeze_b_steps`` = T (0 never freezes):

* ``freeze_b="columns"`` (default, the reference code's schedule): from step t on, the first
  ⌊t / T⌋ columns of B get no gradient (the reference zeroes them; an optimizer's momentum may
  still move them, as there), and at t = r·T the whole B is frozen;
* ``freeze_b="all"``: B trains for T steps, then all of it is frozen.

Frozen means requires_grad off and its gradient dropped, so optimizers skip it.  The reference
sets T to 0.3 × the run's total steps.  Trainable parameters at the start: r · out + r²; after
freezing: r².
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
from ._shared import thin_svd


@register_method
class LaMDA(Adapter):
    name = "lamda"
    paper = "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation (Azizi et al., 2024), arXiv:2406.12832"
    formula = "h = W x + (alpha/r) B S A x,  A frozen, S (r, r) trainable, B trainable then frozen"
    params_formula = "r * out + r^2  (r^2 once B is frozen)"

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        freeze_b_steps: int = 100,
        freeze_b: str = "columns",
        projection_init: str = "lora",
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.freeze_b_steps, self.freeze_b = int(freeze_b_steps), freeze_b
        A = torch.empty(rank, self.in_features)
        S = torch.empty(rank, rank)
        B = torch.zeros(self.out_features, rank)
        if projection_init == "svd":
            U, _, Vh = thin_svd(base.weight)
            A, B, S = Vh[:rank].clone(), U[:, :rank].clone(), torch.zeros(rank, rank)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(S, a=math.sqrt(5))
        self.register_buffer("lamda_A", A.to(base.device))  # (r, in) frozen
        self.lamda_S = nn.Parameter(S)  # (r, r)
        self.lamda_B = nn.Parameter(B)  # (out, r)
        self.register_buffer("lamda_step", torch.zeros((), dtype=torch.long))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def set_step(self, step: int) -> None:
        self.lamda_step.fill_(int(step))
        self._maybe_freeze()

    def _maybe_freeze(self) -> None:
        whole = self.freeze_b_steps * (self.rank if self.freeze_b == "columns" else 1)
        if self.freeze_b_steps > 0 and int(self.lamda_step) >= whole and self.lamda_B.requires_grad:
            self.lamda_B.requires_grad_(False)
            self.lamda_B.grad = None

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        B = self.lamda_B  # (out, r)
        if self.training and torch.is_grad_enabled():
            self._maybe_freeze()
            if self.freeze_b == "columns" and self.freeze_b_steps > 0 and B.requires_grad:
                k = int(self.lamda_step) // self.freeze_b_steps  # columns frozen so far (< r here)
                if k:  # same values; the first k columns pass no gradient
                    B = torch.cat([B[:, :k].detach(), B[:, k:]], dim=1)
            self.lamda_step.add_(1)
        h = F.linear(F.linear(F.linear(x, self.lamda_A), self.lamda_S), B)  # (..., out)
        return base_out + (self.scaling * h).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lamda_B @ self.lamda_S @ self.lamda_A)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * out_features + rank * rank

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        cls.check_count_option(options, "freeze_b_steps", 100, path)
        if options.get("freeze_b", "columns") not in ("columns", "all"):
            raise ConfigError(f"lamda option freeze_b must be 'columns' or 'all', got {options.get('freeze_b')!r}")
        if options.get("projection_init", "lora") not in ("lora", "svd"):
            raise ConfigError(f"lamda option projection_init must be 'lora' or 'svd', got {options.get('projection_init')!r}")
        if rank > min(base.in_features, base.out_features):
            raise ShapeError(f"lamda rank {rank} exceeds min(out, in) of {path!r} ({base.out_features}x{base.in_features})")
