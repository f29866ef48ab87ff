"""LoReFT: Low-rank Linear Subspace Representation Finetuning (Wu et al., NeurIPS 2024).

ReFT edits hidden representations instead of weights.  LoReFT intervenes on a module's output
hidden states h (d-dimensional, e.g. a decoder layer's residual stream) inside an r-dimensional
subspace spanned by the orthonormal rows of R:

    Φ(h) = h + Rᵀ (W h + b − R h),      R ∈ R^{r×d} with R Rᵀ = I,  W ∈ R^{r×d},  b ∈ R^r

R is kept orthonormal by torch's Householder parametrization, as ``torch.nn.utils.
parametrizations.orthogonal`` builds it for pyreft (so it stays on the Stiefel manifold through
any optimizer step), with one change: the raw matrix's diagonal, which only carries each
reflector's sign and gets no gradient, is read with sign() where torch reads it with int().
Decoupled weight decay (AdamW's default 0.01) shrinks that diagonal to 0.99..., which int()
turns into 0, and R became all zeros after one step.  W, b are a Linear layer with PyTorch's
default init, as in the reference (pyreft), so the intervention is not the identity at init.

Where: the adapter wraps the targeted module and edits its output (``layer_types`` admits any
module: target decoder blocks with e.g. ``targets=r"model\\.layers\\.(3|7)"``).  Which positions:
``first_n`` / ``last_n`` intervene on the first / last positions of the sequence axis (dim -2)
only, as the paper's prefix+suffix strategy; both 0 (the default) intervene everywhere.  With
padding, "last" means the last positions of the tensor; with a KV cache, positions are those of
the current forward call.  There is no weight update, so ``merge`` raises MergeError.

Weight tying (the paper's "tied weights" hyperparameter, pyreft's ``share_weights``): by default
one intervention serves both the first and the last positions; ``share_weights=False`` with both
``first_n`` and ``last_n`` set learns a second one (R', W', b') for the last positions, as
pyreft's training script does by default.  Where the two position sets overlap (a sequence
shorter than first_n + last_n), the suffix intervention edits the prefix-edited state, the
order in which pyvene applies a layer's interventions.

Against pyreft: ``dropout`` drops out the intervened positions' whole state Φ(h), as its
``LoreftIntervention``.  One difference stays: positions are those of the tensor, not of the
prompt only (pyreft locates them in the instruction and leaves generated tokens alone; it also
caps first_n / last_n at half the prompt).

Trainable parameters per intervened module: 2 · r · d + r, twice that with two interventions
(share_weights=False with both first_n and last_n > 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _Orthogonal, _OrthMaps, orthogonal

from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import ConfigError, MergeError, ShapeError
from ..registry import register_method


class _Householder(_Orthogonal):
    """torch's Householder map to matrices with orthonormal columns (rows, once transposed), the
    reflectors' signs read with sign() instead of int() (see the module docstring)."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        transposed = X.size(-2) < X.size(-1)
        if transposed:
            X = X.mT  # (d, r): tall
        A = X.tril(diagonal=-1)  # the reflectors
        tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
        Q = torch.linalg.householder_product(A, tau)  # (d, r), orthonormal columns
        Q = Q * X.diagonal(dim1=-2, dim2=-1).detach().sign().unsqueeze(-2)
        if getattr(self, "base", None) is not None:
            Q = self.base @ Q  # the trivialization: steps are taken around the initial R
        return Q.mT if transposed else Q


def _orthonormal_rows(linear: nn.Linear) -> nn.Linear:
    """``linear.weight`` parametrized to have orthonormal rows, as torch's orthogonal() does: the
    Householder map for r < d (signs read robustly), the matrix exponential for a square R."""
    if linear.weight.size(0) == linear.weight.size(1):  # rank = width: torch's map, which has no int()
        return orthogonal(linear)
    parametrize.register_parametrization(
        linear, "weight", _Householder(linear.weight, _OrthMaps.householder, use_trivialization=True), unsafe=True
    )
    return linear


