"""The reference rows: ``full`` (every weight trained with AdamW) and ``head`` (only the task head).

``full`` is full fine-tuning on ``finetune`` and full-rank AdamW pretraining on ``pretrain``:
the row every other method's gap is measured against.  ``head`` trains only the modules the
task adds (the classifier): a linear probe of the frozen pretrained encoder, the untuned
baseline that fine-tuning must beat.  Both save full weights (safetensors) with
:func:`save_full_weights`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError
from . import Prepared, TaskInfo, register_recipe
from ._defaults import adamw, default_lr


def save_full_weights(model: nn.Module, path: Path) -> None:
    """All weights as ``model.safetensors`` (+ ``config.json``): ``save_pretrained`` when the model has it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(path), safe_serialization=True)
        return
    seen: dict[int, str] = {}
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for k, v in model.state_dict(keep_vars=False).items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        h = hash(key)
        if h in seen:
            tied[k] = seen[h]
            continue
        seen[h] = k
        state[k] = v.detach().cpu().contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt", "tied": json.dumps(tied)})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        (path / "config.json").write_text(config.to_json_string())


def _adamw(model: nn.Module, lr: float, weight_decay: float, betas: Any, eps: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the recipe left no trainable parameter")
    return adamw(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


@register_recipe("full", "full", "every weight trained with AdamW (full fine-tuning / full-rank pretraining)")
def full(
    model: nn.Module,
    task: TaskInfo,
    *,
    lr: float | None = None,
    rank: int | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    lr = default_lr("full", task.kind) if lr is None else lr
    opt = _adamw(model, lr, weight_decay, betas, eps)
    return Prepared(model, opt, save=save_full_weights, info={"method": "full", "lr": lr})


@register_recipe(
    "head", "full", "only the task head trained (linear probe of the frozen model: the untuned baseline)", ("finetune",)
)
def head(
    model: nn.Module,
    task: TaskInfo,
    *,
    lr: float | None = None,
    rank: int | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Prepared:
    if not task.head_modules:
        raise ConfigError("recipe 'head' trains the task head only, and this task adds none (use a classification task)")
    mods = dict(model.named_modules())
    missing = [m for m in task.head_modules if m not in mods]
    if missing:
        raise ConfigError(f"recipe 'head': head module(s) {missing} not found in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in task.head_modules:
        for p in mods[m].parameters():
            p.requires_grad_(True)
    lr = default_lr("head", task.kind) if lr is None else lr
    opt = _adamw(model, lr, weight_decay, betas, eps)
    return Prepared(model, opt, save=save_full_weights, info={"method": "head", "lr": lr})
