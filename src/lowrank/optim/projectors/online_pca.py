"""Online PCA (Online Subspace Descent, Liang et al. 2024): no SVD after the first basis; every
step moves Q by one gradient step on the reconstruction error of the current gradient,

    f(Q) = ||G' - G' Q Q^T||_F^2 / ||G'||_F^2
    grad = (-4 A Q + 2 A Q (Q^T Q) + 2 Q (Q^T A Q)) / ||G'||^2,   A = G'^T G'

computed from Z = G' Q (the projected gradient the wrapper already has) as A Q = G'^T Z and
Q^T A Q = Z^T Z, so a step costs one extra (m' x d x r) matmul.  The first basis comes from the
randomized range finder.  Q is not re-orthonormalised: the objective itself pulls Q^T Q to I.
Step t projects and projects back with Q_t; the PCA step to Q_{t+1} comes after, as the reference.
Difference from the reference code: its default moves Q with AdamW (lr 1/update_proj_gap, weight
decay 0.01, following the LR schedule); here it is plain gradient descent at a constant
``pca_lr`` (the reference's ``continuous_sgd`` option), and the first basis is randomized rather
than an exact SVD."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...errors import ConfigError
from ..transforms import State
from . import Projector, mix_seed, register_projector
from .randomized import range_finder


@dataclass
class OnlineState(State):
    Q: Tensor
    index: int = 0


@register_projector
class OnlinePCA(Projector):
    name = "online_pca"
    continuous = True
    paper = "Memory-Efficient LLM Training with Online Subspace Descent (Liang et al. 2024), arXiv:2408.12857"

    def __init__(self, rank, seed=0, pca_lr: float = 0.5):
        super().__init__(rank, seed)
        if pca_lr <= 0:
            raise ConfigError(f"projector 'online_pca': pca_lr must be > 0, got {pca_lr}")
        self.pca_lr = pca_lr

    def init(self, d, like, index, transposed):
        return OnlineState(like.new_zeros(d, self.rank), index=index)

    def refresh(self, grads, states, step):
        for g, s in zip(grads, states):
            s.Q.copy_(range_finder(g[None].float(), self.rank, 8, 1, [mix_seed(self.seed, s.index, step)])[0])

    def basis(self, state, like):
        return state.Q

    def track(self, grads, states, projected, step):
        for g, s, Z in zip(grads, states, projected):
            Q = s.Q
            AQ = g.mT @ Z                                                   # (d, r)  G'^T G' Q
            grad = -4 * AQ + 2 * AQ @ (Q.mT @ Q) + 2 * Q @ (Z.mT @ Z)
            # a new tensor, not in place: this step's direction (built after track) projects back
            # with the Q it projected with, Q_t, as the reference; Q_{t+1} serves the next step
            s.Q = Q - (self.pca_lr / float(g.square().sum().clamp_min(1e-30))) * grad
