"""LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou, Ghosh, Yu, 2024), arXiv:2402.12354.

AdamW with the learning rate of B set to ``ratio`` times that of A:

    lr_A = lr,   lr_B = ratio · lr,   other trainables (heads, ...) at lr

As in the authors' reference (``create_loraplus_optimizer``), factors of adapters on embedding
layers get their own small learning rate ``lr_embedding`` (1e-6) instead.  One difference: the
reference also moves every 1-D trainable parameter (biases, norms) into B's group at
``ratio · lr``; here they stay at ``lr`` like the other non-factor parameters.  As the reference
(the transformers Trainer's rule), biases and LayerNorm parameters get no weight decay.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._common import AdapterOptimizer, adamw_state_bytes, check_hparams, factor_pairs, other_trainables
from ...errors import ConfigError


class LoRAPlus(AdapterOptimizer):
    who = "loraplus"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        *,
        ratio: float = 16.0,
        lr_embedding: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        nonfinite: str = "skip",
    ):
        check_hparams(self.who, lr, betas, eps, weight_decay)
        if not ratio > 0:
            raise ConfigError(f"loraplus: ratio (lr_B / lr_A) must be > 0, got {ratio!r}")
        if not lr_embedding >= 0:
            raise ConfigError(f"loraplus: lr_embedding must be >= 0, got {lr_embedding!r}")
        pairs = factor_pairs(model, self.who)
        emb = [p for p in pairs if isinstance(getattr(model.get_submodule(p.path), "base_layer", None), nn.Embedding)]
        lin = [p for p in pairs if p not in emb]
        other = other_trainables(model, pairs)
        no_decay = _no_decay(model)
        groups: list[dict[str, Any]] = [
            {"params": [p.A for p in lin], "lr": lr, "role": "A"},
            {"params": [p.B for p in lin], "lr": ratio * lr, "role": "B"},
            {"params": [t for p in emb for t in (p.A, p.B)], "lr": lr_embedding, "role": "embedding"},
            {"params": [t for t in other if id(t) not in no_decay], "lr": lr, "role": "other"},
            {"params": [t for t in other if id(t) in no_decay], "lr": lr, "weight_decay": 0.0, "role": "other_no_decay"},
        ]
        groups = [g for g in groups if g["params"]]
        self.ratio = float(ratio)
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), nonfinite=nonfinite)

    @staticmethod
    def expected_state_bytes(model: nn.Module) -> int:
        """State bytes by formula (2 moments per trainable tensor), without allocating (meta models work)."""
        return adamw_state_bytes(t for t in model.parameters() if t.requires_grad)

    def _step(self) -> None:
        for group in self.param_groups:
            self._adamw_group(group)


def _no_decay(model: nn.Module) -> set[int]:
    """ids of biases and LayerNorm parameters (the reference's, i.e. the transformers Trainer's,
    parameters without weight decay)."""
    out = {id(p) for n, p in model.named_parameters() if "bias" in n}
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            out.update(id(p) for p in m.parameters(recurse=False))
    return out


def loraplus(model: nn.Module, lr: float = 1e-4, ratio: float = 16.0, **options: Any) -> LoRAPlus:
    """LoRA+ AdamW for an adapted model: B's learning rate is ``ratio`` times A's (default 16).

    Options: ``lr_embedding`` (1e-6), ``betas``, ``eps``, ``weight_decay``, ``nonfinite``.
    """
    return LoRAPlus(model, lr, ratio=ratio, **options)
