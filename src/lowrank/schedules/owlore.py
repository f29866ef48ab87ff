"""OwLore: Outlier-weighted Layerwise sampled Low-Rank projection for memory-efficient LLM
fine-tuning (Li et al., 2024), arXiv:2405.18380.

LISA's layer sampling with non-uniform probabilities: blocks with more *outliers* are drawn
more often.  A block's outlier ratio follows OWL's layerwise outlier distribution:

    score_ij = |W_ij| · ‖X_j‖₂        (‖X_j‖: norm of input feature j, 1 without calibration)
    D_l      = #{score > M · mean(score)} / #scores,  over the scores of ALL the block's linear
               layers pooled (OWL's ``check_outlier_mean`` on the block's concatenated metrics)
    p_l      = D_l / Σ_k D_k           (uniform if no block has outliers)

``n_layers`` blocks are drawn without replacement with probabilities p every ``interval``
steps (the ratios are re-measured on the current weights at each draw).  The paper pairs the
sampling with GaLore-style gradient projection for the sampled blocks: that is the
optimizer's job (the ``owlore`` recipe uses ``lowrank.optim`` GaLore when it is available,
else AdamW — see the recipe).  Unsampled blocks hold no gradient and no optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.layers import LINEAR_TYPES, BaseLayer
from .base import check_real
from .lisa import LISA


def _scores(weight: torch.Tensor, input_norm: torch.Tensor | None) -> torch.Tensor:
    score = weight.detach().float().abs()  # (out, in)  |W_ij| · ‖X_j‖
    return score * input_norm.float()[None, :] if input_norm is not None else score


@torch.no_grad()
def outlier_ratio(weights, threshold: float, input_norms=None) -> float:
    """Fraction of the scores |W_ij| · ‖X_j‖ above ``threshold`` x their mean.  ``weights``: one
    (out, in) matrix, or a list of them whose scores are pooled (a block, as OWL); ``input_norms``
    alike (a tensor, a list with None entries, or None)."""
    if isinstance(weights, torch.Tensor):
        weights, input_norms = [weights], [input_norms]
    norms = input_norms if input_norms is not None else [None] * len(weights)
    score = torch.cat([_scores(w, n).flatten() for w, n in zip(weights, norms)])
    return float((score > threshold * score.mean()).float().mean())


class OwLore(LISA):
    name = "owlore"
    paper = "OwLore: Outlier-weighted Layerwise Sampled Low-Rank Projection for Memory-Efficient LLM Fine-tuning (Li et al., 2024), arXiv:2405.18380"

    def __init__(
        self,
        n_layers: int = 2,
        interval: int = 20,
        *,
        outlier_threshold: float = 5.0,
        input_norms: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
    ):
        super().__init__(n_layers, interval, seed=seed)
        check_real("owlore", "outlier_threshold", outlier_threshold, 0.0, open_low=True)
        self.outlier_threshold = float(outlier_threshold)
        self.input_norms = input_norms or {}
        self._blocks: nn.ModuleList | None = None
        self.ratios: list[float] = []

    def setup(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        self._blocks = blocks

    def block_ratios(self) -> list[float]:
        assert self._blocks is not None
        ratios = []
        for i, block in enumerate(self._blocks):
            ws, norms = [], []
            for path, mod in block.named_modules():
                inner = getattr(mod, "base_layer", mod)
                if ".adapters." in f".{path}.":
                    continue  # adapter factors are not the block's weights
                if isinstance(inner, LINEAR_TYPES) and mod is inner:
                    ws.append(BaseLayer(inner).weight)
                    norms.append(self.input_norms.get(f"{self.blocks_path}.{i}.{path}"))
            ratios.append(outlier_ratio(ws, self.outlier_threshold, norms) if ws else 0.0)
        return ratios

    def probabilities(self, n_blocks: int) -> torch.Tensor:
        self.ratios = self.block_ratios()
        d = torch.tensor(self.ratios, dtype=torch.float64)
        if d.sum() <= 0:
            return torch.full((n_blocks,), 1.0 / n_blocks)
        d = d.clamp_min(1e-6 * float(d.max()))  # every block stays drawable
        return d / d.sum()

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "ratios": list(self.ratios)}
