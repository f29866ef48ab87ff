"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Methods that Hugging Face PEFT also ships write PEFT's own layout and key names
(``base_model.model.<module path>.lora_A.weight`` ...), so the directory loads in PEFT
unchanged and a PEFT adapter loads here.  Loading validates the whole file against the model
before anything is attached; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import AdapterLoadError, ConfigError, LowRankError, TargetError, UnsafePathError
from ..registry import _load_builtins, _METHODS, get_init, get_method
from .api import adapter_record
from .inject import (
    adapted_layers,
    check_new_name,
    check_saved_modules,
    commit_adapters,
    logical_paths,
    plan_adapters,
    resolve_saved,
)
from .layers import AdaptedLayer, Conv1D
from .saved import claim, owner_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMAT_VERSION = 1

# ---- inits that replace W (PiSSA, MiLoRA, OLoRA, LoRA-GA, ...) -------------------------------
# Such an init moves a low-rank part P Q out of W (W_now = W_orig - P Q) and records (P, Q) on the
# adapter with `record_base_delta`.  `save_adapter` writes them beside the adapter's tensors, so
# `load_adapter` rebuilds the residual base from an unmodified model without re-running the init
# (calibration-based or randomized inits cannot be re-run), and `convert_to_lora=True` writes the
# same function as a plain adapter of rank r + k against the ORIGINAL W (PEFT-loadable).
_DELTA_LEFT = "lowrank_base_delta_left"  # P (out, k)
_DELTA_RIGHT = "lowrank_base_delta_right"  # Q (k, in)


def record_base_delta(adapter: nn.Module, left: torch.Tensor, right: torch.Tensor) -> None:
    """Record that the init replaced W by W - left @ right (left (out, k), right (k, in))."""
    adapter.register_buffer(_DELTA_LEFT, left.detach().clone(), persistent=False)
    adapter.register_buffer(_DELTA_RIGHT, right.detach().clone(), persistent=False)


