"""SLoRA (StructuredLoRA) and its IntTune mode, from "NLoRA: Nyström-Initiated Low-Rank Adaptation
for Large Language Models" (Guo, Chang, Wu, 2025).

    h = W x + s · B N A x,    A ∈ R^{r×in},  N ∈ R^{r×r},  B ∈ R^{out×r}

SLoRA trains all three; with ``int_tune=True`` (IntTune) only the intermediate matrix N trains and
A, B are frozen buffers.  Default init as the reference's ``s_lora``: A and N Kaiming-uniform, B = 0
(identity at step 0); under IntTune B is Kaiming-uniform and N = 0 instead, so that N receives a
gradient.  The paper's NLoRA is this structure with ``init="nlora"`` (Nyström init).
Trainable parameters per layer: r (in + out) + r², or r² under IntTune.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..core.layers import BaseLayer
from ..registry import register_method
from .loraxs import CoreAdapter


@register_method
class SLoRA(CoreAdapter):
    name = "slora"
    paper = "NLoRA: Nyström-Initiated Low-Rank Adaptation for Large Language Models (Guo et al., 2025), arXiv:2502.14482"
    formula = "h = W x + s B N A x  (int_tune: only N trains)"
    params_formula = "r * (in + out) + r * r   (int_tune: r * r)"

    def __init__(
        self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0, int_tune: bool = False
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.int_tune = bool(int_tune)
        a = torch.empty(rank, self.in_features)
        n = torch.empty(rank, rank)
        b = torch.empty(self.out_features, rank)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if self.int_tune:  # frozen A, B: B must be non-zero for N to get a gradient
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            nn.init.zeros_(n)
            self.register_buffer("lora_A", a)
            self.register_buffer("lora_B", b)
        else:
            nn.init.kaiming_uniform_(n, a=math.sqrt(5))
            nn.init.zeros_(b)
            self.lora_A = nn.Parameter(a)
            self.lora_B = nn.Parameter(b)
        self.lora_N = nn.Parameter(n)

    @property
    def core(self) -> torch.Tensor:
        return self.lora_N

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        if options.get("int_tune", False):
            return rank * rank
        return rank * (in_features + out_features) + rank * rank
