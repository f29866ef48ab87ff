"""Injecting adapters into a model: target selection, validation, then an all-or-nothing commit."""

from __future__ import annotations

import difflib
import inspect
import numbers
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .._checks import is_finite_real, is_real
from ..errors import AlreadyAdaptedError, ConfigError, TargetError, UnsupportedLayerError
from .adapter import Adapter
from .init import Init
from .layers import LINEAR_TYPES, AdaptedLayer, BaseLayer

Targets = "str | Sequence[str]"


# ---- walking the model ----------------------------------------------------------------------
def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(path, layer) for every module carrying adapters."""
    for path, mod in model.named_modules():
        if isinstance(mod, AdaptedLayer):
            yield path, mod


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Leaf-level modules addressable by target patterns, seen through existing wrappers."""
    skip: list[str] = []
    for path, mod in model.named_modules():
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        if isinstance(mod, AdaptedLayer):
            skip.append(path)
            yield path, mod
            continue
        yield path, mod


def logical_paths(model: nn.Module) -> dict[str, str]:
    """Each module's path in the model as it is -> its path in the plain model (the wrappers'
    ``base_layer`` hops left out; adapters' own modules are not listed).  They differ only inside
    a wrapped container (a block edited by LoReFT that holds adapted layers)."""
    out: dict[str, str] = {}
    seen: set[int] = set()  # as named_modules: a module registered twice (or in a cycle) is listed once

    def walk(m: nn.Module, actual: str, logical: str) -> None:
        out[actual] = logical
        seen.add(id(m))
        for name, child in m._modules.items():
            if child is None or id(child) in seen:
                continue
            a = f"{actual}.{name}" if actual else name
            if isinstance(m, AdaptedLayer):
                if name == "base_layer":
                    walk(child, a, logical)
                continue
            walk(child, a, f"{logical}.{name}" if logical else name)

    walk(model, "", "")
    return out