@register_method
class LoReFT(Adapter):
    name = "loreft"
    paper = "ReFT: Representation Finetuning for Language Models (Wu et al., NeurIPS 2024), arXiv:2404.03592"
    formula = "h' = h + R^T (W h + b - R h),  R (r x d) orthonormal rows; h = the module's output"
    params_formula = ("2 * r * d + r   (d = the module's output width; twice that with share_weights=False "
                      "and both first_n, last_n > 0)")
    layer_types = (nn.Module,)
    mergeable = False
    identity_at_init = False
    # decoder blocks of the tiny Llama/BERT/GPT-2, and the Linear layers of the MLP (outputs 48/32/16)
    test_options = {"targets": r"(.*\.)?(layers|layer|h)\.\d+|[024]"}

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        first_n: int = 0,
        last_n: int = 0,
        share_weights: bool = True,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=0.0)
        # pyreft's LoreftIntervention drops out the whole intervened state Φ(h), not only the edit
        self.edit_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        d = self.out_features
        self.first_n, self.last_n = int(first_n), int(last_n)
        self.share_weights = bool(share_weights)
        self.rotate_layer = _orthonormal_rows(nn.Linear(d, rank, bias=False))  # R (r, d), orthonormal rows
        self.learned_source = nn.Linear(d, rank)  # W (r, d), b (r)
        if self._two_interventions(first_n, last_n, share_weights):  # R', W', b' for the last positions
            self.rotate_layer_suffix = _orthonormal_rows(nn.Linear(d, rank, bias=False))
            self.learned_source_suffix = nn.Linear(d, rank)

    @staticmethod
    def _two_interventions(first_n: int, last_n: int, share_weights: bool) -> bool:
        return not share_weights and first_n > 0 and last_n > 0

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, first_n: int = 0, last_n: int = 0,
                 share_weights: bool = True, **options: Any) -> None:
        for k, v in (("first_n", first_n), ("last_n", last_n)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"loreft option {k} must be a non-negative integer, got {v!r}")
        if not isinstance(share_weights, bool):
            raise ConfigError(f"loreft option share_weights must be True or False, got {share_weights!r}")
        if rank > base.out_features:
            raise ShapeError(f"loreft rank {rank} exceeds the hidden width {base.out_features} of {path!r}")

    @property
    def R(self) -> torch.Tensor:
        return self.rotate_layer.weight  # (r, d)

    def intervene(self, h: torch.Tensor, suffix: bool = False) -> torch.Tensor:
        """Φ(h) = h + Rᵀ (W h + b − R h) for hidden states h (..., d) (then dropout, as pyreft);
        ``suffix``: the last positions' own intervention (share_weights=False)."""
        rotate, source = ((self.rotate_layer_suffix, self.learned_source_suffix) if suffix
                          else (self.rotate_layer, self.learned_source))
        R = rotate.weight  # (r, d)
        delta = source(h) - h @ R.T  # (..., r)   W h + b − R h
        return self.edit_dropout(h + delta @ R)  # (..., d)

    def forward(self, x: torch.Tensor, base_out: Any, base: BaseLayer) -> Any:
        if isinstance(base_out, tuple):  # modules returning (hidden, extras...)
            return (self.forward(x, base_out[0], base), *base_out[1:])
        h = base_out.to(self.R.dtype)
        if not (self.first_n or self.last_n) or h.dim() < 2:
            return self.intervene(h).to(base_out.dtype)
        t = h.shape[-2]
        first = torch.zeros(t, dtype=torch.bool, device=h.device)  # (t,)
        first[: self.first_n] = True
        last = torch.zeros_like(first)
        if self.last_n:
            last[max(0, t - self.last_n) :] = True
        if not self._two_interventions(self.first_n, self.last_n, self.share_weights):
            return torch.where((first | last)[:, None], self.intervene(h), h).to(base_out.dtype)
        h = torch.where(first[:, None], self.intervene(h), h)  # prefix, then suffix (pyvene's order)
        return torch.where(last[:, None], self.intervene(h, suffix=True), h).to(base_out.dtype)

    def check_mergeable(self) -> None:
        raise MergeError("method 'loreft' edits hidden states, not a weight: there is nothing to merge")

    def delta_weight(self) -> torch.Tensor:
        self.check_mergeable()
        raise AssertionError  # unreachable

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        two = cls._two_interventions(options.get("first_n", 0), options.get("last_n", 0),
                                     options.get("share_weights", True))
        return (2 if two else 1) * (2 * rank * out_features + rank)
