"""``galore(...)``: the public factory of the low-rank wrapper (GaLore, Zhao et al. 2024, arXiv:2403.03507)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .optimizer import LowRankOptimizer, build
from .projectors import make_projector
from .transforms import make_inner
from .wrapper import LowRank

# galore-torch, fira and apollo-torch all default to transformers' AdamW eps of 1e-6
REFERENCE_EPS = 1e-6


def _inner(inner: str, inner_options: dict[str, Any]):
    opts = dict(inner_options)
    if inner == "adamw":
        opts.setdefault("eps", REFERENCE_EPS)
    return make_inner(inner, **opts)


def make(cls, method: str, model_or_named_parameters, *, lr: float, rank: int, update_gap: int, scale: float,
         projector: str, inner: str, targets, rotate_moments: bool, weight_decay: float, nonfinite: str,
         layerwise: bool, accumulation_steps: int, seed: int, projector_options: dict | None,
         inner_options: dict, extra: dict | None = None, plain_inner: str | None = None) -> LowRankOptimizer:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"{method}: seed must be a non-negative int, got {seed!r}")
    inner_t = _inner(inner, inner_options)
    plain_t = inner_t if plain_inner in (None, inner) else _inner(plain_inner, {})
    proj = make_projector(projector, rank, seed=seed, **(projector_options or {}))
    tf = cls(inner_t, proj, rank=rank, update_gap=update_gap, scale=scale, rotate_moments=rotate_moments,
             **(extra or {}))
    info = {"projector": projector}   # scale, update_gap and the inner's betas/eps come from tf.hyper()
    return build(model_or_named_parameters, method=method, lr=lr, rank=rank, transform=tf, plain=plain_t,
                 inner_name=inner, targets=targets, weight_decay=weight_decay, nonfinite=nonfinite,
                 layerwise=layerwise, accumulation_steps=accumulation_steps, info=info)


def galore(model_or_named_parameters, lr: float = 1e-3, rank: int = 128, update_gap: int = 200,
           scale: float = 0.25, projector: str = "randomized", inner: str = "adamw", targets=None, *,
           rotate_moments: bool = False, weight_decay: float = 0.0, nonfinite: str = "skip",
           layerwise: bool = False, accumulation_steps: int = 1, seed: int = 0,
           projector_options: dict | None = None, **inner_options) -> LowRankOptimizer:
    """GaLore around any inner optimizer (``adamw``, ``adafactor``, ``sgd``, ``lion``).

    Projected: ``targets`` (default: the 2-D weights of the transformer blocks); every other
    trainable parameter (embeddings, norms, head, biases) gets the plain inner optimizer.
    ``inner_options`` (``betas``, ``eps``, ...) go to the inner optimizer; AdamW's eps defaults
    to 1e-6 as in galore-torch.  ``layerwise=True`` runs each update in a post-accumulate-grad
    hook (no gradient accumulation, no global clipping).  ``nonfinite`` = ``"skip"`` (count in
    ``optimizer.skipped_steps``) or ``"raise"``.
    """
    return make(LowRank, "galore", model_or_named_parameters, lr=lr, rank=rank, update_gap=update_gap, scale=scale,
                projector=projector, inner=inner, targets=targets, rotate_moments=rotate_moments,
                weight_decay=weight_decay, nonfinite=nonfinite, layerwise=layerwise,
                accumulation_steps=accumulation_steps, seed=seed, projector_options=projector_options,
                inner_options=inner_options)
