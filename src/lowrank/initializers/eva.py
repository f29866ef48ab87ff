"""EVA-style activation init: Explained Variance Adaptation (Paischer et al., 2024), simplified.

collect(): for every target layer, the principal directions of its inputs X (tokens x in) over the
calibration batches, from the exact eigendecomposition of the centred scatter (X - 1 mu^T)^T (X - 1 mu^T)
(accumulated in float64).  As in the paper's code (an incremental PCA) and PEFT, the inputs are
centred, and padding (attention_mask 0) and unlabelled (labels -100) positions are left out.

    A = V_r^T  (the r directions of largest input variance, orthonormal rows),   B = 0

so the model is unchanged at step 0 and W is not modified; the adapter starts reading the input
directions that carry most of the activation variance.  Not implemented from the paper: its
incremental SVD over minibatches with a convergence test (the eigendecomposition here is exact over
all batches), the redistribution of ranks across layers by explained variance (every layer here
gets the same rank), and PEFT's optional whitening (which does not change the subspace).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.adapter import FactorAdapter
from ..core.init import Init
from ..core.layers import BaseLayer
from ..errors import ShapeError
from ..registry import register_init
from ._common import LayerStats, batches_of, input_covariances, parse_options, set_factors


@register_init
class EVA(Init):
    name = "eva"
    paper = "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation (Paischer et al., 2024), arXiv:2410.07170"
    description = "A = top-r right singular vectors of the layer inputs on calibration batches, B = 0"
    needs_calibration = True

    def __init__(self, **options: Any):
        parse_options(self.name, options, {})
        super().__init__(**options)

    def collect(self, model: nn.Module, layers: dict[str, BaseLayer], calibration: Any) -> dict[str, LayerStats]:
        batches = batches_of(calibration, self.name)
        stats = {}
        for path, (cov, n) in input_covariances(model, layers, batches, self.name).items():
            stats[path] = LayerStats(path, {"cov": cov, "rows": torch.tensor(n)})
        return stats

    @torch.no_grad()
    def __call__(self, adapter: FactorAdapter, base: BaseLayer, stats: LayerStats | None = None) -> None:
        cov, n = stats.data["cov"], int(stats.data["rows"])
        r = adapter.rank
        if n < r:
            raise ShapeError(f"init {self.name!r}: {stats.path!r} saw {n} input rows in calibration, fewer than rank {r}")
        evals, evecs = torch.linalg.eigh(cov)  # ascending; centred X^T X = V S^2 V^T
        top = evecs[:, torch.argsort(evals, descending=True)[:r]]  # (in, r)
        set_factors(adapter, top.T, torch.zeros(adapter.out_features, r))
        return None
