"""APOLLO / APOLLO-Mini (Zhu et al. 2024, arXiv:2412.05270): SGD-like memory, AdamW-level results.

A seeded random projection (no SVD) estimates, per channel, how much Adam would rescale the
gradient; the full raw gradient is then rescaled by that factor:

    R = G' Q,  N = Adam(R)                          Q (d, r) Gaussian N(0, 1/r), from a seed
    s_i = ||N_i|| / ||R_i||    (channel: per row of G')   or  s = ||N|| / ||R||  (tensor)
    D = scale * limiter(s * G')                     Fira's norm-growth limiter, gamma = 1.01

APOLLO-Mini is rank 1 with tensor-wise scaling.  ``scale`` multiplies the update directly:
apollo-torch's ``scale`` option is the square of ours (it multiplies by sqrt(scale)), so its
APOLLO-Mini default 128 is our sqrt(128).  Like Fira, apollo-torch applies the limiter before
the bias-correction factor; the paper's ratio is on the bias-corrected Adam output, which we
follow; both agree without bias correction (the parity test).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .transforms import check_positive
from .wrapper import LimiterState, LowRank, limit_growth


class Apollo(LowRank):
    def __init__(self, inner, projector, *, scale_type: str = "channel", gamma: float = 1.01,
                 limiter: bool = True, **kw):
        super().__init__(inner, projector, **kw)
        if scale_type not in ("channel", "tensor"):
            raise ConfigError(f"apollo: scale_type must be 'channel' or 'tensor', got {scale_type!r}")
        self.scale_type, self.gamma, self.limiter = scale_type, check_positive("apollo", "gamma", gamma), limiter

    def hyper(self):
        return {**super().hyper(), "gamma": self.gamma}

    def _check_own(self, values):
        return {"gamma": check_positive("apollo", "gamma", values.get("gamma", self.gamma))}

    def init_extra(self, p):
        return LimiterState(p.new_zeros((), dtype=torch.float32))

    def combine(self, G, R, N, Q, extra):
        if self.scale_type == "channel":
            s = N.norm(dim=1, keepdim=True) / (R.norm(dim=1, keepdim=True) + 1e-8)    # (m', 1)
        else:
            s = N.norm() / (R.norm() + 1e-8)
        D = G * s
        if self.limiter:
            D = limit_growth(D, extra, self.gamma)
        return D * self.scale


def apollo(model_or_named_parameters, lr: float = 1e-2, rank: int = 256, update_gap: int = 200, scale: float = 1.0,
           projector: str = "random", inner: str = "adamw", targets=None, *, scale_type: str = "channel",
           gamma: float = 1.01, limiter: bool = True, rotate_moments: bool = False, weight_decay: float = 0.0,
           nonfinite: str = "skip", layerwise: bool = False, accumulation_steps: int = 1, seed: int = 0,
           projector_options: dict | None = None, **inner_options):
    """APOLLO: channel-wise (or tensor-wise) scaling of the raw gradient estimated in a random subspace."""
    from .galore import make
    return make(Apollo, "apollo", model_or_named_parameters, lr=lr, rank=rank, update_gap=update_gap, scale=scale,
                projector=projector, inner=inner, targets=targets, rotate_moments=rotate_moments,
                weight_decay=weight_decay, nonfinite=nonfinite, layerwise=layerwise,
                accumulation_steps=accumulation_steps, seed=seed, projector_options=projector_options,
                inner_options=inner_options, extra={"scale_type": scale_type, "gamma": gamma, "limiter": limiter})


def apollo_mini(model_or_named_parameters, lr: float = 1e-2, rank: int = 1, update_gap: int = 200,
                scale: float = 128 ** 0.5, **options):
    """APOLLO-Mini: rank 1, tensor-wise scaling, update scaled by sqrt(128) (apollo-torch's scale=128)."""
    options.setdefault("scale_type", "tensor")
    return apollo(model_or_named_parameters, lr=lr, rank=rank, update_gap=update_gap, scale=scale, **options)
