"""The public operations on an adapted model."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import AdapterNotFoundError, ConfigError, MergeError
from ..registry import get_init, get_method
from .init import Init
from .layers import is_released
from .inject import (
    _set_submodule,
    adapted_layers,
    adapter_names,
    check_new_name,
    check_saved_modules,
    commit_adapters,
    mark_trainable,
    plan_adapters,
    resolve_saved,
)
from .saved import claim, drop, forget, owners, show, shown, shown_for


def adapt(
    model: nn.Module,
    method: str = "lora",
    targets: str | Sequence[str] = "all-linear",
    rank: int = 8,
    alpha: float | None = None,
    init: str | Init | None = None,
    dropout: float = 0.0,
    exclude: str | Sequence[str] | None = None,
    *,
    name: str = "default",
    calibration: Iterable[Any] | None = None,
    modules_to_save: Sequence[str] | None = None,
    init_options: dict[str, Any] | None = None,
    **method_options: Any,
) -> nn.Module:
    """Inject adapters of ``method`` into ``model`` in place and freeze everything else.

    Args:
        targets: ``"all-linear"`` (every Linear/Conv1D except the output head), a list of
            module-name suffixes, or a regex matched against full module paths.
        rank, alpha: the update's rank and scale (alpha defaults per method, LoRA: alpha = rank).
        init: an init strategy name (``lowrank.inits()``) or object; None uses the method's own.
        exclude: module names or a regex to leave out.
        name: adapters are named; several can live on one model (see :func:`set_active`).
        calibration: batches for inits that read data (LoRA-GA, EVA, ...).
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a head).
            Each adapter trains its own copy, starting from the original values, which are kept
            aside (one extra copy) for :func:`disabled`; one active adapter's copy is shown at a time.
        method_options: the method's own keyword options (``lowrank.method_info(method)``).

    On bad input a :class:`lowrank.LowRankError` is raised and the model is left unchanged.
    """
    method_cls = get_method(method)
    init_obj: Init | None
    if init is None or isinstance(init, Init):
        init_obj = init
    else:
        init_obj = get_init(init)(**(init_options or {}))
    check_new_name(model, name)
    saved = []
    if modules_to_save:
        entries = [modules_to_save] if isinstance(modules_to_save, str) else modules_to_save
        if not isinstance(entries, (list, tuple)) or not all(isinstance(t, str) and t for t in entries):
            raise ConfigError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
        saved = resolve_saved(model, entries)
    held = [q for q, names in owners(model).items() if any(n != name for n in names)]  # saved by other adapters
    # as PEFT: under all-linear a module saved in full (by this adapter or another) is not also adapted
    skip = saved + held if isinstance(targets, str) and targets == "all-linear" else []
    planned = plan_adapters(
        model,
        method_cls,
        name=name,
        targets=targets,
        exclude=exclude,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        init=init_obj,
        calibration=calibration,
        options=method_options,
        skip=skip,
    )
    check_saved_modules(model, name, saved, [p.path for p in planned])
    # -- commit: nothing below can fail on bad input ------------------------------------------
    record = {
        "method": method,
        "rank": rank,
        "alpha": planned[0].adapter.alpha,
        "dropout": float(dropout),
        "init": getattr(init_obj, "name", None),
        "init_options": dict(getattr(init_obj, "options", {}) or {}),
        "options": dict(method_options),
        "targets": [p.path for p in planned],
        "modules_to_save": saved,
    }
    claim(model, saved, name)  # its own copies, starting from the original values
    _register_record(model, name, record)
    commit_adapters(model, planned, name)
    return model


def _register_record(model: nn.Module, name: str, record: dict[str, Any]) -> None:
    if not hasattr(model, "_lowrank_adapters"):
        model._lowrank_adapters = {}  # type: ignore[attr-defined]
        model._lowrank_modules_to_save = {}  # type: ignore[attr-defined]
    model._lowrank_adapters[name] = record  # type: ignore[attr-defined]
    model._lowrank_modules_to_save[name] = list(record["modules_to_save"])  # type: ignore[attr-defined]


def adapter_record(model: nn.Module, name: str = "default") -> dict[str, Any]:
    """How the named adapter was created (method, rank, alpha, options, targets)."""
    rec = getattr(model, "_lowrank_adapters", {})
    if name not in rec:
        raise AdapterNotFoundError(f"model has no adapter named {name!r}; it has {sorted(rec) or 'none'}")
    return rec[name]


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Choose which adapters are applied; only those are trainable.

    Their updates sum: each is taken against the base layer (W x + b), so the order of ``names``
    does not matter, and merging several folds W + Σ ΔW_i.  (PEFT applies a DoRA adapter to the
    running output of the adapters before it, so stacked DoRA outputs there depend on the order.)
    """
    if isinstance(names, str):
        wanted = [names]
    elif isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        wanted = list(names)
    else:
        raise ConfigError(f"set_active takes an adapter name or a list of names, got {names!r}")
    known = adapter_names(model)
    for n in wanted:
        if n not in known:
            raise AdapterNotFoundError(f"model has no adapter named {n!r}; it has {known or 'none'}")
    for _, layer in adapted_layers(model):
        if layer.merged:
            raise ConfigError("unmerge the model before changing the active adapters")
    for q, names in owners(model).items():
        both = [n for n in names if n in wanted]
        if len(both) > 1:
            raise ConfigError(f"adapters {both} each train their own copy of {q!r}; the model shows one copy "
                              "at a time, so activate only one of them")
    for _, layer in adapted_layers(model):
        layer.active = [n for n in wanted if n in layer.adapters]
    mark_trainable(model, wanted)
    # a module saved in full shows the copy of its active adapter, or its original (as PEFT);
    # inside disabled() the originals stay until it ends
    if not model.__dict__.get("_lowrank_disabled_depth"):
        show(model, shown_for(model, wanted))


