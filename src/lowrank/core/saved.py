"""Modules an adapter trains in full (``modules_to_save``).

The model keeps one live copy of such a module, in place, so weight ties and the optimizer's
references stay as they are.  Its values before the adapter touched them are kept aside: they are
what the module shows while its adapter is not applied (inside :func:`lowrank.disabled`, or when
the adapter is not active), as PEFT runs its frozen original there.  The adapter's own values are
then kept aside in turn, and are what it saves.

State on the model: ``_lowrank_saved_originals`` (path -> tensors before the adapter) and
``_lowrank_saved_stash`` (path -> the adapter's tensors while the original is shown).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


@torch.no_grad()
def _put(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    live = module.state_dict(keep_vars=True)
    for k, v in values.items():
        live[k].copy_(v)


def remember_originals(model: nn.Module, paths: Iterable[str]) -> None:
    """Keep the current values of ``paths`` as their originals (call before an adapter changes them)."""
    originals = model.__dict__.setdefault("_lowrank_saved_originals", {})
    for q in paths:
        if q not in originals:
            originals[q] = _snapshot(model.get_submodule(q))


def owner_state(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """The owning adapter's values of a saved module, whichever values the model shows now."""
    stash = model.__dict__.get("_lowrank_saved_stash", {})
    return dict(stash[path]) if path in stash else model.get_submodule(path).state_dict()


def show(model: nn.Module, owners_applied: dict[str, bool]) -> None:
    """Make each saved module show its owner's values (True) or its original ones (False)."""
    originals = model.__dict__.get("_lowrank_saved_originals", {})
    stash = model.__dict__.setdefault("_lowrank_saved_stash", {})
    for q, applied in owners_applied.items():
        module = model.get_submodule(q)
        if applied and q in stash:
            _put(module, stash.pop(q))
        elif not applied and q not in stash and q in originals:
            stash[q] = _snapshot(module)
            _put(module, originals[q])


def saved_paths(model: nn.Module) -> dict[str, str]:
    """path -> owning adapter, for every module saved in full."""
    return {q: name for name, paths in model.__dict__.get("_lowrank_modules_to_save", {}).items() for q in paths}


def forget(model: nn.Module) -> None:
    for attr in ("_lowrank_saved_originals", "_lowrank_saved_stash"):
        model.__dict__.pop(attr, None)
