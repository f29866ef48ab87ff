"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021).

    h = W x + (alpha / r) · B A x,    A ∈ R^{r×in} (Kaiming-uniform), B ∈ R^{out×r} (zero)

Trainable parameters per layer: r · (in + out).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter, FactorAdapter
from ..core.layers import BaseLayer
from ..errors import ShapeError
from ..registry import register_method


class _LoRALinear(torch.autograd.Function):
    """Layers y_i = W_i x + b_i + s_i B_i A_i x_a that read one input, in one autograd node.

    One layer is LoRA's fused layer.  Several (q/k/v, gate/up) share the backward's passes over
    x: x-grad = Σ_i s_i (g_i B_i) A_i + Σ_i g_i W_i is formed in one buffer (one GEMM with the
    stacked A, then the base GEMMs accumulate onto it) instead of one per layer summed by
    autograd, and the A-grads of all layers come from one GEMM over x.  The forward computes
    each layer exactly as alone, so outputs do not depend on whether layers ran together.
    Each base GEMM accumulates onto the low-rank term already in its output (beta = 1), so no
    (T, out) or (T, in) tensor is read and written a second time just to add that term.
    """

    @staticmethod
    def forward(ctx, x, xa, scales, *params):  # x, xa: (T, in); per layer W (out, in), b, A (r, in), B (out, r)
        Ws, bs, As, Bs = params[0::4], params[1::4], params[2::4], params[3::4]
        outs, hs = [], []
        for W, b, A, B, s in zip(Ws, bs, As, Bs, scales):
            h = xa @ A.t()  # (T, r)
            sBt = (B if s == 1.0 else B * s).t()  # (r, out), tiny
            y = h @ sBt if b is None else torch.addmm(b, h, sBt)  # (T, out)  s B A x_a + b
            outs.append(y.addmm_(x, W.t()))  # (T, out)  += W x
            hs.append(h)
        ctx.save_for_backward(x, xa, *Ws, *As, *Bs, *hs)
        ctx.scales, ctx.same_input = scales, xa is x
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs):  # g_i: (T, out_i), or None for an output that got no gradient
        x, xa, *rest = ctx.saved_tensors
        n, need, scales = len(gs), ctx.needs_input_grad, ctx.scales
        Ws, As, Bs, hs = rest[:n], rest[n : 2 * n], rest[2 * n : 3 * n], rest[3 * n :]
        grads: list[torch.Tensor | None] = [None] * (4 * n)
        if all(g is None for g in gs):
            return (None, None, None, *grads)
        ranks = [a.shape[0] for a in As]
        A = As[0] if n == 1 else torch.cat(As)  # (R, in), R = Σ r_i
        # GH = [s_1 g_1 B_1 | ... | s_n g_n B_n]  (T, R)
        GH = [hs[0].new_zeros(hs[0].shape[0], r) if g is None else g @ (B if s == 1.0 else B * s)
              for g, B, s, r in zip(gs, Bs, scales, ranks)]
        GH = GH[0] if n == 1 else torch.cat(GH, dim=1)
        gx = gxa = None
        if need[0]:
            gx = GH @ A if ctx.same_input else None  # (T, in)  Σ_i s_i g_i B_i A_i
            for g, W in zip(gs, Ws):
                if g is not None:
                    gx = g @ W if gx is None else gx.addmm_(g, W)  # += Σ_i g_i W_i
        if need[1] and not ctx.same_input:
            gxa = GH @ A
        if any(need[5::4]):
            gA = GH.t() @ xa  # (R, in)  every dA_i = s_i B_i^T g_i^T x_a in one GEMM
            for i, gAi in enumerate(gA.split(ranks)):
                grads[4 * i + 2] = gAi if need[5 + 4 * i] else None
        for i, (g, h, s) in enumerate(zip(gs, hs, scales)):
            if g is None:
                continue
            if need[3 + 4 * i]:  # a base weight or bias left trainable
                grads[4 * i] = g.t() @ x
            if need[4 + 4 * i]:
                grads[4 * i + 1] = g.sum(0)
            if need[6 + 4 * i]:
                gB = g.t() @ h  # (out, r)  s g^T (A x_a)
                grads[4 * i + 3] = gB if s == 1.0 else gB.mul_(s)
        return (gx, gxa, None, *grads)


@register_method
class LoRA(FactorAdapter):
    name = "lora"
    paper = "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021), arXiv:2106.09685"
    formula = "h = W x + (alpha/r) B A x"
    params_formula = "r * (in + out)"

    def __init__(self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        # nn.Linear containers give PEFT's key names: lora_A.weight (r, in), lora_B.weight (out, r)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False)
        self.reset_parameters()

    fuses_base = True
    fuse_group = "lora"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # a subclass that changes the forward no longer computes what the fused kernel computes
        changed = {"forward", "lora_out", "forward_fused"} & set(cls.__dict__)
        if changed and "fuses_base" not in cls.__dict__:
            cls.fuses_base = False
        if changed and "fuse_group" not in cls.__dict__:
            cls.fuse_group = None

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def A(self) -> torch.Tensor:
        return self.lora_A.weight

    @property
    def B(self) -> torch.Tensor:
        return self.lora_B.weight

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        if rank > min(base.in_features, base.out_features):
            raise ShapeError(
                f"rank {rank} exceeds the dimensions of {path!r} ({base.out_features}x{base.in_features})"
            )

    def lora_out(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """base_out + s · B (A x), fused into one addmm over the flattened tokens."""
        h = F.linear(x, self.lora_A.weight)  # (..., r)
        out2d = torch.addmm(
            base_out.reshape(-1, self.out_features),  # (T, out)
            h.reshape(-1, self.rank),  # (T, r)
            self.lora_B.weight.t(),  # (r, out)
            alpha=self.scaling,
        )
        return out2d.view(base_out.shape)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        if base_out.dtype != x.dtype:
            return base_out + self.lora_out(x, base_out.new_zeros(base_out.shape, dtype=x.dtype)).to(base_out.dtype)
        return self.lora_out(x, base_out)

    def forward_fused(self, x: torch.Tensor, xa: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        xa2 = x2 if xa is x else xa.reshape(-1, self.in_features)
        (y,) = _LoRALinear.apply(x2, xa2, (self.scaling,), base.weight, base.bias, self.A, self.B)
        return y.view(*lead, self.out_features)

    @classmethod
    def forward_fused_shared(cls, x: torch.Tensor, members: list[tuple[Adapter, BaseLayer]]) -> list[torch.Tensor]:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        params = [t for a, base in members for t in (base.weight, base.bias, a.A, a.B)]
        ys = _LoRALinear.apply(x2, x2, tuple(a.scaling for a, _ in members), *params)
        return [y.view(*lead, a.out_features) for y, (a, _) in zip(ys, members)]

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)  # (out, in)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * (in_features + out_features)

    # ---- PEFT interop ------------------------------------------------------------------------
    peft_flags: dict[str, Any] = {"use_rslora": False, "use_dora": False}

    @classmethod
    def peft_config(cls, rank: int, alpha: float, options: dict[str, Any]) -> dict[str, Any] | None:
        return {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            **cls.peft_flags,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        if config.get("peft_type") != "LORA" or config.get("lora_bias") or config.get("use_qalora"):
            return None
        flags = {k: bool(config.get(k, False)) for k in cls.peft_flags}
        return {} if flags == cls.peft_flags else None