def base_delta(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(P, Q) recorded by :func:`record_base_delta`, or None when the init left W alone."""
    left = getattr(adapter, _DELTA_LEFT, None)
    right = getattr(adapter, _DELTA_RIGHT, None)
    return (left, right) if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor) else None


def _write_temp(path: Path, write) -> str:
    """``write`` a temporary file beside ``path`` (same directory, so a later os.replace is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def _plain_layers(model: nn.Module):
    """(path in the plain model, layer) of every adapted layer: files name modules as the plain
    model does, also for layers inside a block that another adapter wraps (LoReFT)."""
    logical = logical_paths(model)
    for path, layer in adapted_layers(model):
        yield logical.get(path, path), layer


def adapter_state(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` under their file keys."""
    rec = adapter_record(model, name)
    state: dict[str, torch.Tensor] = {}
    for path, layer in _plain_layers(model):
        if name in layer.adapters:
            for k, v in layer.adapters[name].adapter_state_dict().items():
                state[f"{PREFIX}{path}.{k}"] = v
    for mod_path in rec["modules_to_save"]:
        for k, v in owner_state(model, mod_path, name).items():
            state[f"{PREFIX}{mod_path}.{k}"] = v
    return state


def adapter_config(model: nn.Module, name: str = "default", record: dict[str, Any] | None = None) -> dict[str, Any]:
    rec = adapter_record(model, name) if record is None else record
    cls = get_method(rec["method"])
    shapes = {}
    transposed = False
    for path, layer in _plain_layers(model):
        if name in layer.adapters:
            b = layer.base
            shapes[path] = [b.out_features, b.in_features]
            transposed |= isinstance(layer.base_layer, Conv1D)
    cfg: dict[str, Any] = {}
    peft = cls.peft_config(rec["rank"], rec["alpha"], rec["options"])
    base_untouched = rec["init"] in (None, "lora") or not get_init(rec["init"]).modifies_base
    if peft is not None and base_untouched:  # a plain adapter on the original W: PEFT's own layout
        cfg.update(
            {
                "lora_dropout": rec["dropout"],
                "target_modules": list(rec["targets"]),
                "modules_to_save": list(rec["modules_to_save"]) or None,
                "fan_in_fan_out": transposed,
                "bias": "none",
                "init_lora_weights": True,
                "task_type": None,
                "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
                "inference_mode": True,
            }
        )
        cfg.update(peft)
    cfg["lowrank"] = {
        "format_version": FORMAT_VERSION,
        "method": rec["method"],
        "rank": rec["rank"],
        "alpha": rec["alpha"],
        "dropout": rec["dropout"],
        "init": rec["init"],
        "init_options": rec["init_options"],
        "options": rec["options"],
        "targets": list(rec["targets"]),
        "modules_to_save": list(rec["modules_to_save"]),
        "shapes": shapes,
    }
    return cfg


def save_adapter(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, convert_to_lora: bool = False
) -> Path:
    """Write adapter ``name`` to directory ``path`` (created if needed); files are replaced atomically.

    For an init that replaced the base weight (PiSSA, MiLoRA, OLoRA, LoRA-GA, ...) the part it moved
    out of W is saved too, so loading into an unmodified model restores the residual base.  With
    ``convert_to_lora=True`` the file instead holds the same function as a plain adapter against the
    ORIGINAL base weights: factors [B, -P/s] and [A; Q] stacked to rank r + k (2r for these inits),
    scale folded in exactly; it loads in PEFT (for methods PEFT ships) on an unmodified base model.
    Conversion is checked numerically layer by layer and raises ConfigError when the method's
    function is not determined by W + s B A alone.
    """
    if convert_to_lora:
        cfg, tensors = _converted(model, name)
    else:
        cfg = adapter_config(model, name)
        tensors = dict(adapter_state(model, name))
        for mod_path, layer in _plain_layers(model):
            if name in layer.adapters and (delta := base_delta(layer.adapters[name])) is not None:
                tensors[f"{PREFIX}{mod_path}.{_DELTA_LEFT}"], tensors[f"{PREFIX}{mod_path}.{_DELTA_RIGHT}"] = delta
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    try:  # the config is serialised before any file is touched
        text = json.dumps(cfg, indent=2, sort_keys=True, default=_json_number)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"adapter {name!r}: its options cannot be written to {CONFIG_NAME}: {e}") from None
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # both files are written beside their targets first, then moved in: a failure leaves the
        # directory's previous adapter as it was
        tmp_w = _write_temp(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
        try:
            tmp_c = _write_temp(out / CONFIG_NAME, lambda p: Path(p).write_text(text))
        except BaseException:
            os.unlink(tmp_w)
            raise
        os.replace(tmp_w, out / WEIGHTS_NAME)
        os.replace(tmp_c, out / CONFIG_NAME)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:  # a bad path, not a failing disk
        raise ConfigError(f"cannot write the adapter to {out}: {e.strerror or e}") from None
    return out


def _json_number(value: Any) -> Any:
    """numpy scalars and one-element tensors (accepted as option values) as plain numbers."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return item()
    raise TypeError(f"{value!r} ({type(value).__name__}) is not a JSON value")


def _converted(model: nn.Module, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and tensors of adapter ``name`` rewritten against the original base weights."""
    from ..core.adapter import FactorAdapter
    from ..errors import ConfigError

    rec = dict(adapter_record(model, name))
    cls = get_method(rec["method"])
    layers = [(p, layer) for p, layer in _plain_layers(model) if name in layer.adapters]
    deltas = {p: base_delta(layer.adapters[name]) for p, layer in layers}
    if all(d is None for d in deltas.values()):  # the init left W alone: the adapter already is a plain one
        rec.update(init=None, init_options={})
        return adapter_config(model, name, record=rec), dict(adapter_state(model, name))
    if not issubclass(cls, FactorAdapter):
        raise ConfigError(f"convert_to_lora: method {cls.name!r} has no A/B factors to stack")
    tensors: dict[str, torch.Tensor] = {}
    new_rank = None
    for path, layer in layers:
        adapter = layer.adapters[name]
        delta = deltas[path]
        if delta is None:
            raise ConfigError(f"convert_to_lora: module {path!r} has no recorded base delta")
        if layer.merged:
            raise ConfigError(f"convert_to_lora: module {path!r} is merged; unmerge before saving")
        left, right = delta  # (out, k), (k, in)
        k = left.shape[1]
        rank = adapter.rank + k
        if new_rank not in (None, rank):
            raise ConfigError("convert_to_lora: layers moved different ranks out of W")
        new_rank = rank
        with torch.device(layer.base.device):
            probe = cls(layer.base, rank=rank, alpha=adapter.alpha, dropout=0.0, **rec["options"])
        probe.to(dtype=adapter.compute_dtype)
        s, s2 = adapter.scaling, probe.scaling
        with torch.no_grad():
            a_new = torch.cat([adapter.A, right.to(adapter.A.dtype)], 0)  # (r + k, in)
            b_new = torch.cat([adapter.B, -left.to(adapter.B.dtype) / s], 1) * (s / s2)  # (out, r + k)
        ids = {probe.A.data_ptr(): a_new, probe.B.data_ptr(): b_new}
        own = adapter.adapter_state_dict()
        sub: dict[str, torch.Tensor] = {}
        for key, ref in probe.adapter_state_dict().items():
            if ref.data_ptr() in ids:
                sub[key] = ids[ref.data_ptr()]
            elif key in own and own[key].shape == ref.shape:
                sub[key] = own[key]
            else:
                raise ConfigError(f"convert_to_lora: method {cls.name!r} tensor {key!r} depends on the rank")
        refs = probe.adapter_state_dict()
        sub = {k2: v.to(refs[k2].dtype) for k2, v in sub.items()}
        probe.load_adapter_state_dict(sub)
        # check: the converted adapter on the original W merges to what the adapter computes now
        probe.check_mergeable()
        w_now = layer.base.weight.to(adapter.compute_dtype)
        w_orig = w_now + left.to(w_now.dtype) @ right.to(w_now.dtype)
        with torch.no_grad():
            want = adapter.merge_into(w_now)
            got = probe.merge_into(w_orig)
        tol = 1e-4 * float(want.abs().max().clamp_min(1.0))
        if float((want - got).abs().max()) > tol:
            raise ConfigError(
                f"convert_to_lora: method {cls.name!r} at {path!r} is not a function of W + s B A alone; "
                "it cannot be rewritten against the original weights"
            )
        for key, v in sub.items():
            tensors[f"{PREFIX}{path}.{key}"] = v
    for mod_path in rec["modules_to_save"]:
        for key, v in owner_state(model, mod_path, name).items():
            tensors[f"{PREFIX}{mod_path}.{key}"] = v
    rec.update(rank=new_rank, init=None, init_options={})
    return adapter_config(model, name, record=rec), tensors


def _inside(directory: Path, name: str) -> Path:
    root = directory.resolve()
    target = (directory / name).resolve()
    if root != target and root not in target.parents:
        raise UnsafePathError(f"{directory / name} resolves to {target}, outside the adapter directory {root}")
    return target


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory: its config and its tensors (safetensors only)."""
    if not isinstance(path, (str, os.PathLike)):
        raise AdapterLoadError(f"an adapter path must be a string or a path, got {path!r}")
    d = Path(path)
    if not d.exists():
        raise AdapterLoadError(f"adapter directory {d} does not exist")
    if not d.is_dir():
        raise AdapterLoadError(f"adapter path {d} is not a directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    cfg_path = _inside(d, CONFIG_NAME)
    w_path = _inside(d, WEIGHTS_NAME)
    if not cfg_path.is_file():
        raise AdapterLoadError(f"{d / CONFIG_NAME} is missing")
    if not w_path.is_file():
        pickled = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        extra = f" (found {', '.join(pickled)}: pickled files are never loaded)" if pickled else ""
        raise AdapterLoadError(f"{d / WEIGHTS_NAME} is missing{extra}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterLoadError(f"{cfg_path} must hold a JSON object")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterLoadError(f"{w_path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return cfg, tensors


# ---- field checks of a config file, before any field is used ------------------------------------
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, str) for t in v)


def _shape(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(d, int) and d > 0 for d in v)


def _check_fields(cfg: dict[str, Any], checks: dict[str, tuple[Any, str]], where: str, prefix: str = "") -> None:
    """AdapterLoadError naming the file and key of the first present field that fails its check."""
    for key, (ok, what) in checks.items():
        if key in cfg and not ok(cfg[key]):
            raise AdapterLoadError(f"{where}: '{prefix}{key}' must be {what}, got {cfg[key]!r}")


_LOWRANK_FIELDS = {
    "method": (lambda v: isinstance(v, str), "a method name"),
    "rank": (_positive_int, "a positive integer"),
    "alpha": (lambda v: v is None or _number(v), "a number"),
    "dropout": (lambda v: v is None or _number(v), "a number"),
    "targets": (lambda v: isinstance(v, str) or _names(v), "a string or a list of module names"),
    "exclude": (lambda v: v is None or isinstance(v, str) or _names(v), "a string or a list of module names"),
    "init": (lambda v: v is None or isinstance(v, str), "an init name"),
    "init_options": (lambda v: isinstance(v, dict), "an object"),
    "options": (lambda v: isinstance(v, dict), "an object"),
    "modules_to_save": (_names, "a list of module names"),
    "shapes": (lambda v: isinstance(v, dict) and all(_shape(x) for x in v.values()), "an object of [out, in] pairs"),
}

_PEFT_FIELDS = {  # the fields of a PEFT config that are read here
    "r": (_positive_int, "a positive integer"),
    "lora_alpha": (lambda v: _number(v) and v > 0, "a number > 0"),
    "lora_dropout": (lambda v: v is None or (_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _names(v), "a string or a list of module names"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _names(v), "a string or a list of module names"),
    "modules_to_save": (lambda v: v is None or _names(v), "a list of module names"),
}


def _recipe_from_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Method, rank, alpha, options and targets described by a config (ours or PEFT's)."""
    if "lowrank" in cfg:
        r = cfg["lowrank"]
        need = ("method", "rank", "targets")
        missing = [k for k in need if k not in r]
        if missing:
            raise AdapterLoadError(f"{where}: 'lowrank' section lacks {', '.join(missing)}")
        version = r.get("format_version", 1)
        if not _positive_int(version):
            raise AdapterLoadError(f"{where}: 'lowrank.format_version' must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise AdapterLoadError(f"{where}: format_version {r['format_version']} is newer than this lowrank")
        _check_fields(r, _LOWRANK_FIELDS, where, prefix="lowrank.")
        return dict(r)
    _load_builtins()
    for cls in _METHODS.values():
        found = cls.from_peft_config(cfg)
        if found is not None:
            if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
                raise AdapterLoadError(f"{where}: per-module rank_pattern/alpha_pattern are not supported")
            _check_fields(cfg, _PEFT_FIELDS, where)
            return {
                "method": cls.name,
                # rank-free PEFT methods (C3A: block_size instead) have no "r"
                "rank": int(cfg.get("r", 1)),
                "alpha": float(cfg.get("lora_alpha", cfg.get("r", 1))),
                "dropout": float(cfg.get("lora_dropout") or 0.0),
                "init": None,
                "options": found,
                "targets": cfg.get("target_modules") or "all-linear",
                "exclude": cfg.get("exclude_modules"),
                "modules_to_save": cfg.get("modules_to_save") or [],
            }
    raise AdapterLoadError(
        f"{where}: no registered method reads this config (peft_type={cfg.get('peft_type')!r}); "
        "expected a lowrank adapter or a PEFT adapter of a method lowrank ships"
    )


def _take(tensors: dict[str, torch.Tensor], key: str, ref: torch.Tensor, where: str) -> torch.Tensor:
    """Pop ``key`` from the file's tensors, checked against the model's tensor ``ref``: present,
    same shape, same kind of number (a float parameter is never filled from integers)."""
    if key not in tensors:
        raise AdapterLoadError(f"{where}: key {key!r} is missing from {WEIGHTS_NAME}")
    t = tensors.pop(key)
    if t.shape != ref.shape:
        raise AdapterLoadError(f"{where}: key {key!r} has shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}")
    if t.is_floating_point() != ref.is_floating_point() or t.is_complex() != ref.is_complex():
        raise AdapterLoadError(f"{where}: key {key!r} holds {t.dtype}, the model expects {ref.dtype}")
    return t


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Add the adapter saved in ``path`` to ``model`` under ``name``.

    The file is read and checked against the model (modules, keys, shapes) before anything is
    attached; on any mismatch :class:`lowrank.AdapterLoadError` names the key or module and
    the model is unchanged.
    """
    cfg, tensors = read_adapter_dir(path)
    where = str(Path(path) / CONFIG_NAME)
    recipe = _recipe_from_config(cfg, where)
    check_new_name(model, name)
    targets = recipe["targets"]
    modules = dict(model.named_modules())
    if isinstance(targets, list) and "lowrank" in cfg:
        wrapped = set(logical_paths(model).values()) - set(modules)  # inside a block another adapter wraps
        for t in targets:
            if t in wrapped:
                raise AdapterLoadError(
                    f"{where}: module {t!r} sits inside a block that already carries an adapter editing its whole "
                    "output (LoReFT); load this adapter first, then add the block's"
                )
            if t not in modules:
                raise AdapterLoadError(f"{where}: module {t!r} of the adapter does not exist in this model")
        shapes = recipe.get("shapes", {})
        for t, shape in shapes.items():
            if t not in modules:
                raise AdapterLoadError(f"{where}: 'lowrank.shapes' names module {t!r}, which this model lacks")
            m = modules[t]
            base = m.base if isinstance(m, AdaptedLayer) else None
            if base is None and hasattr(m, "weight"):
                from .layers import BaseLayer

                base = BaseLayer(m)
            if base is not None and [base.out_features, base.in_features] != list(shape):
                raise AdapterLoadError(
                    f"{where}: module {t!r} is {base.out_features}x{base.in_features} in this model, "
                    f"but the adapter was made for {shape[0]}x{shape[1]}: different base model"
                )
    try:
        method_cls = get_method(recipe["method"])
        init = None
        has_delta = any(k.endswith("." + _DELTA_LEFT) for k in tensors)
        if recipe.get("init") and not has_delta:
            init_cls = get_init(recipe["init"])
            # a saved adapter's factors are loaded; only inits that replaced W need re-applying to the base
            # (files written before the base delta was saved; newer files carry it, see below)
            init = init_cls(**recipe.get("init_options", {})) if init_cls.modifies_base else None
    except LowRankError as e:
        raise AdapterLoadError(f"{where}: {e}") from None
    try:
        planned = plan_adapters(
            model,
            method_cls,
            name=name,
            targets=targets if not isinstance(targets, list) or "lowrank" not in cfg else _exact(targets),
            exclude=recipe.get("exclude"),
            rank=int(recipe["rank"]),
            alpha=recipe.get("alpha"),
            dropout=float(recipe.get("dropout") or 0.0),
            init=init,
            calibration=None,
            options=dict(recipe.get("options") or {}),
        )
    except AdapterLoadError:
        raise
    except LowRankError as e:
        raise AdapterLoadError(f"{where}: the adapter does not fit this model: {e}") from None
    remaining = dict(tensors)
    if has_delta:  # rebuild the residual base W - P Q from the recorded part
        for p in planned:
            if isinstance(p.module, AdaptedLayer) and p.module.adapters:
                raise AdapterLoadError(
                    f"{where}: the adapter moved part of the base weight of {p.path!r} into itself (init "
                    f"{recipe.get('init')!r}), but that layer already carries adapters ({', '.join(p.module.adapters)}) "
                    "whose outputs would change; load it into a fresh model, or save it with convert_to_lora=True"
                )
            kl, kr = f"{PREFIX}{p.path}.{_DELTA_LEFT}", f"{PREFIX}{p.path}.{_DELTA_RIGHT}"
            if kl not in remaining or kr not in remaining:
                raise AdapterLoadError(f"{where}: key {kl!r} is missing from {WEIGHTS_NAME}")
            left, right = remaining.pop(kl), remaining.pop(kr)
            b = p.base
            if left.dim() != 2 or right.dim() != 2 or left.shape[0] != b.out_features or \
                    right.shape[1] != b.in_features or left.shape[1] != right.shape[0]:
                raise AdapterLoadError(
                    f"{where}: base delta of {p.path!r} has shapes {tuple(left.shape)} x {tuple(right.shape)}, "
                    f"not (out, k) x (k, in) for a {b.out_features}x{b.in_features} layer"
                )
            w = b.weight
            work = torch.float64 if w.dtype == torch.float64 else torch.float32
            p.new_weight = (w.to(work) - left.to(w.device, work) @ right.to(w.device, work)).to(w.dtype)
            p.adapter.finalize(p.new_weight)
            record_base_delta(p.adapter, left.to(w.device), right.to(w.device))
    try:  # the modules the file saves in full, resolved in this model
        saved_paths = resolve_saved(model, recipe.get("modules_to_save") or [])
    except TargetError as e:
        raise AdapterLoadError(f"{where}: {e} in this model") from None
    try:
        check_saved_modules(model, name, saved_paths, [p.path for p in planned])
    except LowRankError as e:
        raise AdapterLoadError(f"{where}: {e}") from None
    for p in planned:
        expected = p.adapter.adapter_state_dict()
        sub = {}
        for k, ref in expected.items():
            sub[k] = _take(remaining, f"{PREFIX}{p.path}.{k}", ref, where).to(ref.dtype)
        p.adapter.load_adapter_state_dict(sub)
    method_cls.load_shared_state([p.adapter for p in planned], remaining, where)
    saved_modules = []
    for q in saved_paths:
        mod = modules[q]
        new_state = {}
        for k, ref in mod.state_dict().items():
            new_state[k] = _take(remaining, f"{PREFIX}{q}.{k}", ref, where)
        saved_modules.append((q, mod, new_state))
    if remaining:
        extra = sorted(remaining)[:5]
        raise AdapterLoadError(f"{where}: unexpected keys in {WEIGHTS_NAME}: {', '.join(extra)}")
    # -- commit ---------------------------------------------------------------------------------
    claim(model, [q for q, _, _ in saved_modules], name)
    for _, mod, st in saved_modules:
        mod.load_state_dict(st)
    from .api import _register_record

    _register_record(
        model,
        name,
        {
            "method": method_cls.name,
            "rank": int(recipe["rank"]),
            "alpha": planned[0].adapter.alpha,
            "dropout": float(recipe.get("dropout") or 0.0),
            "init": recipe.get("init"),
            "init_options": dict(recipe.get("init_options") or {}),
            "options": dict(recipe.get("options") or {}),
            "targets": [p.path for p in planned],
            "modules_to_save": [q for q, _, _ in saved_modules],
        },
    )
    commit_adapters(model, planned, name)
    return model


def _exact(paths: list[str]) -> str:
    import re

    return "|".join(re.escape(p) for p in paths)
