"""LoRA-Pro: Are Low-Rank Adapters Properly Optimized? (Wang, Liang, He, Wang, Tan; ICLR 2025), arXiv:2407.18242.

With W = W0 + s B A, a LoRA step moves W along the *equivalent gradient*
    g̃ = s (B g_A + g_B A),       g_A = s Bᵀ G,  g_B = s G Aᵀ,  G = ∂L/∂W
LoRA-Pro replaces (g_A, g_B) by the pair whose g̃ is closest to G in Frobenius norm:
    g_A' = (1/s²) (BᵀB)⁻¹ g_A + X A
    g_B' = (1/s²) [I - B (BᵀB)⁻¹ Bᵀ] g_B (AAᵀ)⁻¹ - B X
for which s (B g_A' + g_B' A) = P_B G + (I - P_B) G P_A, the orthogonal projection of G onto
{B M + N A}, whatever X.  X is then chosen (Sylvester equation, ``x_mode="sylvester"``)
    BᵀB X + X AAᵀ = -(1/s²) (BᵀB)⁻¹ g_A Aᵀ
which makes (g_A', g_B') the closest such pair to the plain (g_A, g_B).

AdamW (``mode="full"``, the paper's Algorithm): Adam moments are kept for the equivalent
gradient g̃ itself, an (out, in) matrix per layer (the paper's memory trade-off); the Adam
direction U = m̂ / (√v̂ + ε) is pulled back to the factors as g_A = s BᵀU, g_B = s U Aᵀ and
adjusted as above, so the applied ΔW is the projection of the full-weight AdamW direction.
``mode="efficient"`` is the reference repository's low-memory variant: adjusted gradients fed
to an ordinary AdamW on A and B (moments of size r(in + out)).

Layers of equal shape are processed as one batch for the r x r algebra (Gram inverses,
eigendecompositions for the Sylvester solve); the (out, in) Adam work runs layer by layer.

Weight decay: the reference also decays the frozen W0; here only the adapter decays
(A and B each by √(1 - lr·λ), so s B A decays by (1 - lr·λ)) — W0 stays frozen.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._common import AdapterOptimizer, adamw_state_bytes, check_hparams, factor_pairs, gram_inv, other_trainables
from ...errors import ConfigError

X_MODES = ("sylvester", "symmetry", "zero")


def solve_sylvester_psd(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C for symmetric PSD (..., r, r) P, Q (eigendecompositions, float64)."""
    lp, U = torch.linalg.eigh(P.double())
    lq, V = torch.linalg.eigh(Q.double())
    denom = lp[..., :, None] + lq[..., None, :]  # (..., r, r)
    F = U.mT @ C.double() @ V
    tiny = torch.finfo(torch.float64).eps * max(float(denom.abs().max()), 1.0)
    ok = denom.abs() > tiny
    Y = torch.where(ok, F / denom.where(ok, torch.ones_like(denom)), 0.0)
    return (U @ Y @ V.mT).to(C.dtype)


