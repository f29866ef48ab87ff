"""Modules that adapters train in full (``modules_to_save``).

The model keeps one live copy of such a module, in place, so weight ties and an optimizer's
references stay valid.  Beside it are kept the module's values from before any adapter touched it
(the *original*) and, for each adapter that saves it but is not shown, that adapter's own values.
The live copy shows the one active adapter that saves the module, or the original when none is
active or inside :func:`lowrank.disabled` (as PEFT runs its frozen original there).  Several
adapters may each save their own copy of a module, but only one of them may be active at a time.

State on the model, ``_lowrank_saved``: path -> ``{"original": tensors, "shown": adapter name or
None, "kept": {adapter name: tensors}}``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

State = dict[str, torch.Tensor]


def _records(model: nn.Module, create: bool = False) -> dict[str, dict]:
    if create:
        return model.__dict__.setdefault("_lowrank_saved", {})
    return model.__dict__.get("_lowrank_saved", {})


def _snapshot(module: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


@torch.no_grad()
def _put(module: nn.Module, values: State) -> None:
    live = module.state_dict(keep_vars=True)
    for k, v in values.items():
        live[k].copy_(v)  # in place: the same tensors (ties, optimizer state) now hold ``values``


def owners(model: nn.Module) -> dict[str, list[str]]:
    """path -> the adapters that save that module in full."""
    out: dict[str, list[str]] = {}
    for name, paths in getattr(model, "_lowrank_modules_to_save", {}).items():
        for q in paths:
            out.setdefault(q, []).append(name)
    return out


def shown(model: nn.Module) -> dict[str, str | None]:
    """path -> the adapter whose values the module holds now (None: the original)."""
    return {q: rec["shown"] for q, rec in _records(model).items()}


def show(model: nn.Module, want: dict[str, str | None]) -> None:
    """Make each module in ``want`` hold that adapter's values (None: the original ones).

    Every value shown now is kept before any is replaced: two saved paths can hold one tensor
    (tied weights), and putting one must not overwrite what the other still has to keep.
    """
    records = _records(model)
    moves = [(q, owner) for q, owner in want.items() if q in records and records[q]["shown"] != owner]
    for q, _ in moves:
        rec = records[q]
        if rec["shown"] is not None:
            rec["kept"][rec["shown"]] = _snapshot(model.get_submodule(q))
    for q, owner in moves:
        rec = records[q]
        _put(model.get_submodule(q), rec["original"] if owner is None else rec["kept"].pop(owner))
        rec["shown"] = owner


def shown_for(model: nn.Module, active: Iterable[str]) -> dict[str, str | None]:
    """What each saved module should show when ``active`` are the active adapters."""
    active = set(active)
    return {q: next((n for n in names if n in active), None) for q, names in owners(model).items()}


def claim(model: nn.Module, paths: Iterable[str], owner: str) -> None:
    """``owner`` starts its own copy of ``paths`` from their original values and is shown (call
    when the adapter is added, before it changes or loads them)."""
    paths = list(paths)
    if not paths:
        return
    records = _records(model, create=True)
    show(model, {q: None for q in paths if q in records})  # another owner's copy is kept aside
    for q in paths:
        if q not in records:
            records[q] = {"original": _snapshot(model.get_submodule(q)), "shown": owner, "kept": {}}
        records[q]["shown"] = owner


def owner_state(model: nn.Module, path: str, owner: str) -> State:
    """Adapter ``owner``'s values of the saved module ``path``, whichever values it holds now."""
    rec = _records(model).get(path)
    live = model.get_submodule(path).state_dict()
    if rec is not None and rec["shown"] != owner:  # kept aside: as the live tensors are now (.to(), .double())
        return {k: v.to(device=live[k].device, dtype=live[k].dtype) for k, v in rec["kept"][owner].items()}
    return live


def drop(model: nn.Module, owner: str, paths: Iterable[str]) -> None:
    """``owner`` gives up its copies of ``paths``: a module it shows goes back to its original
    values, and a module no other adapter saves is a plain module again."""
    records = _records(model)
    others = {q: [n for n in names if n != owner] for q, names in owners(model).items()}
    for q in paths:
        rec = records.get(q)
        if rec is None:
            continue
        if rec["shown"] == owner:
            show(model, {q: None})
        rec["kept"].pop(owner, None)
        if not others.get(q):
            del records[q]
    if not records:
        forget(model)


def forget(model: nn.Module) -> None:
    """Drop the kept values (the live modules stay as they are)."""
    model.__dict__.pop("_lowrank_saved", None)
