"""Defaults shared by the built-in recipes (full, head, adapters, pretraining): learning rates,
ranks, and the AdamW they build.

They are the values a short run on the built-in tasks needs, not tuned per method: a recipe's
``lr``/``rank`` arguments and ``--method-options`` override them.
"""

from __future__ import annotations

import torch
from torch import nn

#: (recipe family, task kind) -> AdamW learning rate
DEFAULT_LR: dict[tuple[str, str], float] = {
    ("full", "finetune"): 2e-4,
    ("full", "pretrain"): 2e-3,
    ("head", "finetune"): 5e-3,
    ("adapter", "finetune"): 2e-3,
    ("adapter", "pretrain"): 2e-3,
}


def default_lr(family: str, kind: str) -> float:
    return DEFAULT_LR.get((family, kind), DEFAULT_LR[("adapter", "finetune")])


def default_rank(model: nn.Module, kind: str) -> int:
    """8 for fine-tuning; a quarter of the hidden size for pretraining (GaLore's ratio at 60M)."""
    if kind != "pretrain":
        return 8
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return max(4, int(hidden) // 4) if isinstance(hidden, int) else 32


def adamw(params: list[torch.Tensor], **kw) -> torch.optim.Optimizer:
    """torch's AdamW, fused where torch has the kernel for these tensors (one pass per tensor; on
    CPU about 3x faster a step than the multi-tensor path over an adapter's ~100 small tensors, and
    the same math to rounding), else its default implementation."""
    fusable = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
                  for p in params)
    if fusable:
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except RuntimeError:  # a device/dtype this build cannot fuse
            pass
    return torch.optim.AdamW(params, **kw)
