"""RandLoRA: full-rank parameter-efficient fine-tuning (Albert et al., ICLR 2025).

    ΔW = (alpha/r) Σ_{i=1..n} B_i Λ_i A Γ_i,     n = ceil(min(in, out) / r)

B_i (max(in,out), r) and A (r, min(in,out)) are frozen random bases (Kaiming-uniform, each
divided by its std), shared by all layers (one set sized for the largest target, sliced per
layer, as in PEFT's implementation by the paper's authors); Λ_i = diag(λ_{:,i}) (r) and
Γ_i = diag(γ_i) (min(in,out)) train.  With n·r >= min(in, out) the sum spans a full-rank
update while training only r·n + n·min(in,out) numbers.  λ = 0 at init (ΔW = 0), γ = 1/max(n, min).

Files use PEFT's layout (``randlora_lambda``/``randlora_gamma``, ``save_projection: false``);
the bases are regenerated from ``seed`` with PEFT's draws (in bf16, as PEFT does).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import AdapterLoadError
from ..registry import register_method
from ._shared import FrozenStore, max_shape


def num_bases(in_features: int, out_features: int, rank: int) -> int:
    return math.ceil(min(in_features, out_features) / rank)


def randlora_bases(rank: int, out_max: int, in_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared A (r, 1, min_dim) and B (max_dim, n, r): PEFT's draws for this seed."""
    max_dim, min_dim = max(out_max, in_max), min(out_max, in_max)
    n = num_bases(in_max, out_max, rank)
    g = torch.Generator(device="cpu").manual_seed(int(seed))

    def draw(shape):  # PEFT draws in bf16 with kaiming_uniform(a=sqrt(5))
        t = torch.empty(shape, dtype=torch.bfloat16)
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)

    A = draw((rank, 1, min_dim))
    B = torch.cat([draw((max_dim, 1, rank)) for _ in range(n)], dim=1)
    return (A / A.std()).float(), (B / B.std()).float()


@register_method
class RandLoRA(Adapter):
    name = "randlora"
    paper = "RandLoRA: Full-rank parameter-efficient fine-tuning of large models (Albert et al., ICLR 2025), arXiv:2502.00987"
    formula = "h = W x + (alpha/r) Σ_i B_i diag(λ_i) A diag(γ_i) x   (B_i, A frozen random; n r >= min(in,out))"
    params_formula = "r * n + n * min(in, out),  n = ceil(min(in, out) / r)"
    test_rank = 8

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        seed: int = 0,
        shared: FrozenStore | None = None,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.seed = int(seed)
        if shared is None:
            A, B = randlora_bases(rank, self.out_features, self.in_features, self.seed)
            shared = FrozenStore(randlora_A=A.to(base.device), randlora_B=B.to(base.device))
        self.randlora_shared = shared
        self.min_dim, self.max_dim = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        self.n = num_bases(self.in_features, self.out_features, rank)
        self.randlora_lambda = nn.Parameter(torch.zeros(rank, self.n))  # λ (r, n)
        self.randlora_gamma = nn.Parameter(torch.full((self.n, self.min_dim), 1.0 / max(self.n, self.min_dim)))  # γ

    @classmethod
    def default_alpha(cls, rank: int) -> float:
        return 20.0 * rank  # the paper's / PEFT's default scale: alpha/r = 20

    @classmethod
    def shared_state(cls, layers: dict[str, BaseLayer], rank: int, **options: Any) -> dict[str, Any]:
        out_max, in_max = max_shape(layers)
        device = next(iter(layers.values())).device
        if device.type == "meta":
            n = num_bases(in_max, out_max, rank)
            A = torch.empty(rank, 1, min(out_max, in_max), device="meta")
            B = torch.empty(max(out_max, in_max), n, rank, device="meta")
        else:
            A, B = randlora_bases(rank, out_max, in_max, options.get("seed", 0))
        store = FrozenStore(randlora_A=A.to(device), randlora_B=B.to(device))
        return {p: store for p in layers}

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first (k, in), second (out, k)) with k = n r:  ΔW = scaling · second @ first."""
        s = self.randlora_shared
        A = s.randlora_A[: self.rank, :, : self.min_dim]  # (r, 1, min)
        B = s.randlora_B[: self.max_dim, : self.n, : self.rank]  # (max, n, r)
        scaled_A = (self.randlora_lambda[:, :, None] * A * self.randlora_gamma[None]).flatten(0, 1)  # (r n, min)
        flat_B = B.flatten(1)  # (max, n r)
        if self.min_dim == self.in_features:
            return scaled_A, flat_B
        return flat_B.t(), scaled_A.t()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        first, second = self._factors()
        h = F.linear(F.linear(x, first), second)  # (..., out)
        return base_out + (self.scaling * h).to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        first, second = self._factors()
        return self.scaling * (second @ first)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        n = num_bases(in_features, out_features, rank)
        return rank * n + n * min(in_features, out_features)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        cls.check_count_option(options, "seed", 0, path)

    # ---- files: PEFT layout ----------------------------------------------------------------------
    # (the shared bases are non-persistent buffers: the default state dict saves only the vectors)
    @classmethod
    def load_shared_state(cls, adapters: list[Adapter], tensors: dict[str, torch.Tensor], where: str) -> None:
        """PEFT files saved with ``save_projection=True`` carry the bases: they must equal ours."""
        if not adapters:
            return
        store = adapters[0].randlora_shared  # type: ignore[attr-defined]
        for name, ours in (("randlora_A", store.randlora_A), ("randlora_B", store.randlora_B)):
            for key in [k for k in tensors if k == f"base_model.{name}" or k.endswith(f".{name}")]:
                saved = tensors.pop(key)
                if tuple(saved.shape) != tuple(ours.shape) or not torch.allclose(saved.float().cpu(), ours.float().cpu(), atol=1e-2):
                    raise AdapterLoadError(
                        f"{where}: saved basis {key!r} differs from the one regenerated from seed "
                        f"{adapters[0].seed}: seed/basis mismatch"  # type: ignore[attr-defined]
                    )

    @classmethod
    def peft_config(cls, rank: int, alpha: float, options: dict[str, Any]) -> dict[str, Any] | None:
        return {
            "peft_type": "RANDLORA",
            "r": rank,
            "randlora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "projection_prng_key": int(options.get("seed", 0)),
            "save_projection": False,
            "sparse": False,
            "very_sparse": False,
            "randlora_dropout": 0.0,
            "init_weights": True,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        if config.get("peft_type") != "RANDLORA":
            return None
        if config.get("sparse") or config.get("very_sparse"):
            raise AdapterLoadError("RandLoRA adapters with sparse bases are not supported; only dense bases")
        # PEFT names the scale randlora_alpha; the loader reads lora_alpha (default: PEFT's 640)
        config.setdefault("lora_alpha", config.get("randlora_alpha", 640))
        return {"seed": int(config.get("projection_prng_key", 0))}
