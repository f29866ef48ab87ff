"""DenseLoRA: Dense Low-Rank Adaptation of Large Language Models (Mu et al., ACL 2025).

    ΔH = (alpha/r) σ(D (M σ(E x))),   σ = GELU
    E (r, in) encoder, D (out, r) decoder: ONE pair shared by all layers of a kind
    M (r, r): a small dense matrix per layer

As in the reference code, each kind of projection (q, k, v, up, down ...) has its own
encoder/decoder shared across all transformer blocks; here a "kind" is the module's last
name component plus its shape.  E is Kaiming-uniform, D zero (ΔH = 0 at init), M
Kaiming-uniform; all three train.  ``dropout`` applies where the reference applies it: on the
input and after each GELU.  The update is nonlinear in x, so it cannot be merged into W.
Trainable parameters: r² per layer, plus r · (in + out) once per kind.
The shared pair is saved once, under the first layer of its kind.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..registry import register_method


class DenseCodec(nn.Module):
    """The encoder/decoder pair shared by the layers of one kind."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.encoder = nn.Parameter(torch.empty(rank, in_features))  # E (r, in)
        self.decoder = nn.Parameter(torch.zeros(out_features, rank))  # D (out, r)
        nn.init.kaiming_uniform_(self.encoder, a=math.sqrt(5))
        self.claimed = False  # one adapter of the kind saves the pair (a flag, so deepcopy keeps it)


def kind_of(path: str, base: BaseLayer) -> tuple[str, int, int]:
    return (path.rsplit(".", 1)[-1], base.out_features, base.in_features)


@register_method
class DenseLoRA(Adapter):
    name = "denselora"
    paper = "DenseLoRA: Dense Low-Rank Adaptation of Large Language Models (Mu et al., ACL 2025), arXiv:2505.23808"
    formula = "h = W x + (alpha/r) GELU(D M GELU(E x)),  E, D shared by all layers of a kind"
    params_formula = "r^2 per layer + r * (in + out) per kind (shared)"
    mergeable = False
    shared_trainable = True

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        shared: DenseCodec | None = None,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        if shared is None:
            shared = DenseCodec(self.in_features, self.out_features, rank)
        self.saves_codec = not shared.claimed
        shared.claimed = True
        self.lora_codec = shared
        M = torch.empty(rank, rank)
        nn.init.kaiming_uniform_(M, a=math.sqrt(5))
        self.lora_M = nn.Parameter(M)  # (r, r)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        cls.check_rank_fits(base, rank, path)

    @classmethod
    def shared_state(cls, layers: dict[str, BaseLayer], rank: int, **options: Any) -> dict[str, Any]:
        codecs: dict[tuple, DenseCodec] = {}
        out = {}
        for path, b in layers.items():
            k = kind_of(path, b)
            if k not in codecs:
                with torch.device(b.device):
                    codecs[k] = DenseCodec(b.in_features, b.out_features, rank)
            out[path] = codecs[k]
        return out

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    applies_own_dropout = True  # as the reference: on the input and after each GELU

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        c, drop = self.lora_codec, self.dropout
        h = drop(F.gelu(F.linear(drop(x), c.encoder)))  # (..., r)   σ(E x)
        h = drop(F.gelu(F.linear(F.linear(h, self.lora_M), c.decoder)))  # (..., out) σ(D M h)
        return base_out + (self.scaling * h).to(base_out.dtype)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * rank  # per layer; the shared pair adds r (in + out) once per kind

    @classmethod
    def shared_count(cls, in_features: int, out_features: int, rank: int) -> int:
        return rank * (in_features + out_features)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        state = {"lora_M": self.lora_M.detach()}
        if self.saves_codec:
            state["lora_encoder"] = self.lora_codec.encoder.detach()
            state["lora_decoder"] = self.lora_codec.decoder.detach()
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_M.copy_(state["lora_M"])
            if "lora_encoder" in state:
                self.lora_codec.encoder.copy_(state["lora_encoder"])
                self.lora_codec.decoder.copy_(state["lora_decoder"])
