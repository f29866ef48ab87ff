"""The low-rank wrapper: project the gradient, run any inner optimizer there, project back.

For a matrix gradient G (m, n) the wrapper works on G' = G (m >= n) or G^T (m < n), so the
projected side is always the smaller dimension d (galore-torch's "std" choice: m >= n projects
on the right, R = G P^T; otherwise on the left, R = P^T G).  With the projector's basis Q (d, r):

    R = G' Q                    (m', r)   the inner optimizer's state lives at this size
    N = inner(R)                (m', r)   e.g. Adam's m_hat / (sqrt(v_hat) + eps)
    D = scale * N Q^T           (m', d)   the direction; the edge applies W <- W - lr D

Every ``update_gap`` steps (counted from the first, as galore-torch) the projector refreshes Q
from the current gradient; with ``rotate_moments`` the inner moments are carried into the new
basis (``R_rot = Q_new^+ Q_old``) instead of being kept in coordinates of the stale one.  With
rank = d the projection is skipped: the wrapper is exactly its inner optimizer (times scale).
Subclasses (Fira, APOLLO) override :meth:`combine` to build the direction differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .projectors import Projector
from .transforms import EmptyState, Factored, Inner, State, Transform, check_positive

NEVER = 2**62


@dataclass
class LowRankState(State):
    proj: State
    inner: State
    extra: State
    next_refresh: int = 1   # 1-based step at which the basis is recomputed next
    transposed: int = 0     # 1 when G' = G^T (m < n)


@dataclass
class LimiterState(State):
    prev: Tensor            # 0-d, norm of the previous (limited) update
    started: int = 0


def limit_growth(S: Tensor, st: LimiterState, gamma: float) -> Tensor:
    """Fira's norm-growth limiter: if ||S_t|| / ||S_{t-1}|| > gamma, rescale S_t to gamma ||S_{t-1}||."""
    n = S.norm()
    if st.started:
        lim = (n / (st.prev + 1e-8)).clamp(min=gamma) / gamma
        S = S / lim
        st.prev.copy_(n / lim)
    else:
        st.prev.copy_(n)
        st.started = 1
    return S


class LowRank(Transform):
    def __init__(self, inner: Inner, projector: Projector, *, rank: int, update_gap: int = 200,
                 scale: float = 0.25, rotate_moments: bool = False):
        self.inner, self.projector = inner, projector
        self.rank, self.rotate_moments = rank, rotate_moments
        self.update_gap, self.scale = self._gap(update_gap), check_positive("low-rank projection", "scale", scale)

    @staticmethod
    def _gap(update_gap) -> int:
        if not isinstance(update_gap, int) or isinstance(update_gap, bool) or update_gap < 1:
            raise ConfigError(f"update_gap must be a positive int, got {update_gap!r}")
        return update_gap

    # -- hyperparameters a scheduler may change: scale, update_gap (from the next refresh on), the inner's
    def hyper(self):
        return {**self.inner.hyper(), "scale": self.scale, "update_gap": self.update_gap}

    def set_hyper(self, values):
        gap = self._gap(values.get("update_gap", self.update_gap))
        scale = check_positive("low-rank projection", "scale", values.get("scale", self.scale))
        own = self._check_own(values)
        self.inner.set_hyper({k: values[k] for k in self.inner.hyper() if k in values})   # checks, then applies
        self.update_gap, self.scale = gap, scale
        for k, v in own.items():
            setattr(self, k, v)

    def _check_own(self, values) -> dict:
        """A subclass's own hyperparameters from ``values``, checked (attribute name -> value)."""
        return {}

    # -- state
    def init(self, p: Tensor, index: int = 0) -> LowRankState:
        m, n = p.shape
        transposed = m < n
        like = p.detach().mT if transposed else p.detach()                  # (m', d), a view
        mp, d = like.shape
        full = self.rank >= d
        proj = EmptyState() if full else self.projector.init(d, like, index, transposed)
        inner = self.inner.init(like if full else p.new_empty(mp, self.rank), index)
        return LowRankState(proj, inner, self.init_extra(p), 1, int(transposed))

    def init_extra(self, p: Tensor) -> State:
        return EmptyState()

    # -- hot path
    def update(self, grads, states, params, step):
        return self._update(grads, states, params, step, factored=False)

    def directions(self, grads, states, params, step):
        # the plain direction scale N Q^T stays factored: the edge adds it to W in one GEMM
        return self._update(grads, states, params, step, factored=type(self).combine is LowRank.combine)

    def _update(self, grads, states, params, step, *, factored: bool):
        Gs = [g.mT if s.transposed else g for g, s in zip(grads, states)]  # (m', d)
        full = [self.rank >= G.shape[-1] for G in Gs]
        due = [i for i, s in enumerate(states) if not full[i] and step >= s.next_refresh]
        if due:
            self._refresh([Gs[i] for i in due], [states[i] for i in due], step)
        Qs = [None if f else self.projector.basis(s.proj, G) for G, s, f in zip(Gs, states, full)]
        Rs = [G if Q is None else G @ Q for G, Q in zip(Gs, Qs)]              # (m', r)
        Ns = self.inner.update(Rs, [s.inner for s in states], params, step)   # (m', r)
        if self.projector.continuous:
            k = [i for i, f in enumerate(full) if not f]
            self.projector.track([Gs[i] for i in k], [states[i].proj for i in k], [Rs[i] for i in k], step)
        Ds = [Factored(N * self.scale if self.scale != 1.0 else N, Q.mT) if factored and Q is not None
              else self.combine(G, R, N, Q, s.extra) for G, R, N, Q, s in zip(Gs, Rs, Ns, Qs, states)]
        return [D.mT if s.transposed else D for D, s in zip(Ds, states)]

    def combine(self, G: Tensor, R: Tensor, N: Tensor, Q: Tensor | None, extra: State) -> Tensor:
        """The direction in G's oriented frame: D = scale * N Q^T."""
        N = N * self.scale if self.scale != 1.0 else N       # scale the (m', r) factor, not the (m', d) product
        if Q is None:
            return N
        if not G.is_contiguous() and G.mT.is_contiguous():  # G' = G^T: build D in G's own layout,
            return (Q @ N.mT).mT                             # so the weight update reads memory in order
        return N @ Q.mT

    def _refresh(self, Gs: list[Tensor], states: list[LowRankState], step: int) -> None:
        rotate = [self.rotate_moments and s.next_refresh > 1 for s in states]
        old = [self.projector.basis(s.proj, G).clone() if r else None for G, s, r in zip(Gs, states, rotate)]
        self.projector.refresh(Gs, [s.proj for s in states], step)
        for G, s, Q0 in zip(Gs, states, old):
            s.next_refresh = NEVER if self.projector.continuous else step + self.update_gap * self.projector.gap_factor(s.proj)
            if Q0 is not None:
                Q1 = self.projector.basis(s.proj, G)
                # coordinates of the old basis in the new one: least squares Q1 X = Q0 (= Q1^T Q0 if orthonormal)
                Rot = Q1.mT @ Q0 if self.projector.orthonormal else torch.linalg.lstsq(Q1, Q0).solution
                self.inner.rotate(s.inner, Rot, axis=1)
