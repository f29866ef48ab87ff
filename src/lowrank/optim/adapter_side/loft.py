"""LoFT: Low-Rank Adaptation That Behaves Like Full Fine-Tuning (Tastan, Laskaridis, Takáč,
Nandakumar, Horváth; ICLR 2026), arXiv:2505.21289.

W = W0 + s B A.  Write B̃ = s B, Ã = s A, so ΔW = B̃ A = B Ã.  Each step updates ONE factor
(alternating, B first since it starts at zero), and every statistic is kept in the coordinates
of the other factor's subspace, so that the step equals the projection of full fine-tuning's
AdamW step:

    coordinates     c_A = (B̃ᵀB̃)⁻¹ g_A  (r, in),      c_B = g_B (ÃÃᵀ)⁻¹  (out, r)
                    (B̃ c_A = P_B̃ G and c_B Ã = G P_Ã: the projected full gradient)
    first moment    m_A ← β1 m_A + (1-β1) c_A,          likewise m_B
    second moment   for every column j of c_A the r×r outer product c_j c_jᵀ is averaged
                    (Q_A, (in, r, r)); v_ij = B̃_i Q_A,j B̃_iᵀ is then exactly the EMA of the
                    squared entries of the projected full gradient (likewise Q_B per row)
    update (A)      U = (B̃ m_A / bc1) / (√(v / bc2) + ε)          (out, in), AdamW in W-space
                    ΔA = -lr (B̃ᵀB̃)⁻¹ B̃ᵀ U  ⇒  B̃ ΔA = -lr P_B̃ U
    re-projection   when a factor moves (B̃ → B̃'), the other factor's statistics are carried
                    into the new basis: R = (B̃'ᵀB̃')⁻¹ B̃'ᵀ B̃,  m_A ← R m_A,  Q_A,j ← R Q_A,j Rᵀ
                    (for B: R = Ã Ã'ᵀ (Ã'Ã'ᵀ)⁻¹, m_B ← m_B R, Q_B,i ← Rᵀ Q_B,i R)

With invertible square factors every projection is the identity and LoFT is exactly AdamW on W.

Differences from the reference code (tnurbek/loft): the LoRA scaling s is folded into the
factors (the reference assumes s = 1; this makes the step independent of alpha, as the paper
claims); the gradient coordinates of both factors are taken with the factors the gradient was
computed at, then re-projected (the reference mixes in the factor updated earlier in the same
step); the second-moment re-projection is R Q Rᵀ in the convention above (the reference
applies the transpose, which breaks the full-rank equivalence); weight decay is the usual
decoupled p ← (1 - lr·λ) p on the updated factor (the reference omits the lr); statistics are
re-projected only after the other factor moved (the reference re-projects every step, and with
its damping δ the "no move" R = (B̃ᵀB̃ + δI)⁻¹ B̃ᵀB̃ is not exactly I: a ~1e-3 drift over 8 steps).
Memory: r·(in + out) first-moment plus r²·(in + out) second-moment statistics per layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._common import AdapterOptimizer, adamw_state_bytes, check_hparams, factor_pairs, gram_inv, other_trainables
from ...errors import ConfigError


def quad_rows(K: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """v[i, j] = K_i Q_j K_iᵀ for K (n, r), symmetric Q (m, r, r) -> (n, m).

    One (n, r(r+1)/2) x (r(r+1)/2, m) matmul over the upper triangle (off-diagonal terms
    counted twice), without (n, m, r) temporaries.
    """
    r = K.shape[1]
    k, l = torch.triu_indices(r, r, device=K.device)
    w = torch.where(k == l, 1.0, 2.0).to(K.dtype)  # (r(r+1)/2,)
    KK = K[:, k] * K[:, l] * w  # (n, r(r+1)/2)
    return (KK @ Q[:, k, l].T).clamp_(min=0)


class LoFT(AdapterOptimizer):
    who = "loft"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        damping_b: float = 1e-6,
        damping_a: float = 1e-8,
        alternate: bool = True,
        nonfinite: str = "skip",
    ):
        check_hparams(self.who, lr, betas, eps, weight_decay)
        if not (damping_a > 0 and damping_b > 0):
            raise ConfigError(f"loft: damping_a and damping_b must be > 0, got {damping_a!r}, {damping_b!r}")
        self.pairs = factor_pairs(model, self.who)
        groups: list[dict[str, Any]] = [{"params": [t for p in self.pairs for t in (p.A, p.B)], "role": "factors"}]
        rest = other_trainables(model, self.pairs)
        if rest:
            groups.append({"params": rest, "role": "other"})
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, damping_a=damping_a,
                        damping_b=damping_b, alternate=bool(alternate))
        super().__init__(groups, defaults, nonfinite=nonfinite)

    @staticmethod
    def expected_state_bytes(model: nn.Module) -> int:
        """State bytes by formula, without allocating (meta models work): per factor pair
        r·(in + out) first moments + r²·(in + out) second-moment row products + 2 steps;
        other trainables: AdamW."""
        pairs = factor_pairs(model, "loft")
        rest = adamw_state_bytes(other_trainables(model, pairs))
        per = 0
        for p in pairs:
            r, n = p.A.shape[0], p.A.shape[1] + p.B.shape[0]
            per += (r * n + r * r * n) * p.A.element_size() + 8
        return rest + per

    def _step(self) -> None:
        for group in self.param_groups:
            if group.get("role") != "factors":
                self._adamw_group(group)
                continue
            prm = group["params"]
            for (A, B), pair in zip(zip(prm[0::2], prm[1::2]), self.pairs):
                if A.grad is None or B.grad is None:
                    continue
                self._pair_step(A, B, pair.scaling, group)

    def _pair_step(self, A: nn.Parameter, B: nn.Parameter, s: float, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        r = A.shape[0]
        sA, sB = self.state[A], self.state[B]
        if not sA:
            for st, p, n in ((sA, A, A.shape[1]), (sB, B, B.shape[0])):
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p)  # m in the other factor's coordinates
                st["row_products"] = p.new_zeros(n, r, r)  # Q: EMA of c cᵀ per column (A) / row (B)
        At, Bt = s * A, s * B  # Ã (r, in), B̃ (out, r)
        BtB_inv = gram_inv(Bt.T @ Bt, group["damping_b"])  # (r, r)
        AAt_inv = gram_inv(At @ At.T, group["damping_a"])  # (r, r)
        c_A = BtB_inv @ A.grad  # (r, in):  B̃ c_A = P_B̃ G
        c_B = B.grad @ AAt_inv  # (out, r): c_B Ã = G P_Ã
        for st, c, rows in ((sA, c_A, c_A.T), (sB, c_B, c_B)):
            st["step"] += 1
            st["exp_avg"].lerp_(c, 1 - beta1)
            st["row_products"].mul_(beta2).baddbmm_(rows[:, :, None], rows[:, None, :], alpha=1 - beta2)
        t = float(sA["step"])
        odd = int(t) % 2 == 1  # alternating: B on odd steps (it starts at zero), A on even ones
        update_B = odd or not group["alternate"]
        update_A = (not odd) or not group["alternate"]
        bc1, bc2 = 1 - beta1**t, math.sqrt(1 - beta2**t)
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        new_A = new_B = None
        if update_B:  # full-space AdamW direction of the projected gradient G P_Ã, pulled back to B
            m_full = sB["exp_avg"] @ At  # (out, in)
            v_full = quad_rows(At.T.contiguous(), sB["row_products"]).T  # (out, in): Ã_jᵀ Q_B,i Ã_j
            U = m_full.div_(v_full.sqrt_().div_(bc2).add_(eps)).mul_(1 / bc1)  # m̂ / (√v̂ + ε)
            new_B = B * (1 - lr * wd) - lr * (U @ At.T @ AAt_inv)  # ΔB Ã = -lr U P_Ã
        if update_A:
            m_full = Bt @ sA["exp_avg"]  # (out, in)
            v_full = quad_rows(Bt, sA["row_products"])  # (out, in): B̃_i Q_A,j B̃_iᵀ
            U = m_full.div_(v_full.sqrt_().div_(bc2).add_(eps)).mul_(1 / bc1)  # m̂ / (√v̂ + ε)
            new_A = A * (1 - lr * wd) - lr * (BtB_inv @ (Bt.T @ U))  # B̃ ΔA = -lr P_B̃ U
        if new_B is not None:
            Bt_new = s * new_B
            R = gram_inv(Bt_new.T @ Bt_new, group["damping_b"]) @ (Bt_new.T @ Bt)  # (r, r)
            sA["exp_avg"].copy_(R @ sA["exp_avg"])
            sA["row_products"].copy_(R @ sA["row_products"] @ R.T)
            B.copy_(new_B)
        if new_A is not None:
            At_new = s * new_A
            R = (At @ At_new.T) @ gram_inv(At_new @ At_new.T, group["damping_a"])  # (r, r)
            sB["exp_avg"].copy_(sB["exp_avg"] @ R)
            sB["row_products"].copy_(R.T @ sB["row_products"] @ R)
            A.copy_(new_A)


def loft(model: nn.Module, lr: float = 1e-4, **options: Any) -> LoFT:
    """LoFT AdamW for an adapted model: alternating A/B steps that equal the projection of
    full-weight AdamW, with moments kept in (and re-projected between) the factor subspaces.

    Options: ``betas``, ``eps`` (1e-4, the reference default), ``weight_decay``, ``damping_b``
    (added to B̃ᵀB̃, 1e-6) and ``damping_a`` (added to ÃÃᵀ, 1e-8) as in the reference,
    ``alternate`` (True; False updates both factors every step), ``nonfinite``.
    """
    return LoFT(model, lr, **options)
