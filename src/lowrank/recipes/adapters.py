"""Every registered adapter method (and every registered init) is a recipe, with AdamW.

For a method ``m`` the recipe is ``lowrank.adapt(model, m, rank=..., **options)`` with the
task's head modules kept out of the targets and trained in full beside the adapter
(``modules_to_save``), then AdamW over the trainable parameters, saved with
``save_adapter``.  For an init ``i`` (PiSSA, ...) the recipe is LoRA with ``init=i``; inits
that read data get a few training batches as calibration.  Nothing here names a method:
the recipes are generated from the registries, so a new method file is a new recipe.

A recipe registered explicitly elsewhere under the same name (a parameterisation with its
own pretraining recipe, say) takes precedence: the sibling recipe modules are imported first
and only the names still free are generated here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Iterable, Sequence

from torch import nn

from .. import recipes as _pkg
from ..core.api import adapt
from ..core.io import save_adapter
from ..registry import get_init, get_method, inits, methods
from . import _RECIPES, Prepared, TaskInfo, register_recipe
from ._defaults import adamw, default_lr, default_rank


def _build(
    method: str,
    init_name: str | None,
    model: nn.Module,
    task: TaskInfo,
    *,
    lr: float | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: str | Sequence[str] = "all-linear",
    exclude: str | Sequence[str] | None = None,
    init: str | None = None,
    init_options: dict[str, Any] | None = None,
    calibration: Iterable[Any] | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **method_options: Any,
) -> Prepared:
    rank = default_rank(model, task.kind) if rank is None else int(rank)
    init = init if init is not None else init_name
    heads = list(task.head_modules)
    excl: Any = exclude
    if heads:
        excl = heads + ([exclude] if isinstance(exclude, str) else list(exclude or []))
        if isinstance(exclude, str):  # a regex cannot be merged with a name list: anchor the names into it
            import re

            excl = "|".join([exclude] + [rf"(.*\.)?{re.escape(h)}" for h in heads])
    needs_cal = init is not None and get_init(init).needs_calibration
    adapt(
        model,
        method,
        targets=targets,
        rank=rank,
        alpha=alpha,
        init=init,
        dropout=dropout,
        exclude=excl,
        modules_to_save=heads or None,
        calibration=calibration if needs_cal else None,
        init_options=init_options,
        **method_options,
    )
    lr = default_lr("adapter", task.kind) if lr is None else lr
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
    info = {"method": method, "rank": rank, "lr": lr, "init": init, "options": dict(method_options)}
    return Prepared(model, opt, save=lambda m, path: save_adapter(m, path), info=info)


def _method_recipe(method: str):
    def build(model: nn.Module, task: TaskInfo, *, calibration: Iterable[Any] | None = None, **kw: Any) -> Prepared:
        return _build(method, None, model, task, calibration=calibration, **kw)

    build.__doc__ = f"lowrank.adapt(model, {method!r}, ...) + AdamW"
    build.__name__ = f"recipe_{method}"
    return build


def _init_recipe(init: str):
    def build(model: nn.Module, task: TaskInfo, *, calibration: Iterable[Any] | None = None, **kw: Any) -> Prepared:
        method = kw.pop("method", "lora")
        return _build(method, init, model, task, calibration=calibration, **kw)

    build.__doc__ = f"lowrank.adapt(model, 'lora', init={init!r}, ...) + AdamW"
    build.__name__ = f"recipe_init_{init}"
    return build


def _register_generated() -> None:
    # explicit recipes first: import the sibling modules (the registry's loader skips them later)
    for mod in pkgutil.iter_modules(_pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "adapters":
            importlib.import_module(f"{_pkg.__name__}.{mod.name}")
    for name in methods():
        if name in _RECIPES:
            continue
        cls = get_method(name)
        kind = "parameterisation" if cls.replaces_base else "adapter"
        desc = (cls.paper.split(" (")[0] or name) + " + AdamW"
        register_recipe(name, kind, desc)(_method_recipe(name))
    for name in inits():
        if name in _RECIPES:
            continue
        icls = get_init(name)
        desc = f"LoRA initialised with {name}: {icls.description or icls.paper}"
        register_recipe(name, "adapter", desc, ("finetune",))(_init_recipe(name))


_register_generated()
