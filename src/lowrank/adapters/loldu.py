"""LoLDU: Low-Rank Adaptation via Lower-Diag-Upper decomposition (Shi et al., 2024).

    W = P L D U            (LU with partial pivoting; L unit-lower, U unit-upper, D diagonal)
    W' = W - s0 P L_r diag(z0) U_r + s P L_r diag(z) U_r

Only the diagonal z (r values, initialised to the top-r pivots D_r) trains: r parameters per
layer, as in the reference code (which trains ``vector_z`` only; the paper's figure: the diagonal
is trainable, everything else fixed).  The scalar s is alpha/r with the reference's alpha = 1 by
default; ``train_scale=True`` also trains s (r + 1 parameters).  The reference code moves the
initial principal part out of W; here W stays untouched and the update is the difference,
ΔW = P L_r (s z - s0 z0) U_r, which is the same function (and merges exactly).
P, L_r, U_r are recomputed from W on load; D_r is saved to check the base.
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
from ._shared import check_base


def ldu(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L_r (out, r), D_r (r,), U_r (r, in)) of W = P L D U, in float32."""
    out, inp = weight.shape
    if weight.device.type == "meta":
        return torch.empty(out, rank, device="meta"), torch.empty(rank, device="meta"), torch.empty(rank, inp, device="meta")
    P, L, U = torch.linalg.lu(weight.detach().float())  # P (out,out), L (out,k), U (k,in)
    D = torch.diagonal(U)[:rank].clone()  # (r,)
    safe = torch.where(D == 0, torch.ones_like(D), D)  # a zero pivot (singular W): keep its row as is
    U_r = U[:rank] / safe[:, None]  # unit upper rows
    PL_r = P @ L[:, :rank]  # (out, r): the permutation folded into L
    return PL_r.contiguous(), D, U_r.contiguous()


@register_method
class LoLDU(Adapter):
    name = "loldu"
    paper = "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning (Shi et al., 2024), arXiv:2410.13618"
    formula = "h = W x + P L_r ((s z - s0 z0) ⊙ U_r x)   (W = P L D U; only z (r) trains, s with train_scale)"
    params_formula = "r  (r + 1 with train_scale)"

    def __init__(self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 train_scale: bool = False):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        PL, D, U = ldu(base.weight, rank)
        s0 = self.alpha / rank
        self.register_buffer("loldu_L", PL, persistent=False)  # (out, r) = P L_r
        self.register_buffer("loldu_U", U, persistent=False)  # (r, in)
        self.register_buffer("loldu_z0", D.clone())  # (r,) saved: checks the base on load
        self.register_buffer("loldu_s0", torch.tensor(s0))
        self.loldu_z = nn.Parameter(D.clone())  # z (r,)
        if train_scale:
            self.loldu_scale = nn.Parameter(torch.tensor(s0))  # s ()
        else:
            self.register_buffer("loldu_scale", torch.tensor(s0))  # s (), fixed as in the reference

    @classmethod
    def default_alpha(cls, rank: int) -> float:
        return 1.0  # the reference's lora_alpha = 1: s = 1 / r

    def _coef(self) -> torch.Tensor:
        return self.loldu_scale * self.loldu_z - self.loldu_s0 * self.loldu_z0  # (r,)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        t = F.linear(x, self.loldu_U) * self._coef()  # (..., r)
        return base_out + F.linear(t, self.loldu_L).to(base_out.dtype)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        return (self.loldu_L * self._coef()) @ self.loldu_U

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank + (1 if options.get("train_scale") else 0)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        if rank > min(base.in_features, base.out_features):
            raise ShapeError(
                f"loldu rank {rank} exceeds min(out, in) = {min(base.in_features, base.out_features)} pivots of "
                f"{path!r} ({base.out_features}x{base.in_features})"
            )

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_base(state["loldu_z0"], self.loldu_z0, "LDU pivots", "loldu")
        with torch.no_grad():
            self.loldu_z.copy_(state["loldu_z"])
            self.loldu_scale.copy_(state["loldu_scale"])
