"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024).

    W' = m · (W + s B A) / ||W + s B A||_c        (norm per output channel, one per row of W)
    h  = (m / ||W + s B A||_c) ⊙ (W x + s B A x) + b

As in the paper (Sec. 4.3) the norm is treated as a constant: no gradient flows through it.
Trainable parameters per layer: r · (in + out) + out.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..core.layers import BaseLayer
from ..registry import register_method
from .lora import LoRA


class _DoRALinear(torch.autograd.Function):
    """y = (m / n) ⊙ (W x + s B A x_a) + b with n = ||W + s B A||_c held constant (paper, Sec. 4.3)."""

    @staticmethod
    def forward(ctx, x, xa, weight, bias, A, B, m, norm, s):  # x, xa: (T, in); m, norm: (out,)
        h = xa @ A.t()  # (T, r)
        z = x @ weight.t()  # (T, out)  W x
        z.addmm_(h, B.t(), alpha=s)  # (T, out)  W x + s B A x_a
        mag = m / norm  # (out,)
        y = z * mag if bias is None else torch.addcmul(bias, z, mag)
        ctx.save_for_backward(xa, h, z, weight, A, B, mag, norm)
        ctx.s, ctx.same_input = s, xa is x
        return y

    @staticmethod
    def backward(ctx, g):  # g: (T, out)
        xa, h, z, weight, A, B, mag, norm = ctx.saved_tensors
        s = ctx.s
        gm = None
        if ctx.needs_input_grad[6]:
            gz = torch.mul(g, z)  # (T, out)  g ⊙ z, in the buffer that then holds gz
            gm = gz.sum(0).div_(norm)  # (out,)
            torch.mul(g, mag, out=gz)  # one (T, out) allocation instead of two
        else:
            gz = g * mag  # (T, out)
        gh = (gz @ B).mul_(s)  # (T, r)
        gx = gxa = None
        if ctx.needs_input_grad[0]:
            gx = gz @ weight  # (T, in)
            if ctx.same_input:
                gx.addmm_(gh, A)
        if ctx.needs_input_grad[1] and not ctx.same_input:
            gxa = gh @ A
        gA = gh.t() @ xa if ctx.needs_input_grad[4] else None
        gB = (gz.t() @ h).mul_(s) if ctx.needs_input_grad[5] else None
        return gx, gxa, None, None, gA, gB, gm, None, None


@register_method
class DoRA(LoRA):
    name = "dora"
    reads_base_weight = True
    paper = "DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024), arXiv:2402.09353"
    formula = "h = m / ||W + s B A||_c * (W x + s B A x) + b"
    params_formula = "r * (in + out) + out"

    def __init__(
        self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0, rslora: bool = False
    ):
        self.rslora = bool(rslora)
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(self.out_features))  # m, set by finalize
        self._wnorm_cache: tuple[int, int, torch.Tensor] | None = None
        self._merge_norm: torch.Tensor | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def finalize(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self._column_norm(weight.to(self.compute_dtype)))

    # ||W_i + s (BA)_i||  without forming BA:  |W_i|² + 2s <W_i A^T, B_i> + s² B_i (A A^T) B_i^T
    @torch.no_grad()
    def _column_norm(self, weight: torch.Tensor) -> torch.Tensor:
        A, B, s = self.A, self.B, self.scaling
        w2 = self._weight_sq_norm(weight)  # (out,)
        cross = ((weight @ A.t()) * B).sum(1)  # (out,)
        quad = ((B @ (A @ A.t())) * B).sum(1)  # (out,)
        return (w2 + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def _weight_sq_norm(self, weight: torch.Tensor) -> torch.Tensor:
        # W is frozen: cache |W_i|² until W is written in place (merge, init) or replaced
        key = (id(weight.untyped_storage()) if weight.device.type != "meta" else 0, weight._version)
        if self._wnorm_cache is None or self._wnorm_cache[:2] != key:
            self._wnorm_cache = (*key, weight.pow(2).sum(1))
        return self._wnorm_cache[2]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        weight = base.weight
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        scale = self.lora_magnitude_vector / self._column_norm(weight)  # (out,)  m / ||W + sBA|| (constant norm)
        bias = base.bias
        wx = base_out if bias is None else base_out - bias  # (..., out)  W x
        out = self.lora_out(x, wx.to(x.dtype)) * scale  # (W x + s B A x) * m/||.||
        out = out.to(base_out.dtype)
        return out if bias is None else out + bias

    fuses_base = True

    def forward_fused(self, x: torch.Tensor, xa: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        xa2 = x2 if xa is x else xa.reshape(-1, self.in_features)
        norm = self._column_norm(base.weight)  # (out,), no grad
        y = _DoRALinear.apply(
            x2, xa2, base.weight, base.bias, self.A, self.B, self.lora_magnitude_vector, norm, self.scaling
        )
        return y.view(*lead, self.out_features)

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        norm = self._column_norm(weight)
        self._merge_norm = norm
        return (weight + self.delta_weight()) * (self.lora_magnitude_vector / norm)[:, None]

    def unmerge_from(self, merged: torch.Tensor) -> torch.Tensor:
        assert self._merge_norm is not None, "unmerge without a prior merge"
        weight = merged * (self._merge_norm / self.lora_magnitude_vector)[:, None] - self.delta_weight()
        self._merge_norm = None
        return weight

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * (in_features + out_features) + out_features

    @classmethod
    def peft_config(cls, rank: int, alpha: float, options: dict[str, Any]) -> dict[str, Any] | None:
        cfg = super().peft_config(rank, alpha, options)
        cfg.update(use_dora=True, use_rslora=bool(options.get("rslora", False)))
        return cfg

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        if config.get("peft_type") != "LORA" or not config.get("use_dora") or config.get("lora_bias"):
            return None
        return {"rslora": True} if config.get("use_rslora") else {}
