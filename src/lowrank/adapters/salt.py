"""SALT: Singular Value Adaptation with Low-Rank Transformation (Elsayed et al., MICCAI 2025).

    W = U Σ V^T  (thin SVD, n = min(in, out) values; top r and the remaining n - r)
    W' = U_r diag(relu(a ⊙ σ_r + b)) V_r^T  +  U_rest (Σ_rest + X Y) V_rest^T

The top r singular values get a trainable scale a (ones) and shift b (zeros); the remaining
subspace gets a LoRA X ((n-r), l), Y (l, (n-r)) inside the spectral domain.  Trainable:
2 r + 2 (n - r) l per layer (``lora_rank`` l, default r).

Choices, documented: the reference code draws X and Y both at N(0, 0.01²), so its model moves
at step 0; here Y = 0 so the adapter starts at the base (the LoRA convention; X ~ N(0, 0.01²)).
The reference applies ReLU to every entry of the re-assembled spectral matrix; here ReLU keeps
the top-r singular values non-negative only (the rest term is a low-rank matrix, not a
spectrum), which is what lets the update run in activation space:
ΔW x = U_r (d ⊙ V_r^T x) + (U_rest X)(Y V_rest^T x),  d = relu(a σ_r + b) - σ_r.
U and V (both complete, ~2x the weight's memory) are recomputed from W on load.

Regulariser: the reference can add  reg_weight · (‖diag(a σ_r + b) − diag(σ_r)‖_F + ‖X Y‖_F)  to the
training loss (its default multiplier 0.01; its released config uses 0).  ``reg_weight`` (default 0)
exposes it through :meth:`aux_loss`; add ``lowrank.aux_loss(model)`` to the loss (``lowrank train``
does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import is_finite_real
from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import ConfigError, ShapeError
from ..registry import register_method
from ._shared import check_base, thin_svd


@register_method
class SALT(Adapter):
    name = "salt"
    paper = "SALT: Singular Value Adaptation with Low-Rank Transformation (Elsayed et al., MICCAI 2025), arXiv:2503.16055"
    formula = "W' = U_r diag(relu(a σ_r + b)) V_r^T + U_rest (Σ_rest + X Y) V_rest^T"
    params_formula = "2 r + 2 (min(in, out) - r) * lora_rank"
    test_options = {"lora_rank": 2}

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        lora_rank: int | None = None,
        reg_weight: float = 0.0,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.reg_weight = float(reg_weight)
        U, S, Vh = thin_svd(base.weight)
        n = S.shape[0]
        self.lora_rank = int(lora_rank) if lora_rank is not None else rank
        self.register_buffer("salt_U", U.contiguous(), persistent=False)  # (out, n)
        self.register_buffer("salt_Vh", Vh.contiguous(), persistent=False)  # (n, in)
        self.register_buffer("salt_sigma0", S[:rank].clone())  # σ_r, saved to check the base
        self.salt_scale = nn.Parameter(torch.ones(rank))  # a (r,)
        self.salt_shift = nn.Parameter(torch.zeros(rank))  # b (r,)
        self.salt_X = nn.Parameter(torch.randn(n - rank, self.lora_rank) * 0.01)  # ((n-r), l)
        self.salt_Y = nn.Parameter(torch.zeros(self.lora_rank, n - rank))  # (l, (n-r))

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.rank
        d = F.relu(self.salt_scale * self.salt_sigma0 + self.salt_shift) - self.salt_sigma0  # (r,)
        P = self.salt_U[:, r:] @ self.salt_X  # (out, l)  U_rest X
        Q = self.salt_Y @ self.salt_Vh[r:]  # (l, in)   Y V_rest^T
        return d, P, Q

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        r = self.rank
        d, P, Q = self._parts()
        top = F.linear(F.linear(x, self.salt_Vh[:r]) * d, self.salt_U[:, :r])  # (..., out)
        rest = F.linear(F.linear(x, Q), P)  # (..., out)
        return base_out + (top + rest).to(base_out.dtype)

    def aux_loss(self) -> torch.Tensor | None:
        if not (self.training and self.reg_weight > 0):
            return None
        shift = self.salt_scale * self.salt_sigma0 + self.salt_shift - self.salt_sigma0  # (r,) diag(aσ+b) − diag(σ)
        sq = ((self.salt_X.T @ self.salt_X) * (self.salt_Y @ self.salt_Y.T)).sum()  # ‖X Y‖_F² = tr(XᵀX · Y Yᵀ)
        pos = sq > 0                    # at X Y = 0 (Y's init) the norm's subgradient 0, not sqrt's inf
        xy = torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
        return self.reg_weight * (shift.norm() + xy)

    def delta_weight(self) -> torch.Tensor:
        r = self.rank
        d, P, Q = self._parts()
        return (self.salt_U[:, :r] * d) @ self.salt_Vh[:r] + P @ Q

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        lr = options.get("lora_rank") or rank
        return 2 * rank + 2 * (min(in_features, out_features) - rank) * lr

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        n = min(base.in_features, base.out_features)
        if rank >= n:
            raise ShapeError(
                f"salt rank {rank} must be below the {n} singular values of {path!r} "
                f"({base.out_features}x{base.in_features}): the remaining subspace would be empty"
            )
        w = options.get("reg_weight", 0.0)
        if not is_finite_real(w) or w < 0:
            raise ConfigError(f"salt option reg_weight must be a finite number >= 0 at {path!r}, got {w!r}")
        lr = options.get("lora_rank")
        if lr is not None and (not isinstance(lr, int) or isinstance(lr, bool) or lr < 1 or lr > n - rank):
            raise ConfigError(f"salt option lora_rank must be an integer in [1, {n - rank}] at {path!r}, got {lr!r}")

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_base(state["salt_sigma0"], self.salt_sigma0, "top singular values", "salt")
        with torch.no_grad():
            for k in ("salt_scale", "salt_shift", "salt_X", "salt_Y"):
                getattr(self, k).copy_(state[k])
