"""INT4 projection matrices with Q-GaLore's layer-adaptive refresh gap (Zhang et al. 2024).

The basis from a base projector (exact SVD by default, as in Q-GaLore) is stored as 4-bit codes
(two per byte) with an asymmetric min-max scale and zero point per group of ``group_size``
entries, and dequantized when used.  At each refresh the cosine similarity between the first
basis vector and the previous refresh's is pushed into a queue of ``queue_size``; when the queue
is full and its mean is >= ``cos_threshold`` the matrix's refresh gap is multiplied by ``gamma``.
Groups follow the reference's storage: the projection matrix as Q-GaLore keeps it, Vh_r (r, n) for a
tall weight and U_r (m, r) for a wide one, quantised in row-major order.
Difference from the reference code: we take |cos| since a singular vector's sign is arbitrary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import ConfigError
from ..transforms import State
from . import Projector, make_projector, register_projector


@dataclass
class QuantState(State):
    codes: Tensor   # (ceil(d r / 2),) uint8, two 4-bit codes per byte
    scale: Tensor   # (groups,)
    zero: Tensor    # (groups,)
    prev: Tensor    # (d,) first basis vector at the previous refresh (fp32)
    queue: Tensor   # (queue_size,) recent |cos| similarities
    qlen: int = 0
    gap_mult: int = 1
    index: int = 0
    transposed: int = 0


def quantize4(x: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, group)
    lo, hi = flat.amin(1), flat.amax(1)
    scale = (hi - lo).clamp(min=1e-8) / 15
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(flat / scale[:, None]) + zero[:, None]).clamp(0, 15).to(torch.uint8).view(-1)
    q = torch.cat([q, q.new_zeros(q.numel() % 2)])
    return (q[0::2] | (q[1::2] << 4)), scale, zero


def dequantize4(codes: Tensor, scale: Tensor, zero: Tensor, shape, group: int, dtype) -> Tensor:
    q = torch.stack([codes & 15, codes >> 4], dim=1).view(-1)[: scale.numel() * group].view(-1, group)
    x = (q.to(scale.dtype) - zero[:, None]) * scale[:, None]
    n = int(torch.Size(shape).numel())
    return x.view(-1)[:n].view(shape).to(dtype)


@register_projector
class Int4(Projector):
    name = "int4"
    paper = "Q-GaLore (Zhang et al. 2024), arXiv:2407.08296"

    def __init__(self, rank, seed=0, base: str = "svd", group_size: int = 256, cos_threshold: float = 0.4,
                 gamma: int = 2, queue_size: int = 5, **base_options):
        super().__init__(rank, seed)
        if base == "int4":
            raise ConfigError("projector 'int4': base cannot be 'int4'")
        if group_size < 2 or gamma < 1 or queue_size < 1:
            raise ConfigError("projector 'int4': need group_size >= 2, gamma >= 1, queue_size >= 1")
        self.base = make_projector(base, rank, seed=seed, **base_options)
        self.group, self.thr, self.gamma, self.qsize = group_size, cos_threshold, int(gamma), queue_size

    def init(self, d, like, index, transposed):
        n = d * self.rank
        groups = -(-n // self.group)
        f = dict(device=like.device)
        return QuantState(
            codes=torch.zeros(-(-groups * self.group // 2), dtype=torch.uint8, **f),
            scale=torch.zeros(groups, dtype=torch.float32, **f), zero=torch.zeros(groups, dtype=torch.float32, **f),
            prev=torch.zeros(d, dtype=torch.float32, **f), queue=torch.zeros(self.qsize, dtype=torch.float32, **f),
            index=index, transposed=int(transposed))

    def refresh(self, grads, states, step):
        tmp = [self.base.init(g.shape[-1], g, s.index, bool(s.transposed)) for g, s in zip(grads, states)]
        self.base.refresh(grads, tmp, step)
        for g, s, t in zip(grads, states, tmp):
            Q = self.base.basis(t, g).float()                                  # (d, r)
            v = Q[:, 0]
            if s.prev.abs().sum() > 0:                                         # not the first refresh
                cos = (v @ s.prev).abs() / (v.norm() * s.prev.norm()).clamp_min(1e-12)
                s.queue.copy_(torch.cat([s.queue[1:], cos.view(1)]))
                s.qlen = min(s.qlen + 1, self.qsize)
                if s.qlen == self.qsize and float(s.queue.mean()) >= self.thr:
                    s.gap_mult *= self.gamma
            s.prev.copy_(v)
            # stored as the reference keeps it: (r, d) for a tall weight (Vh_r), (d, r) for a wide one (U_r)
            codes, scale, zero = quantize4(Q if s.transposed else Q.mT, self.group)
            s.codes.copy_(codes), s.scale.copy_(scale), s.zero.copy_(zero)

    def basis(self, state, like):
        d = like.shape[-1]
        if state.transposed:
            return dequantize4(state.codes, state.scale, state.zero, (d, self.rank), self.group, like.dtype)
        return dequantize4(state.codes, state.scale, state.zero, (self.rank, d), self.group, like.dtype).mT

    def gap_factor(self, state):
        return state.gap_mult
