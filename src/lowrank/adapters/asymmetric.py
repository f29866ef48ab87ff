"""Asymmetric LoRA: train B only, A a frozen random orthogonal projection.

From "Asymmetry in Low-Rank Adapters of Foundation Models" (Zhu et al., ICML 2024): tuning B
matters more than tuning A, and a random (Haar) orthogonal A generalises as well with half
the parameters.

    h = W x + (alpha/r) B A x,   A (r, in) frozen, orthonormal rows;  B (out, r) trainable, 0 at init

Trainable parameters: r · out.  A is a buffer (it never changes), regenerated on load from
``seed`` and the module path (the file holds B and a 1-number fingerprint of A).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import ConfigError, ShapeError
from ..registry import register_method
from ._shared import check_fingerprint, layer_seeds


def random_orthogonal_rows(rank: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(rank, n) with orthonormal rows, uniformly (Haar) distributed: QR of a Gaussian with sign fix."""
    g = torch.randn(n, rank, generator=generator)
    q, r = torch.linalg.qr(g)  # q (n, rank)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.t().contiguous()


class FrozenRandomA(Adapter):
    """An update s · B A with A a frozen random (r, in) drawn from a per-layer seed; B (out, r) trains.

    A is never saved: it is regenerated from the seed, and a fingerprint (its sum) is saved so a
    file made with another seed or layout is refused.  Subclasses draw A (:meth:`register_frozen_A`)
    and may override ``B`` (the effective factor, e.g. LoRI's masked B).
    Trainable parameters per layer: r · out.
    """

    @staticmethod
    def seeded(seed: int, shared: int | None) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(int(shared if shared is not None else seed))

    def register_frozen_A(self, A: torch.Tensor, base: BaseLayer) -> None:
        meta = base.device.type == "meta"
        self.register_buffer("lora_A", torch.empty(A.shape, device="meta") if meta else A.to(base.device),
                             persistent=False)  # (r, in), frozen, from the seed
        self.register_buffer("lora_A_check", torch.zeros(1, device=base.device) if meta
                             else A.double().sum().float().reshape(1).to(base.device))

    @classmethod
    def shared_state(cls, layers: dict[str, BaseLayer], rank: int, **options: Any) -> dict[str, Any]:
        return layer_seeds(layers, options.get("seed", 0))  # a distinct A per layer

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_fingerprint(state["lora_A_check"], self.lora_A_check, self.name)
        with torch.no_grad():
            for key, value in state.items():
                if key != "lora_A_check":
                    getattr(self, key).copy_(value)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def B(self) -> torch.Tensor:  # (out, r)
        return self.lora_B

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        h = F.linear(F.linear(x, self.lora_A), self.B)  # (..., out)
        return base_out + (self.scaling * h).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.lora_A)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * out_features


@register_method
class AsymmetricLoRA(FrozenRandomA):
    name = "asymmetric"
    paper = "Asymmetry in Low-Rank Adapters of Foundation Models (Zhu et al., ICML 2024), arXiv:2402.16842"
    formula = "h = W x + (alpha/r) B A x,  A frozen random orthogonal, only B trains"
    params_formula = "r * out"

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        a_init: str = "orthogonal",
        seed: int = 0,
        shared: int | None = None,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        g = self.seeded(seed, shared)
        if a_init == "orthogonal":
            A = random_orthogonal_rows(rank, self.in_features, g)
        else:  # "gaussian": i.i.d. N(0, 1/r), the paper's other random-A ablation
            A = torch.randn(rank, self.in_features, generator=g) / rank**0.5
        self.register_frozen_A(A, base)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))  # (out, r)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        if options.get("a_init", "orthogonal") not in ("orthogonal", "gaussian"):
            raise ConfigError(f"asymmetric option a_init must be 'orthogonal' or 'gaussian', got {options['a_init']!r}")
        if rank > base.in_features:
            raise ShapeError(
                f"asymmetric rank {rank} exceeds the input width {base.in_features} of {path!r}: "
                "A cannot have that many orthonormal rows"
            )