def active_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        names.update(dict.fromkeys(layer.active))
    return list(names)


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (forward then skips them)."""
    layers = list(adapted_layers(model))
    for path, layer in layers:  # check first so a refusal changes nothing
        try:
            layer.check_mergeable([n for n in layer.active if n not in layer.merged])
        except MergeError as e:
            raise MergeError(f"module {path!r}: {e}") from None
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the base weights."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters are skipped (merged ones are unmerged for the duration), and
    modules saved in full (``modules_to_save``) show their values from before the adapter.

    After an init that moved part of W into the adapter (PiSSA, MiLoRA, OLoRA, LoRA-GA, ...) the
    base layer holds the residual W, so this runs the residual model (as PEFT does).
    """
    layers = [layer for _, layer in adapted_layers(model)]
    remerge = {id(layer): list(layer.merged) for layer in layers}
    was = {id(layer): layer.disabled for layer in layers}
    depth = model.__dict__.get("_lowrank_disabled_depth", 0)
    model.__dict__["_lowrank_disabled_depth"] = depth + 1
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        show(model, dict.fromkeys(shown(model)))  # every module saved in full: its original values
        yield model
    finally:
        if depth:
            model.__dict__["_lowrank_disabled_depth"] = depth
        else:
            model.__dict__.pop("_lowrank_disabled_depth", None)
        now = [layer for _, layer in adapted_layers(model)]
        for layer in now:  # layers wrapped inside the block (adapt there) were disabled until now
            layer.disabled = was.get(id(layer), bool(depth))
        for layer in now:
            if remerge.get(id(layer)):
                layer.merge(remerge[id(layer)])
        if not depth:  # the copies of the adapters active now (set_active may have run inside)
            show(model, shown_for(model, active_adapters(model)))


