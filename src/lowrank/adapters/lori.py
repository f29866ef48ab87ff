"""LoRI: LoRA with Reduced Interference (Zhang et al., 2025).

    h = W x + (alpha/r) (B ⊙ M) A x,   A (r, in) frozen random projection,
                                        B (out, r) trainable, M (out, r) a fixed binary mask

The paper's two phases: LoRI-D trains a dense B over the frozen A; the task-specific mask
M is then calibrated from the magnitudes of the trained B (top (1 - sparsity) entries,
default sparsity 0.9, ranked over all adapted layers by default) and LoRI-S trains B under
that mask.  Here an adapter starts in the dense phase (M = 1); :func:`calibrate_masks` moves
it to the sparse phase.  With M applied in the forward pass, masked entries get exactly zero
gradient, and calibration zeroes them (``reset=True``, the default, restarts B from zero as
LoRI-S does), so B keeps exactly the mask's sparsity through any optimizer steps.

The default alpha is 2r, as in every script of the reference code.

Trainable tensor: the dense (out, r) B (r · out numbers, of which (1 - sparsity) can move
after calibration).  M (bool) is saved with B (it is the task's identity); A is regenerated
from ``seed`` and the module path (the file holds a 1-number fingerprint of it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._checks import is_finite_real
from ..core.inject import adapted_layers
from ..core.layers import BaseLayer
from ..errors import AdapterNotFoundError, ConfigError
from ..registry import register_method
from .asymmetric import FrozenRandomA


@register_method
class LoRI(FrozenRandomA):
    name = "lori"
    paper = "LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation (Zhang et al., 2025), arXiv:2504.07448"
    formula = "h = W x + (alpha/r) (B ⊙ M) A x,  A frozen random, M a magnitude-calibrated mask"
    params_formula = "r * out  (dense storage of B; (1 - sparsity) r out free after calibrate_masks)"

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        sparsity: float = 0.9,
        seed: int = 0,
        shared: int | None = None,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.sparsity = float(sparsity)
        g = self.seeded(seed, shared)
        bound = 1.0 / math.sqrt(self.in_features)  # LoRA's A init, kaiming_uniform(a=sqrt(5))
        self.register_frozen_A(torch.empty(rank, self.in_features).uniform_(-bound, bound, generator=g), base)
        self.register_buffer("lori_mask", torch.ones(self.out_features, rank, dtype=torch.bool))  # M, all True = dense phase
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))  # (out, r)

    @classmethod
    def default_alpha(cls, rank: int) -> float:
        return 2.0 * rank  # lora_alpha = 2 r in the reference's scripts

    @property
    def B(self) -> torch.Tensor:  # the effective sparse factor B ⊙ M
        return self.lora_B * self.lori_mask

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        cls.check_rank_fits(base, rank, path)
        s = options.get("sparsity", 0.9)
        if not is_finite_real(s) or not 0.0 <= s < 1.0:
            raise ConfigError(f"lori option sparsity must be in [0, 1), got {s!r} (module {path!r})")


@torch.no_grad()
def calibrate_masks(model: nn.Module, name: str = "default", *, scope: str = "model", reset: bool = True) -> dict[str, float]:
    """Set each LoRI adapter's mask from the magnitudes of its (dense-phase) B.

    scope "model" ranks |B| over all adapted layers together (one global threshold), "layer"
    keeps the top (1 - sparsity) entries of every layer.  ``reset`` restarts B from zero
    (the sparse phase trains from scratch under the mask); otherwise B keeps its masked values.
    Returns the resulting sparsity per module.  Raises ConfigError before changing anything.
    """
    if scope not in ("model", "layer"):
        raise ConfigError(f"calibrate_masks scope must be 'model' or 'layer', got {scope!r}")
    layers = [(p, layer.adapters[name]) for p, layer in adapted_layers(model) if name in layer.adapters]
    layers = [(p, a) for p, a in layers if isinstance(a, LoRI)]
    if not layers:
        raise AdapterNotFoundError(f"model has no LoRI adapter named {name!r}")
    if any(a.lora_B.abs().max() == 0 for _, a in layers):
        empty = [p for p, a in layers if a.lora_B.abs().max() == 0]
        raise ConfigError(f"calibrate_masks needs a trained dense B (LoRI-D); B is still zero at {empty[0]!r}")
    if scope == "model":
        scores = torch.cat([a.lora_B.abs().flatten().float().cpu() for _, a in layers])
        sparsity = layers[0][1].sparsity
        keep = max(1, int((1.0 - sparsity) * scores.numel()))  # rounded down, as the reference
        thresh = torch.topk(scores, keep).values.min()
    out: dict[str, float] = {}
    for p, a in layers:
        score = a.lora_B.abs()
        if scope == "layer":
            keep = max(1, int((1.0 - a.sparsity) * score.numel()))
            idx = torch.topk(score.flatten(), keep).indices
            mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
            mask[idx] = True
            mask = mask.view_as(score)
        else:
            mask = score >= thresh.to(score.device)
        a.lori_mask.copy_(mask)
        if reset:
            a.lora_B.zero_()
        else:
            a.lora_B.mul_(mask)
        out[p] = 1.0 - float(mask.float().mean())
    return out
