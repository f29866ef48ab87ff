"""Bone: Block Affine Transformation (Kang, 2024; in PEFT as MiSS with ``init_weights="bat"``).

W is cut into b × b blocks W_ij (row block i, column block j).  Bone learns one b × b matrix
B_i per row block and updates every block through the weight itself (the "weight guide"):

    W'_ij = W_ij + W_ij B_i + B_i,      h = W' x + bias

so the update depends on W and is not a low-rank product.  B starts at zero (identity).

Why the forward builds W' here: ΔW x = Σ_j W_ij (B_i x_j) + B_i Σ_j x_j needs every row block
of W applied to a differently transformed copy of x — (out/b) copies, T · in · out / b floats
for T tokens and twice the base FLOPs — while forming W' costs out · in · b FLOPs once per
forward, independent of T (and is what the reference and PEFT do).  So this method replaces the
base layer's matmul (``replaces_base``) with one matmul by W'.

Layout is PEFT's MiSS "bat": one parameter ``miss_block`` of shape (out/b, b, b); ``rank`` is b.
Trainable parameters per layer: out · b.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import ShapeError
from ..registry import register_method


def block_affine(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """W' with W'_ij = W_ij (I + B_i) + B_i;  weight (out, in), blocks (out/b, b, b)."""
    o, i = weight.shape
    b = blocks.shape[-1]
    w = weight.reshape(o // b, b, i // b, b).permute(2, 0, 1, 3)  # (in/b, out/b, b, b)  W_ij at [j, i]
    w = w + w @ blocks + blocks  # W_ij + W_ij B_i + B_i
    return w.permute(1, 2, 0, 3).reshape(o, i)


def block_affine_inverse(merged: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """W from W' = block_affine(W, B):  W_ij = (W'_ij - B_i)(I + B_i)^{-1}."""
    o, i = merged.shape
    b = blocks.shape[-1]
    eye = torch.eye(b, dtype=torch.float64, device=blocks.device)
    inv = torch.linalg.inv(eye + blocks.double())  # (out/b, b, b)
    w = merged.double().reshape(o // b, b, i // b, b).permute(2, 0, 1, 3)
    w = (w - blocks.double()) @ inv
    return w.permute(1, 2, 0, 3).reshape(o, i).to(merged.dtype)


@register_method
class Bone(Adapter):
    name = "bone"
    reads_base_weight = True
    paper = "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large Language Models (Kang, 2024), arXiv:2409.15371"
    formula = "W'_ij = W_ij + W_ij B_i + B_i  (b x b blocks, B_i shared along row block i);  h = W' x + bias"
    params_formula = "out * b   (rank = block size b)"
    replaces_base = True

    def __init__(self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.miss_block = nn.Parameter(torch.zeros(self.out_features // rank, rank, rank))  # B_i (b, b)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        i, o = base.in_features, base.out_features
        if i % rank or o % rank:
            raise ShapeError(f"bone block size (rank) {rank} must divide both dimensions of {path!r} ({o}x{i})")

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None, base: BaseLayer) -> torch.Tensor:
        weight = block_affine(base.weight.to(x.dtype), self.miss_block.to(x.dtype))  # W' (out, in)
        bias = base.bias
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype)).to(base.dtype)

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        return block_affine(weight, self.miss_block.to(weight.dtype))

    def unmerge_from(self, merged: torch.Tensor) -> torch.Tensor:
        return block_affine_inverse(merged, self.miss_block)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError("bone's update depends on W: use merge_into(W) - W")

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return out_features * rank

    # ---- PEFT interop (MiSS, init_weights="bat") ------------------------------------------------
    @classmethod
    def peft_config(cls, rank: int, alpha: float, options: dict[str, Any]) -> dict[str, Any] | None:
        return {"peft_type": "MISS", "r": rank, "init_weights": "bat", "miss_dropout": 0.0}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        if config.get("peft_type") not in ("MISS", "BONE") or config.get("init_weights") != "bat":
            return None
        return {}