def unload(model: nn.Module, merge_adapters: bool = True) -> nn.Module:
    """Give back a plain model: merge the active adapters (unless told not to) and drop all wrappers.

    With ``merge_adapters=False`` the base layers are returned as they are: after a PiSSA-like init
    that is the residual W (save the adapter with ``convert_to_lora=True`` to keep the original W usable).
    """
    layers = list(adapted_layers(model))
    if merge_adapters:
        merge(model)
    show(model, shown_for(model, active_adapters(model)))  # also inside disabled(): the active copies
    for path, layer in reversed(layers):  # innermost first: a wrapped block's layers live under its base_layer
        _set_submodule(model, path, layer.base_layer) if path else None
    _forget_adapters(model)  # modules saved in full keep the values they show (the active adapter's copy)
    return model


def _forget_adapters(model: nn.Module) -> None:
    """Drop the model's adapter bookkeeping (records, saved-module owners and kept copies)."""
    for attr in ("_lowrank_adapters", "_lowrank_modules_to_save"):
        model.__dict__.pop(attr, None)
    forget(model)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``: its modules on every layer, its record, and its copies of modules
    saved in full (a module no adapter saves any more gets its original values back and is
    frozen).  A layer left with no adapter is given back as its plain base layer; the name can
    then be used again.

    Refused, with the model unchanged, while the adapter is merged into a layer (unmerge first),
    when its init moved part of the base weight into it (PiSSA, MiLoRA, ...: the layer would keep
    the residual W; unload instead, or save with ``convert_to_lora=True``), or when it replaces
    the base weight and that weight was released (``parameterise(..., release_base=True)``: save with
    ``plain_state_dict``).
    """
    from .io import base_delta

    if model.__dict__.get("_lowrank_disabled_depth"):
        raise ConfigError(f"delete_adapter({name!r}) inside lowrank.disabled(): the block re-merges and re-enables "
                          "the adapters when it ends; delete after it")
    if name not in adapter_names(model):
        raise AdapterNotFoundError(f"model has no adapter named {name!r}; it has {adapter_names(model) or 'none'}")
    layers = [(path, layer) for path, layer in adapted_layers(model) if name in layer.adapters]
    for path, layer in layers:  # check everything first, so a refusal changes nothing
        adapter = layer.adapters[name]
        if name in layer.merged:
            raise MergeError(f"module {path!r}: adapter {name!r} is merged into it; unmerge before deleting it")
        w = getattr(layer.base_layer, "weight", None)
        if adapter.replaces_base and isinstance(w, torch.Tensor) and is_released(w):
            raise ConfigError(f"module {path!r}: adapter {name!r} replaces the base weight, which was released, so "
                              "deleting it would leave no weight; save the model with plain_state_dict instead")
        if base_delta(adapter) is not None:
            raise ConfigError(f"module {path!r}: adapter {name!r} holds part of the base weight (its init moved it "
                              "there), so deleting it would leave the residual W; unload it, or save it with "
                              "convert_to_lora=True and load that instead")
    # -- commit ---------------------------------------------------------------------------------
    saved_by = owners(model)
    mine = getattr(model, "_lowrank_modules_to_save", {}).get(name, [])
    drop(model, name, mine)
    for q in mine:
        if not any(n in active_adapters(model) for n in saved_by[q] if n != name):
            for prm in model.get_submodule(q).parameters():
                prm.requires_grad_(False)
    for path, layer in reversed(layers):  # innermost first, as unload
        del layer.adapters[name]
        if name in layer.active:
            layer.active.remove(name)
        if not layer.adapters:
            _set_submodule(model, path, layer.base_layer) if path else None
    getattr(model, "_lowrank_adapters", {}).pop(name, None)
    getattr(model, "_lowrank_modules_to_save", {}).pop(name, None)
    if not getattr(model, "_lowrank_adapters", None):
        _forget_adapters(model)
    return model


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the active adapters' auxiliary losses from the last forward (e.g. router load
    balancing of mixture methods); None when no active adapter has one.  Add it to the task loss."""
    total: torch.Tensor | None = None
    for _, layer in adapted_layers(model):
        if layer.disabled:
            continue
        for n in layer.active:
            if n in layer.merged:
                continue
            term = layer.adapters[n].aux_loss()
            if term is not None:
                total = term if total is None else total + term
    return total


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter that requires grad."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; works on meta-device models."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
