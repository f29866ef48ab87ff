"""Fira (Chen et al. 2024, arXiv:2410.01623): GaLore plus the norm-scaled residual.

    R = G' Q,  N = Adam(R)                                  as GaLore
    phi_i = ||N_i|| / ||R_i||       per row of the oriented frame (one factor per channel)
    S = phi * (G' - R Q^T)          the part of G' outside the subspace, scaled like Adam would
    S = S * min(1, gamma ||S_prev|| / ||S||)                norm-growth limiter, gamma = 1.01
    D = scale * N Q^T + S

Differences from the `fira` package (we follow the paper): the package subtracts
``scale * Q R`` (not ``Q R``) in the residual, and computes the limiter on the update before
Adam's bias-correction factor sqrt(1-b2^t)/(1-b1^t) is applied.  They agree exactly for
scale = 1 and no bias correction, which is what the parity test checks.
"""

from __future__ import annotations

import torch

from .transforms import check_positive
from .wrapper import LimiterState, LowRank, limit_growth


class Fira(LowRank):
    def __init__(self, inner, projector, *, gamma: float = 1.01, **kw):
        super().__init__(inner, projector, **kw)
        self.gamma = check_positive("fira", "gamma", gamma)

    def hyper(self):
        return {**super().hyper(), "gamma": self.gamma}

    def _check_own(self, values):
        return {"gamma": check_positive("fira", "gamma", values.get("gamma", self.gamma))}

    def init_extra(self, p):
        return LimiterState(p.new_zeros((), dtype=torch.float32))

    def combine(self, G, R, N, Q, extra):
        if Q is None:                                   # rank = d: nothing outside the subspace
            return N * self.scale
        phi = N.norm(dim=1, keepdim=True) / (R.norm(dim=1, keepdim=True) + 1e-8)   # (m', 1)
        S = limit_growth((G - R @ Q.mT) * phi, extra, self.gamma)                    # (m', d)
        return torch.addmm(S, N, Q.mT, alpha=self.scale)


def fira(model_or_named_parameters, lr: float = 1e-3, rank: int = 128, update_gap: int = 200, scale: float = 0.25,
         projector: str = "randomized", inner: str = "adamw", targets=None, *, gamma: float = 1.01,
         rotate_moments: bool = False, weight_decay: float = 0.0, nonfinite: str = "skip", layerwise: bool = False,
         accumulation_steps: int = 1, seed: int = 0, projector_options: dict | None = None, **inner_options):
    """Fira: GaLore's subspace update plus the norm-scaled residual with the norm-growth limiter."""
    from .galore import make
    return make(Fira, "fira", model_or_named_parameters, lr=lr, rank=rank, update_gap=update_gap, scale=scale,
                projector=projector, inner=inner, targets=targets, rotate_moments=rotate_moments,
                weight_decay=weight_decay, nonfinite=nonfinite, layerwise=layerwise,
                accumulation_steps=accumulation_steps, seed=seed, projector_options=projector_options,
                inner_options=inner_options, extra={"gamma": gamma})
