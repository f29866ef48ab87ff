"""SingLoRA: Low Rank Adaptation Using a Single Matrix (Bensaïd et al., 2025).

    ΔW = (alpha/r) u(t) A A^T                    (square W: symmetric update)
    ΔW = (alpha/r) u(t) A_{:out} A_{:in}^T       (non-square: A (max(in,out), r), the first
                                                  out / in rows: the paper's truncation A*)
    u(t) = min(t / T, 1)                         (ramp-up over T = ``ramp_up_steps`` steps)

A single trainable A (Kaiming-uniform) replaces LoRA's pair: r · max(in, out) parameters.
The model starts at the base function because u(0) = 0.  t counts the training-mode forward
passes of this adapter, including the current one (so the first training step has u = 1/T and
A gets a gradient; a persistent buffer, saved with A, so training resumes on the ramp);
``set_step`` sets it explicitly (e.g. from the optimizer step).  ``ramp_up_steps=0`` disables
the ramp (u = 1).
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
class SingLoRA(Adapter):
    name = "singlora"
    paper = "SingLoRA: Low Rank Adaptation Using a Single Matrix (Bensaïd et al., 2025), arXiv:2507.05566"
    formula = "h = W x + (alpha/r) u(t) A_{:out} (A_{:in}^T x),  u(t) = min(t/T, 1)"
    params_formula = "r * max(in, out)"
    # The conformance suite perturbs parameters and expects the output to move at once; with the
    # paper's ramp u(0) = 0 it cannot, so it runs with the ramp off (u = 1), where a random A does
    # not start at the base.  identity at init through u(0) = 0 is tested in tests/adapters/test_singlora.py.
    identity_at_init = False
    test_options = {"ramp_up_steps": 0}

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        ramp_up_steps: int = 100,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.ramp_up_steps = int(ramp_up_steps)
        A = torch.empty(max(self.in_features, self.out_features), rank)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.singlora_A = nn.Parameter(A)  # (max(in, out), r)
        self.register_buffer("singlora_step", torch.zeros((), dtype=torch.long))  # t

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def ramp(self) -> float:
        if self.ramp_up_steps <= 0:
            return 1.0
        return min(int(self.singlora_step) / self.ramp_up_steps, 1.0)

    def set_step(self, step: int) -> None:
        self.singlora_step.fill_(int(step))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.singlora_step.add_(1)  # counted first, as the public implementations: step 1 has u = 1/T
        u = self.ramp()
        A = self.singlora_A
        h = F.linear(F.linear(x, A[: self.in_features].t()), A[: self.out_features])  # (..., out)
        return base_out + (self.scaling * u * h).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        A = self.singlora_A
        return (self.scaling * self.ramp()) * (A[: self.out_features] @ A[: self.in_features].t())

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * max(in_features, out_features)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        cls.check_count_option(options, "ramp_up_steps", 100, path)
        if rank > min(base.in_features, base.out_features):
            raise ShapeError(
                f"singlora rank {rank} exceeds min(out, in) of {path!r} ({base.out_features}x{base.in_features}): "
                "the truncated A* would have more columns than rows"
            )