def _inside_wrapped_blocks(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(plain path, path of the wrapped block, module) of modules inside a wrapped container:
    not addressable by targets (see :func:`resolve_targets`)."""
    blocks = [(path, mod) for path, mod in model.named_modules()
              if isinstance(mod, AdaptedLayer) and not mod.base.has_weight]  # wrapped containers, not layers
    if not blocks:
        return
    logical = logical_paths(model)
    for path, mod in blocks:
        for sub, inner in mod.base_layer.named_modules():
            if sub and ".adapters." not in f".{sub}." and not isinstance(inner, AdaptedLayer):
                actual = f"{path}.base_layer.{sub}"
                yield logical.get(actual, actual), path, inner


def _output_head_paths(model: nn.Module) -> set[str]:
    """Modules that project onto the vocabulary (or share the input embedding's weight)."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for path, mod in model.named_modules():
        if out_emb is not None and mod is out_emb:
            heads.add(path)
        elif isinstance(mod, LINEAR_TYPES) and id(getattr(mod, "weight", None)) in emb_weights:
            heads.add(path)
    return heads


def _matches(path: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _spec(what: str, spec: Any) -> str | list[str]:
    """A target/exclude spec as a regex string (checked) or a list of names; TargetError otherwise."""
    if isinstance(spec, str):
        if spec != "all-linear" or what != "targets":
            try:
                re.compile(spec)
            except re.error as e:
                raise TargetError(f"{what} regex {spec!r} does not compile: {e}") from None
        return spec
    try:
        names = list(spec)  # a list, tuple, set, dict keys ...
    except TypeError:
        names = None
    if names is None or not all(isinstance(t, str) for t in names) or (what == "targets" and not names):
        kinds = "'all-linear', a regex or a non-empty collection" if what == "targets" else "a regex or a collection"
        raise TargetError(f"{what} must be {kinds} of module names, got {spec!r}")
    return names


def resolve_targets(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    exclude: str | Sequence[str] | None = None,
    layer_types: tuple[type[nn.Module], ...] = LINEAR_TYPES,
    method: str = "",
    skip: Sequence[str] = (),
) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs a target spec selects; raises TargetError if none.  ``skip``:
    module paths left out with everything inside them (modules saved in full)."""
    targets = _spec("targets", targets)
    exclude = _spec("exclude", exclude) if exclude is not None else None

    def skipped(path: str) -> bool:
        return any(path == q or path.startswith(q + ".") for q in skip)

    candidates = [(p, m) for p, m in _candidate_modules(model) if p]
    chosen: list[tuple[str, nn.Module]] = []
    heads = _output_head_paths(model) if targets == "all-linear" else set()
    if targets == "all-linear":
        for path, mod in candidates:
            inner = mod.base_layer if isinstance(mod, AdaptedLayer) else mod
            if isinstance(inner, LINEAR_TYPES) and path not in heads:
                chosen.append((path, mod))
    else:
        for path, mod in candidates:
            if _matches(path, targets):
                inner = mod.base_layer if isinstance(mod, AdaptedLayer) else mod
                if not isinstance(inner, layer_types):
                    if isinstance(targets, str) and len(list(inner.children())) > 0:
                        continue  # a regex may match containers on its way; only leaves must fit
                    raise UnsupportedLayerError(
                        f"module {path!r} is a {type(inner).__name__}; method {method!r} adapts only "
                        f"{', '.join(t.__name__ for t in layer_types)}"
                    )
                chosen.append((path, mod))
    if exclude is not None:
        chosen = [(p, m) for p, m in chosen if not _matches(p, exclude)]
    chosen = [(p, m) for p, m in chosen if not skipped(p)]
    # layers inside a block whose whole output an adapter already edits (LoReFT) cannot take adapters
    # now: refuse, rather than adapt the rest and silently leave them out
    for path, block, inner in _inside_wrapped_blocks(model):
        if targets == "all-linear":
            wanted = isinstance(inner, LINEAR_TYPES) and path not in heads
        else:
            wanted = isinstance(inner, layer_types) and _matches(path, targets)
        if wanted and not (exclude is not None and _matches(path, exclude)) and not skipped(path):
            names = ", ".join(model.get_submodule(block).adapters)
            raise TargetError(
                f"module {path!r} sits inside {block!r}, whose output adapter(s) {names} already edit; layers "
                "inside an adapted block cannot take adapters afterwards: adapt them first, then the block "
                f"(or exclude them)"
            )
    if not chosen:
        names = [p for p, _ in candidates]
        wanted = [targets] if isinstance(targets, str) else list(targets)
        close: list[str] = []
        for t in wanted:
            close += difflib.get_close_matches(t, names, n=3, cutoff=0.3)
            close += [n for n in names if n.split(".")[-1] and difflib.SequenceMatcher(None, t, n.split(".")[-1]).ratio() > 0.6][:3]
        close = list(dict.fromkeys(close))[:6]
        hint = f" Closest module names: {', '.join(close)}." if close else ""
        raise TargetError(f"targets {targets!r} matched no module of this model.{hint}")
    return chosen


# ---- adapt ------------------------------------------------------------------------------------
@dataclass
class _Planned:
    path: str
    module: nn.Module  # the module now at `path` (a base layer or an AdaptedLayer)
    base: BaseLayer
    adapter: Adapter
    new_weight: torch.Tensor | None = None


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def plan_adapters(
    model: nn.Module,
    method_cls: type[Adapter],
    *,
    name: str,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None,
    rank: int,
    alpha: float | None,
    dropout: float,
    init: Init | None,
    calibration: Iterable[Any] | None,
    options: dict[str, Any],
    skip: Sequence[str] = (),
) -> list[_Planned]:
    """Build every adapter detached from the model; nothing in the model changes here."""
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "./\\"):
        raise ConfigError(f"adapter name must be a non-empty string without '.', '/' or '\\', got {name!r}")
    if alpha is not None and not (is_finite_real(alpha) and float(alpha) > 0):
        raise ConfigError(f"alpha must be a finite number > 0 (or None for the method's default), got {alpha!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if not is_finite_real(dropout) or not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
    known = method_cls.options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        close = {u: difflib.get_close_matches(u, list(known), n=1) for u in unknown}
        hints = ", ".join(f"{u!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for u, c in close.items())
        raise ConfigError(
            f"method {method_cls.name!r} has no option {hints}; its own options are: {', '.join(known) or 'none'} "
            "(besides rank, alpha, dropout, init, targets and exclude, which every method takes)"
        )
    for key, value in options.items():
        _check_option_type(method_cls.name, key, value, known[key].default)
    chosen = resolve_targets(model, targets, exclude, method_cls.layer_types, method_cls.name, skip=skip)
    if init is not None and not issubclass(method_cls, init.requires):
        raise ConfigError(
            f"init {init.name!r} needs a method with {init.requires.__name__} structure; "
            f"method {method_cls.name!r} is not one"
        )
    layers: dict[str, BaseLayer] = {}
    for path, mod in chosen:
        if isinstance(mod, AdaptedLayer):
            if name in mod.adapters:
                raise AlreadyAdaptedError(f"module {path!r} already has an adapter named {name!r}")
            if mod.merged:
                raise AlreadyAdaptedError(f"module {path!r} has merged adapters; unmerge before adding {name!r}")
            replacing = [n for n, a in mod.adapters.items() if a.replaces_base]
            if method_cls.replaces_base and replacing:
                raise AlreadyAdaptedError(
                    f"module {path!r} is already parameterised by adapter {replacing[0]!r}; a second full-weight "
                    f"parameterisation ({method_cls.name!r}) cannot share it"
                )
            reading = [n for n, a in mod.adapters.items() if a.reads_base_weight]
            if (method_cls.reads_base_weight and replacing) or (method_cls.replaces_base and reading):
                raise AlreadyAdaptedError(
                    f"module {path!r}: {method_cls.name!r} cannot share a layer with adapter "
                    f"{(replacing or reading)[0]!r}: one replaces the base weight that the other's update reads"
                )
            if init is not None and init.modifies_base and mod.adapters:
                raise ConfigError(
                    f"init {init.name!r} rewrites the base weight of {path!r}, under the adapters already there "
                    f"({', '.join(mod.adapters)}), which would change what they compute; adapt a fresh model"
                )
            base = mod.base
        else:
            base = BaseLayer(mod)
        method_cls.validate(base, rank, path, **options)
        layers[path] = base
    stats = init.collect(model, layers, calibration) if init is not None else {}
    shared = method_cls.shared_state(layers, rank, **options)
    planned = []
    for path, mod in chosen:
        base = layers[path]
        with torch.device(base.device):
            extra = {"shared": shared[path]} if shared is not None else {}
            adapter = method_cls(base, rank=rank, alpha=alpha, dropout=dropout, **options, **extra)
        adapter.to(dtype=_adapter_dtype(base.dtype))
        new_w = None
        if init is not None:
            try:
                new_w = init(adapter, base, stats.get(path))
            except (RuntimeError, NotImplementedError) as e:
                if base.device.type != "meta":
                    raise
                raise ConfigError(
                    f"init {init.name!r} reads the weights of {path!r}, which is on the meta device (no values): {e}"
                ) from None
        adapter.finalize(new_w if new_w is not None else base.weight)
        planned.append(_Planned(path, mod, base, adapter, new_w))
    return planned


def _check_option_type(method: str, key: str, value: Any, default: Any) -> None:
    """An option must have the type of its default in the method's signature (its typed config)."""
    if default is None or default is inspect.Parameter.empty:
        return
    if isinstance(default, bool):
        ok, what = isinstance(value, bool), "a bool"
    elif isinstance(default, (int, float)):
        ok = is_real(value) and (isinstance(default, float) or isinstance(value, numbers.Integral))
        what = "a number" if isinstance(default, float) else "an integer"
    elif isinstance(default, str):
        ok, what = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise ConfigError(f"method {method!r} option {key!r} must be {what} (default {default!r}), got {value!r}")


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # adapters train in fp32 unless the base is already fp32/fp64; low-precision bases stay frozen
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def check_new_name(model: nn.Module, name: str) -> None:
    """AlreadyAdaptedError when ``name`` already names an adapter of ``model``: one name, one adapter
    (re-using it would mix two configurations under one record and one file)."""
    for p, layer in adapted_layers(model):
        if name in layer.adapters:
            raise AlreadyAdaptedError(f"model already has an adapter named {name!r} (at {p!r}); pick another name")
    if name in getattr(model, "_lowrank_adapters", {}):
        raise AlreadyAdaptedError(f"model already has an adapter named {name!r}; pick another name")


def resolve_saved(model: nn.Module, entries: Sequence[str], where: str = "modules_to_save") -> list[str]:
    """The module paths that ``entries`` (names or path suffixes) select, each once, and without
    modules inside another selected one (its values are saved with it)."""
    paths: list[str] = []
    for t in entries:
        hits = [p for p, _ in model.named_modules() if p and (p == t or p.endswith("." + t))]
        if not hits:
            raise TargetError(f"{where} entry {t!r} matched no module")
        paths += [h for h in hits if h not in paths]
    return [q for q in paths if not any(q.startswith(o + ".") for o in paths)]


def check_saved_modules(model: nn.Module, name: str, saved: list[str], adapting: list[str]) -> None:
    """ConfigError unless adapter ``name``, about to adapt the layers ``adapting`` and save the
    modules ``saved`` in full, keeps clear of every other: a module saved in full is not also an
    adapted layer (nor contains or sits inside one); another adapter may save its own copy of the
    same module only while that adapter is not active (the model shows one copy at a time)."""
    def overlap(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    adapted = {path: list(layer.adapters) for path, layer in adapted_layers(model)}
    active = {n for _, layer in adapted_layers(model) for n in layer.active}
    for path in adapting:
        adapted[path] = [*adapted.get(path, []), name]
    for q in saved:
        hit = next((path for path in adapted if overlap(path, q)), None)
        if hit is not None:
            raise ConfigError(f"modules_to_save entry {q!r} overlaps {hit!r}, adapted by {', '.join(adapted[hit])}: "
                              "a module is either adapted or trained and saved in full")
    def tensors(path: str) -> set[int]:
        m = model.get_submodule(path)
        return {id(t) for t in [*m.parameters(), *m.buffers()]}

    for other, paths in getattr(model, "_lowrank_modules_to_save", {}).items():
        if other == name:
            continue
        for q in paths:
            for t in saved:  # e.g. GPT-2's lm_head and wte: two paths, one tied weight
                if t != q and not overlap(t, q) and tensors(t) & tensors(q):
                    raise ConfigError(f"{t!r} shares tensors with {q!r}, which adapter {other!r} trains and saves "
                                      "in full; two adapters cannot each own a copy of one tied tensor")
            hit = next((t for t in adapting if overlap(t, q)), None)
            if hit is not None:
                raise ConfigError(f"{hit!r} overlaps {q!r}, which adapter {other!r} trains and saves in full; "
                                  "a module is either adapted or trained and saved in full")
            hit = next((t for t in saved if overlap(t, q)), None)
            if hit is not None and (hit != q or other in active):
                why = ("which is active and shows its own copy; the model shows one copy at a time, so "
                       f"set_active without {other!r} first") if hit == q else \
                      "a module and a part of it cannot be saved by two adapters"
                raise ConfigError(f"{hit!r} overlaps {q!r}, which adapter {other!r} trains and saves in full, {why}")


def commit_adapters(model: nn.Module, planned: list[_Planned], name: str, *, freeze: bool = True) -> None:
    """Attach planned adapters; after this point nothing can fail on bad input."""
    for p in planned:
        layer = p.module if isinstance(p.module, AdaptedLayer) else AdaptedLayer(p.module)
        if layer is not p.module and model.__dict__.get("_lowrank_disabled_depth"):
            layer.disabled = True  # added inside lowrank.disabled(): applied once that ends
        if p.new_weight is not None:
            p.base.set_weight(p.new_weight)
        layer.adapters[name] = p.adapter
        layer.train(p.module.training)  # new adapters follow the model's train/eval mode
        if name not in layer.active:
            layer.active.append(name)
        if layer is not p.module:
            _set_submodule(model, p.path, layer)
    if freeze:
        mark_trainable(model, [name])


def mark_trainable(model: nn.Module, names: Sequence[str]) -> None:
    """Freeze everything except the parameters of the named adapters and their saved modules.

    By protocol an adapter's parameters are its trainable tensors; frozen ones are buffers.
    """
    keep: set[int] = set()
    for _, layer in adapted_layers(model):
        for n in names:
            if n in layer.adapters:
                keep.update(id(t) for t in layer.adapters[n].parameters())
    saved = getattr(model, "_lowrank_modules_to_save", {})
    for n in names:
        for mod_path in saved.get(n, []):
            keep.update(id(t) for t in model.get_submodule(mod_path).parameters())
    for prm in model.parameters():
        prm.requires_grad_(id(prm) in keep)
