"""Flora (Hao et al. 2024, arXiv:2402.03293): Adafactor whose momentum is kept compressed by a
seeded Gaussian random projection, resampled every ``kappa`` steps with the momentum carried over.

For the oriented gradient G' (m', d) (d the smaller side) and B (d, r) with N(0, 1/r) entries,
regenerated from a seed (E[B B^T] = I, so up(down(x)) = x B B^T is an unbiased reconstruction):

    v  : Adafactor's factored second moment, rows (m',) and columns (d,),  beta2_t = 1 - t^-0.8
    u  = G' / sqrt(v_hat)
    D  = (1 - b1) u + b1 * C B^T              momentum decompressed, C (m', r) is the whole state
    every kappa steps: B' <- new seed;  C <- (C B^T) B'     transfer the momentum to the new basis
    C  = b1 C + (1 - b1) u B
    D  = D / max(1, rms(D) / clip)

As flora-opt, the current step's u enters the update uncompressed; only the history is compressed,
and the Gaussians are drawn as flora-opt draws them (so the same seeds give the same matrices).
Differences from flora-opt: no ``scale_parameter`` (the learning rate is not multiplied by the
weight's RMS: lr schedules stay the caller's), and which matrices are compressed is chosen by
``targets`` (flora-opt compresses every matrix with min side >= rank and aspect ratio <= 4); the
uncompressed parameters (norms, ...) use Adafactor with its first moment taken after clipping
(flora-opt mixes the momentum first and clips the result).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .projectors.random import gaussian_basis, next_seed, split_seed
from .transforms import State, Transform, check_coefficient, check_positive


@dataclass
class FloraState(State):
    row: Tensor      # (m',)
    col: Tensor      # (d,)
    C: Tensor        # (m', r) compressed momentum
    seed: int = 0
    transposed: int = 0


class Flora(Transform):
    def __init__(self, rank: int, *, kappa: int = 1000, beta1: float = 0.9, decay_rate: float = -0.8,
                 eps: float = 1e-30, clip_threshold: float = 1.0, seed: int = 0):
        if kappa < 1:
            raise ConfigError(f"flora: kappa must be >= 1, got {kappa}")
        check_coefficient("flora", "beta1", beta1)
        check_positive("flora", "clip_threshold", clip_threshold)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"flora: seed must be a non-negative int, got {seed!r}")
        self.rank, self.kappa, self.b1 = rank, kappa, beta1
        self.decay_rate, self.eps, self.clip, self.seed = decay_rate, eps, clip_threshold, seed

    def hyper(self):
        return {"beta1": self.b1, "clip_threshold": self.clip}

    def set_hyper(self, values):
        b1 = check_coefficient("flora", "beta1", values.get("beta1", self.b1))
        self.clip = check_positive("flora", "clip_threshold", values.get("clip_threshold", self.clip))
        self.b1 = b1

    def init(self, p, index=0):
        m, n = p.shape
        t = m < n
        mp, d = (n, m) if t else (m, n)
        return FloraState(p.new_zeros(mp), p.new_zeros(d), p.new_zeros(mp, self.rank), self.seed + index, int(t))

    def _B(self, seed, like, transposed):
        # flora-opt's sampling: two seeds from one; (r, m) drawn for a wide G (left side), (n, r) otherwise
        lseed, rseed = split_seed(seed)
        if transposed:
            return gaussian_basis(lseed, like.shape[-1], self.rank, False, like)  # drawn (r, d), used as (d, r)
        return gaussian_basis(rseed, like.shape[-1], self.rank, True, like)       # drawn (d, r)

    def update(self, grads, states, params, step):
        b2 = 1.0 - step ** self.decay_rate
        out = []
        for g, s in zip(grads, states):
            G = g.mT if s.transposed else g                                        # (m', d)
            g2 = G * G + self.eps
            s.row.lerp_(g2.mean(dim=1), 1 - b2)
            s.col.lerp_(g2.mean(dim=0), 1 - b2)
            u = G * (s.row / s.row.mean()).rsqrt().unsqueeze(1) * s.col.rsqrt().unsqueeze(0)
            B = self._B(s.seed, G, s.transposed)
            D = torch.lerp(s.C @ B.mT, u, 1 - self.b1)                             # (1-b1) u + b1 C B^T
            if step % self.kappa == 0:
                s.seed = next_seed(s.seed)
                B_new = self._B(s.seed, G, s.transposed)
                s.C.copy_((s.C @ B.mT) @ B_new)
                B = B_new
            s.C.lerp_(u @ B, 1 - self.b1)
            D = D / (D.norm() / (D.numel() ** 0.5 * self.clip)).clamp(min=1.0)
            out.append(D.mT if s.transposed else D)
        return out


def flora(model_or_named_parameters, lr: float = 1e-3, rank: int = 128, kappa: int = 1000, targets=None, *,
          beta1: float = 0.9, decay_rate: float = -0.8, clip_threshold: float = 1.0, weight_decay: float = 0.0,
          nonfinite: str = "skip", layerwise: bool = False, accumulation_steps: int = 1, seed: int = 0):
    """Flora on the projected targets; other parameters use Adafactor with an uncompressed momentum."""
    from .optimizer import build
    from .transforms import Adafactor
    tf = Flora(rank, kappa=kappa, beta1=beta1, decay_rate=decay_rate, clip_threshold=clip_threshold, seed=seed)
    plain = Adafactor(decay_rate=decay_rate, clip_threshold=clip_threshold, beta1=beta1)
    return build(model_or_named_parameters, method="flora", lr=lr, rank=rank, transform=tf, plain=plain,
                 inner_name="adafactor", targets=targets, weight_decay=weight_decay, nonfinite=nonfinite,
                 layerwise=layerwise, accumulation_steps=accumulation_steps,
                 info={"projector": "random", "kappa": kappa})
