"""CoLA: Compute-Efficient Pre-Training of LLMs via Low-Rank Activation (Liu et al., 2025), arXiv:2502.10940.

    h = B σ(A x) + b,     A ∈ R^{r×in}, B ∈ R^{out×r},  σ = SiLU by default

Every linear layer becomes a bottleneck with a nonlinearity inside: the low-rank *activation*
is what the paper's name refers to.  Because of σ the layer is no longer linear in x, so it
cannot be merged into a dense weight (``mergeable = False``).

Initialisation as the reference code (``ColaLayer``): A and B both ~ N(0, σ0²) with
σ0 = r^(-1/4) (in + out)^(-1/4), so B A has entries of std (in + out)^(-1/2) (a Xavier-like scale,
independent of the dense layer's own init).
Trainable parameters per layer: r · (in + out).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.layers import BaseLayer
from ..errors import ConfigError
from ..registry import register_method
from .factorized import FullWeight

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}


@register_method
class CoLA(FullWeight):
    name = "cola"
    paper = "CoLA: Compute-Efficient Pre-Training of LLMs via Low-Rank Activation (Liu et al., 2025), arXiv:2502.10940"
    formula = "h = B act(A x) + b"
    params_formula = "r * (in + out)"
    mergeable = False

    def __init__(
        self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0, activation: str = "silu"
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.cola_A = nn.Parameter(torch.empty(rank, self.in_features))  # (r, in)
        self.cola_B = nn.Parameter(torch.empty(self.out_features, rank))  # (out, r)
        std = (rank * (self.in_features + self.out_features)) ** -0.25  # the reference's r^-1/4 (in+out)^-1/4
        with torch.no_grad():
            self.cola_A.normal_(0.0, std)
            self.cola_B.normal_(0.0, std)

    def forward(self, x: torch.Tensor, base_out: None, base: BaseLayer) -> torch.Tensor:
        h = self.act(F.linear(x, self.cola_A))  # (..., r)  σ(A x)
        return self.add_bias(F.linear(h, self.cola_B), base)  # (..., out)

    def check_mergeable(self) -> None:
        from ..errors import MergeError

        raise MergeError(f"method 'cola' cannot be merged: B act(A x) is not a linear map of x (activation {self.activation!r})")

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * (in_features + out_features)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, activation: str = "silu", **options: Any) -> None:
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"cola option 'activation'={activation!r} is unknown (module {path!r}); choose one of {', '.join(ACTIVATIONS)}"
            )
        cls.check_rank(rank, base, path)