@torch.no_grad()
def lora_pro_adjust(
    A: torch.Tensor,
    B: torch.Tensor,
    g_A: torch.Tensor,
    g_B: torch.Tensor,
    s: float,
    x_mode: str = "sylvester",
    damping: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted factor gradients (g_A', g_B') for A (r, in), B (out, r).

    Also batched: A (k, r, in), B (k, out, r) and their gradients, one scaling s for all.
    """
    BtB = B.mT @ B  # (r, r)
    AAt = A @ A.mT  # (r, r)
    BtB_inv = gram_inv(BtB, damping)
    AAt_inv = gram_inv(AAt, damping)
    gA0 = BtB_inv @ g_A / s**2  # (r, in)
    gB0 = (g_B - B @ (BtB_inv @ (B.mT @ g_B))) @ AAt_inv / s**2  # (out, r)
    if x_mode == "sylvester":
        X = solve_sylvester_psd(BtB, AAt, -(BtB_inv @ g_A @ A.mT) / s**2)
    elif x_mode == "symmetry":
        X = -0.5 * (BtB_inv @ B.mT @ g_B @ AAt) / s**2
    elif x_mode == "zero":
        return gA0, gB0
    else:  # pragma: no cover - validated by the optimizer
        raise ConfigError(f"lora_pro: x_mode must be one of {X_MODES}, got {x_mode!r}")
    return gA0 + X @ A, gB0 - B @ X


@torch.no_grad()
def equivalent_gradient(A, B, g_A, g_B, s: float) -> torch.Tensor:
    """s (B g_A + g_B A): the full-weight direction a factor step (g_A, g_B) moves W along."""
    return torch.matmul(B, g_A).add_(torch.matmul(g_B, A)).mul_(s)  # (..., out, in)


class LoRAPro(AdapterOptimizer):
    who = "lora_pro"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        *,
        mode: str = "full",
        x_mode: str = "sylvester",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        damping: float = 1e-8,
        nonfinite: str = "skip",
    ):
        check_hparams(self.who, lr, betas, eps, weight_decay)
        if mode not in ("full", "efficient"):
            raise ConfigError(f"lora_pro: mode must be 'full' or 'efficient', got {mode!r}")
        if x_mode not in X_MODES:
            raise ConfigError(f"lora_pro: x_mode must be one of {X_MODES}, got {x_mode!r}")
        if not damping > 0:
            raise ConfigError(f"lora_pro: damping must be > 0, got {damping!r}")
        self.pairs = factor_pairs(model, self.who)
        groups: list[dict[str, Any]] = [{"params": [t for p in self.pairs for t in (p.A, p.B)], "role": "factors"}]
        rest = other_trainables(model, self.pairs)
        if rest:
            groups.append({"params": rest, "role": "other"})
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, mode=mode, x_mode=x_mode,
                        damping=damping)
        super().__init__(groups, defaults, nonfinite=nonfinite)

    @staticmethod
    def expected_state_bytes(model: nn.Module, mode: str = "full") -> int:
        """State bytes by formula, without allocating (meta models work).

        full: two (out, in) moments of the equivalent gradient per factor pair (+ a step);
        efficient: AdamW moments of A and B; other trainables: AdamW.
        """
        pairs = factor_pairs(model, "lora_pro")
        rest = adamw_state_bytes(other_trainables(model, pairs))
        if mode == "efficient":
            return rest + adamw_state_bytes(t for p in pairs for t in (p.A, p.B))
        return rest + sum(2 * p.B.shape[0] * p.A.shape[1] * p.A.element_size() + 4 for p in pairs)

    def _step(self) -> None:
        for group in self.param_groups:
            if group.get("role") != "factors":
                self._adamw_group(group)
                continue
            # pairs of equal shapes (and scaling) are adjusted together as one batch
            batches: dict[tuple, list[tuple[nn.Parameter, nn.Parameter]]] = {}
            prm = group["params"]
            for (A, B), pair in zip(zip(prm[0::2], prm[1::2]), self.pairs):
                if A.grad is not None and B.grad is not None:
                    key = (tuple(A.shape), tuple(B.shape), A.dtype, A.device, pair.scaling)
                    batches.setdefault(key, []).append((A, B))
            for key, items in batches.items():
                self._batch_step([a for a, _ in items], [b for _, b in items], key[-1], group)

    def _batch_step(self, As: list[nn.Parameter], Bs: list[nn.Parameter], s: float, group: dict[str, Any]) -> None:
        lr, wd, x_mode, damp = group["lr"], group["weight_decay"], group["x_mode"], group["damping"]
        A, B = torch.stack(As), torch.stack(Bs)  # (k, r, in), (k, out, r)
        g_A, g_B = torch.stack([a.grad for a in As]), torch.stack([b.grad for b in Bs])
        if group["mode"] == "efficient":
            adj_A, adj_B = lora_pro_adjust(A, B, g_A, g_B, s, x_mode, damp)
            self._adamw_foreach([*As, *Bs], [*adj_A.unbind(0), *adj_B.unbind(0)], group)
            return
        # full: Adam on the equivalent gradient g̃ (out, in), state kept under A; X does not change g̃.
        # The r x r algebra is batched; the (out, in) work runs pair by pair (no (k, out, in) temporaries).
        a0, b0 = lora_pro_adjust(A, B, g_A, g_B, s, "zero", damp)
        beta1, beta2 = group["betas"]
        pulled_A, pulled_B = [], []
        for i, a in enumerate(As):
            g = equivalent_gradient(A[i], B[i], a0[i], b0[i], s)  # (out, in) = P_B G + (I-P_B) G P_A
            st = self.state[a]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(g)
                st["exp_avg_sq"] = torch.zeros_like(g)
            st["step"] += 1
            t = float(st["step"])
            st["exp_avg"].lerp_(g, 1 - beta1)
            st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            U = torch.sqrt(st["exp_avg_sq"], out=g).div_(math.sqrt(1 - beta2**t)).add_(group["eps"])  # √v̂ + ε
            U = torch.div(st["exp_avg"], U, out=U).mul_(1 / (1 - beta1**t))  # AdamW direction for W
            pulled_A.append(s * B[i].T @ U)  # (r, in)
            pulled_B.append(s * U @ A[i].T)  # (out, r)
        d_A, d_B = lora_pro_adjust(A, B, torch.stack(pulled_A), torch.stack(pulled_B), s, x_mode, damp)
        if wd:
            torch._foreach_mul_([*As, *Bs], math.sqrt(1 - lr * wd))
        torch._foreach_add_([*As, *Bs], [*d_A.unbind(0), *d_B.unbind(0)], alpha=-lr)


def lora_pro(model: nn.Module, lr: float = 1e-4, **options: Any) -> LoRAPro:
    """LoRA-Pro AdamW for an adapted model.

    Options: ``mode`` ("full": Adam on the (out, in) equivalent gradient, as in the paper;
    "efficient": adjusted gradients into per-factor AdamW), ``x_mode`` ("sylvester", "symmetry",
    "zero"), ``betas``, ``eps``, ``weight_decay``, ``damping`` (added to BᵀB and AAᵀ before
    inverting, 1e-8 as in the reference), ``nonfinite``.
    """
    return LoRAPro(model, lr, **options)
